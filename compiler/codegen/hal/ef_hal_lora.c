/* ef_hal_lora_linear / ef_hal_lora_linear_grad: the ef_lora_linear / ef_lora_linear_grad ABI as one pass over row
 * panels, RedMulE jobs on L1 buffers moved by the DMA.
 *
 * Forward and the dX part of the backward are the same walk, so one code path serves both:
 *
 *                 panel (mt rows)   P: frozen weight (R x C)   L: down-projection (R x r)   Q: up-projection (r x C)
 *   forward       x       (mt x K)  W'    (K x N)              A   (K x r)                  B   (r x N)
 *   backward dX   dY      (mt x N)  W'ᵀ   (N x K)              Bᵀ  (N x r)                  Aᵀ  (r x K)
 *
 * Per device d (L and Q are d's adapter, loaded once per device), per panel of mt of its rows:
 *   1. the DMA brings the panel in once (the next panel loads while this one computes, when both fit);
 *   2. the cores: low = panel·L, then scale it (mt x r: S forward, dS backward; r-wide products run on the cores);
 *   3. per column tile t of the output (C in tiles of nt): RedMulE Z = panel·P_t; the cores apply alpha (and beta·C,
 *      forward); RedMulE Z = low·Q_t + Z; the DMA writes Z out (two Z buffers: the store overlaps the next tile).
 *      P is resident for the whole call when it fits, else streamed tile by tile, double-buffered.
 * The backward adds, per panel, with x's panel brought in once as well:
 *   dA_d (K x r, in L1) = Σ panelᵀ·dS  (on the cores, reading x's panel transposed in place)
 *   dB_d (r x N, in L1) = Σ Sᵀ·dY      (S = x·A on the cores, scaled and transposed by them; RedMulE Z = X W + Z)
 * and the DMA writes dA_d and dB_d out after the device's last panel.
 *
 * An operand stored transposed (W with transB forward, W without it backward, A and B for Aᵀ and Bᵀ) is moved as
 * stored and transposed by the cores in L1 (RedMulE reads dense row-major matrices only). The plan (mt, nt, P
 * resident or not) is chosen for the free L1 (choose_plan). If not even a 1-row panel fits, the backward splits the
 * gradients into passes (dX; dA and dB; each alone); what still does not fit, or a size past RedMulE's 16-bit
 * fields, runs on the core kernel, reading L2.
 * Numerics: every sum runs sequentially from 0 and onto its output, in the order ef_lora_linear(_grad) adds, and the
 * scale multiplies the finished rank-r sums as there: on the generic HAL the results equal the core kernel's bits.
 * Written against ef_hal.h only, like ef_hal_gemm.c.
 */
#include <stddef.h>
#include <string.h>

#include "ef_hal.h"
#include "ef_hal_tasks.h"
#include "ef_kernels.h"

#define L1_ALIGN_BYTES 16u
#define REDMULE_MAX_DIM 0xFFFF   /* RedMulE's size fields are 16 bits wide */
#define FLOAT_BYTES 4u
#define STAGE_ROWS 1             /* the least rows a transposing load moves at a time (more if L1 has room) */
#define TILE_FLOOR 16            /* a streamed P's column tile while the panel is sized (then widened if L1 allows) */

static int min_int(int a, int b) { return a < b ? a : b; }

static int max_int(int a, int b) { return a > b ? a : b; }

static uint64_t padded(uint64_t bytes) { return (bytes + L1_ALIGN_BYTES - 1) & ~(uint64_t)(L1_ALIGN_BYTES - 1); }

/* ---- work for the cores ------------------------------------------------------------------------------- */
typedef struct {
    float *dst;            /* src_cols rows, dst_rs apart */
    const float *src;      /* src_rows x src_cols, packed */
    int src_rows, src_cols, dst_rs;
    float scale;
} transpose_arg_t;

static void transpose_task(void *arg) {
    const transpose_arg_t *t = (const transpose_arg_t *)arg;
    const int team = ef_hal_team_size();
    for (int c = ef_hal_core_id(); c < t->src_cols; c += team) {
        float *d = t->dst + (long)c * t->dst_rs;
        if (t->scale == 1.0f) {
            for (int r = 0; r < t->src_rows; r++) d[r] = t->src[(long)r * t->src_cols + c];
        } else {
            for (int r = 0; r < t->src_rows; r++) d[r] = t->src[(long)r * t->src_cols + c] * t->scale;
        }
    }
}

static void transpose(float *dst, int dst_rs, const float *src, int src_rows, int src_cols, float scale) {
    transpose_arg_t t = {dst, src, src_rows, src_cols, dst_rs, scale};
    ef_hal_fork(0, transpose_task, &t);
}

typedef struct {
    float *v;
    long count;
    float scale;
} scale_arg_t;

static void scale_task(void *arg) {
    const scale_arg_t *s = (const scale_arg_t *)arg;
    const long team = ef_hal_team_size();
    for (long i = ef_hal_core_id(); i < s->count; i += team) s->v[i] *= s->scale;
}

/* RedMulE: z (m x k) = x (m x n) · w (n x k) [+ y]; y is NULL or z */
static void redmule(float *z, const float *x, const float *w, const float *y, int m, int n, int k) {
    ef_hal_redmule_job_t job = {z, x, w, y, (uint16_t)m, (uint16_t)n, (uint16_t)k};
    ef_hal_redmule_start(&job);
    ef_hal_redmule_wait();
}

/* The cores: z (m x k) = x·w [+ y] for the products whose output is r columns wide (S, dS, dA), where RedMulE's
 * wide array would mostly idle (compiler/targets/fused.py charges them to the cores too). x is read with strides
 * (x_rs, x_cs), so xᵀ needs no copy. Rows of z are spread over the cores; every sum runs in RedMulE's order. */
typedef struct {
    float *z;
    const float *x, *w, *y;
    int m, n, k, x_rs, x_cs;
} core_job_t;

static void core_job_task(void *arg) {
    const core_job_t *j = (const core_job_t *)arg;
    const int team = ef_hal_team_size();
    for (int i = ef_hal_core_id(); i < j->m; i += team) {
        float *zr = j->z + (long)i * j->k;
        if (!j->y) {
            memset(zr, 0, sizeof(float) * (size_t)j->k);
        } else if (j->y != j->z) {
            memcpy(zr, j->y + (long)i * j->k, sizeof(float) * (size_t)j->k);
        }
        for (int p = 0; p < j->n; p++) {
            const float xv = j->x[(long)i * j->x_rs + (long)p * j->x_cs];
            const float *wr = j->w + (long)p * j->k;
            for (int q = 0; q < j->k; q++) zr[q] += xv * wr[q];
        }
    }
}

static void cores(float *z, const float *x, int x_rs, int x_cs, const float *w, const float *y, int m, int n, int k) {
    core_job_t j = {z, x, w, y, m, n, k, x_rs, x_cs};
    ef_hal_fork(0, core_job_task, &j);
}

/* ---- operands: a matrix P (rows x cols) in L1 as column tiles ------------------------------------------ */
typedef struct {
    const float *src;      /* in L2: P (rows x cols), or Pᵀ (cols x rows) when transposed */
    int rows, cols, tile, tiles, transposed, resident;
    float *res;            /* resident: tile t (rows x its width) at res + rows·t·tile */
    float *buf[2], *stage;      /* streamed: double-buffered tiles; when transposed, the next tile as stored */
    ef_hal_dma_t load[2];
    long step, steps;      /* streamed: tiles already handed out, of the call's sequence (every panel: tiles 0..) */
} operand_t;

static void operand_init(operand_t *o, int rows, int cols, int tile, int transposed, int resident) {
    memset(o, 0, sizeof *o);
    o->rows = rows, o->cols = cols, o->tile = tile, o->tiles = (cols + tile - 1) / tile;
    o->transposed = transposed, o->resident = resident;
}

static int tile_width(const operand_t *o, int t) { return min_int(o->tile, o->cols - t * o->tile); }

/* dst (rows x width, row stride dst_rs) = the transpose of `width` rows of `rows` floats at l2 (consecutive): through
 * `scratch` by the DMA, transposed by the cores; synchronous (set-up work, once per call or device). */
static void load_transposed(float *dst, int dst_rs, const float *l2, int width, int rows, float *scratch,
                            long scratch_floats) {
    const int chunk = (int)(scratch_floats / rows < width ? scratch_floats / rows : width);
    for (int u = 0; u < width; u += chunk) {
        const int c = min_int(chunk, width - u);
        ef_hal_dma_wait(ef_hal_dma_in(scratch, l2 + (long)u * rows, FLOAT_BYTES * (uint32_t)(c * rows)));
        transpose(dst + u, dst_rs, scratch, c, rows, 1.0f);
    }
}

/* A resident operand from `src`, tile by tile. */
static void operand_load(operand_t *o, const float *src, float *scratch, long scratch_floats) {
    o->src = src;
    for (int t = 0; t < o->tiles; t++) {
        const int j0 = t * o->tile, tw = tile_width(o, t);
        float *dst = o->res + (long)o->rows * j0;
        if (o->transposed) {
            load_transposed(dst, tw, src + (long)j0 * o->rows, tw, o->rows, scratch, scratch_floats);
        } else {
            ef_hal_dma_wait(ef_hal_dma_in_2d(dst, src + j0, FLOAT_BYTES * (uint32_t)tw, (uint32_t)o->rows,
                                             FLOAT_BYTES * (uint32_t)o->cols));
        }
    }
}

static void operand_fetch(operand_t *o, long step, int b) {
    const int t = (int)(step % o->tiles), j0 = t * o->tile, tw = tile_width(o, t);
    if (o->transposed)       /* tw rows of Pᵀ: consecutive */
        o->load[b] = ef_hal_dma_in(o->stage, o->src + (long)j0 * o->rows, FLOAT_BYTES * (uint32_t)(tw * o->rows));
    else                     /* rows x tw of P */
        o->load[b] = ef_hal_dma_in_2d(o->buf[b], o->src + j0, FLOAT_BYTES * (uint32_t)tw, (uint32_t)o->rows,
                                      FLOAT_BYTES * (uint32_t)o->cols);
}

/* Tile t (rows x its width, dense) in L1. A streamed operand hands out its sequence in order and loads the next
 * tile while this one is used (a transposed one once the cores have moved this one out of the stage). */
static const float *operand_tile(operand_t *o, int t) {
    if (o->resident) return o->res + (long)o->rows * t * o->tile;
    const int b = (int)(o->step & 1);
    if (o->step == 0) operand_fetch(o, 0, 0);
    ef_hal_dma_wait(o->load[b]);
    if (o->transposed) transpose(o->buf[b], tile_width(o, t), o->stage, tile_width(o, t), o->rows, 1.0f);
    if (o->step + 1 < o->steps) operand_fetch(o, o->step + 1, b ^ 1);
    o->step++;
    return o->buf[b];
}

/* ---- row panels in, output tiles out -------------------------------------------------------------------- */
typedef struct {
    const float *src;      /* L2 rows of `cols` floats */
    int cols, bufs;
    float *buf[2];
    ef_hal_dma_t load[2];
} panels_t;

typedef struct {
    int rows, mt, panels, total;   /* rows per device, panel rows, panels per device, panels of the call */
} rows_t;

static int panel_rows(const rows_t *g, long panel) {
    return min_int(g->mt, g->rows - (int)(panel % g->panels) * g->mt);
}

static long panel_row0(const rows_t *g, long panel) {
    return (panel / g->panels) * (long)g->rows + (panel % g->panels) * (long)g->mt;
}

static void panel_fetch(panels_t *p, const rows_t *g, long panel, int b) {
    const uint32_t row_bytes = FLOAT_BYTES * (uint32_t)p->cols;
    p->load[b] = ef_hal_dma_in_2d(p->buf[b], p->src + panel_row0(g, panel) * p->cols, row_bytes,
                                  (uint32_t)panel_rows(g, panel), row_bytes);
}

/* Panel `panel` in L1; with two buffers the next panel starts loading. */
static const float *panel_in(panels_t *p, const rows_t *g, long panel) {
    const int b = p->bufs == 2 ? (int)(panel & 1) : 0;
    if (panel == 0 || p->bufs == 1) panel_fetch(p, g, panel, b);
    ef_hal_dma_wait(p->load[b]);
    if (p->bufs == 2 && panel + 1 < g->total) panel_fetch(p, g, panel + 1, b ^ 1);
    return p->buf[b];
}

typedef struct {
    float *z[2];
    int bufs, next;
    ef_hal_dma_t store[2];
    int storing[2];
} tiles_out_t;

static float *out_acquire(tiles_out_t *o) {
    const int b = o->next;
    if (o->storing[b]) ef_hal_dma_wait(o->store[b]);   /* the buffer's previous tile must have left L1 */
    o->storing[b] = 0;
    return o->z[b];
}

static void out_store(tiles_out_t *o, float *l2, int cols, int rows, int l2_cols) {
    const int b = o->next;
    o->store[b] = ef_hal_dma_out_2d(l2, o->z[b], FLOAT_BYTES * (uint32_t)cols, (uint32_t)rows,
                                    FLOAT_BYTES * (uint32_t)l2_cols);
    o->storing[b] = 1;
    o->next = (b + 1) % o->bufs;
}

static void out_drain(tiles_out_t *o) {
    for (int b = 0; b < 2; b++) {
        if (o->storing[b]) ef_hal_dma_wait(o->store[b]);
        o->storing[b] = 0;
    }
}

/* ---- one call: sizes, plan, buffers --------------------------------------------------------------------- */
typedef struct {
    int m, n, k, r, devices, trans_b;
    float scale;
    int backward, dx, da, db;      /* backward: which gradients */
    ef_hal_lora_plan_t plan;
    rows_t g;
    operand_t p, q, l, as;         /* the table at the top; as: A for S in the backward's dB */
    panels_t in, xin;              /* the panels of x (forward) or dY (backward); x's in the backward */
    tiles_out_t out;
    float *low, *s, *st, *acc_a, *acc_b, *scratch;
    long scratch_floats;
} lora_t;

static int has_tiles(const lora_t *L) { return !L->backward || L->dx; }   /* an output walked in column tiles */

static int has_low(const lora_t *L) { return !L->backward || L->dx || L->da; }

/* The operands' shapes for the plan (no buffers). */
static void shape_operands(lora_t *L) {
    const ef_hal_lora_plan_t *pl = &L->plan;
    const int fwd = !L->backward;
    const int R = fwd ? L->k : L->n, C = fwd ? L->n : L->k;
    operand_init(&L->p, R, C, pl->nt, fwd ? L->trans_b : !L->trans_b, pl->w_resident);
    operand_init(&L->q, L->r, C, pl->nt, !fwd, 1);
    operand_init(&L->l, R, L->r, L->r, !fwd, 1);
    operand_init(&L->as, L->k, L->r, L->r, 0, 1);
    L->g.rows = L->m / L->devices, L->g.mt = pl->mt;
    L->g.panels = (L->g.rows + pl->mt - 1) / pl->mt, L->g.total = L->g.panels * L->devices;
    L->in.cols = R, L->xin.cols = L->k;
    L->in.bufs = L->xin.bufs = pl->in_buffers;
    L->out.bufs = (long)L->g.total * L->p.tiles > 1 ? 2 : 1, L->out.next = 0;
    L->p.steps = (long)L->g.total * L->p.tiles;
}

typedef struct {
    uint64_t bytes;
    int real, failed;
} arena_t;

static float *take(arena_t *a, uint64_t floats) {
    const uint64_t bytes = padded(FLOAT_BYTES * floats);
    a->bytes += bytes;
    if (!a->real) return NULL;
    float *p = bytes <= UINT32_MAX ? (float *)ef_hal_l1_alloc((uint32_t)bytes) : NULL;
    if (!p) a->failed = 1;
    return p;
}

/* The L1 buffers of the plan, in allocation order: the bytes they take, or (real) the buffers themselves. */
static uint64_t layout(lora_t *L, int real) {
    arena_t a = {0, real, 0};
    const uint64_t mt = (uint64_t)L->plan.mt, k = (uint64_t)L->k, n = (uint64_t)L->n, r = (uint64_t)L->r;
    int stage_rows = 0;                            /* the longest row a transposing resident load moves */
    shape_operands(L);
    if (has_tiles(L)) {
        operand_t *p = &L->p;
        if (p->resident) {
            p->res = take(&a, (uint64_t)p->rows * (uint64_t)p->cols);
            if (p->transposed) stage_rows = p->rows;
        } else {
            for (int b = 0; b < 2; b++) p->buf[b] = take(&a, (uint64_t)p->rows * (uint64_t)p->tile);
            if (p->transposed) p->stage = take(&a, (uint64_t)p->rows * (uint64_t)p->tile);
        }
        L->q.res = take(&a, r * (uint64_t)L->q.cols);
        if (L->q.transposed) stage_rows = max_int(stage_rows, L->q.rows);
    }
    if (has_low(L)) {
        L->l.res = take(&a, (uint64_t)L->l.rows * r);
        if (L->l.transposed) stage_rows = max_int(stage_rows, L->l.rows);
    }
    if (L->db) L->as.res = take(&a, k * r);
    if (L->da) L->acc_a = take(&a, k * r);
    if (L->db) L->acc_b = take(&a, r * n);
    for (int b = 0; b < L->plan.in_buffers; b++) {
        L->in.buf[b] = take(&a, mt * (uint64_t)L->in.cols);
        if (L->da || L->db) L->xin.buf[b] = take(&a, mt * k);
    }
    if (has_low(L)) L->low = take(&a, mt * r);
    if (L->db) {
        L->s = take(&a, mt * r);
        L->st = take(&a, r * mt);
    }
    if (has_tiles(L)) {
        for (int b = 0; b < L->out.bufs; b++) L->out.z[b] = take(&a, mt * (uint64_t)L->plan.nt);
    }
    L->scratch_floats = 0;
    if (stage_rows) {                              /* last: on the real run it takes what L1 has left, if useful */
        uint64_t floats = (uint64_t)STAGE_ROWS * (uint64_t)stage_rows;
        if (real) {
            const uint64_t spare = (ef_hal_l1_free_bytes() & ~(uint64_t)(L1_ALIGN_BYTES - 1)) / FLOAT_BYTES;
            const uint64_t useful = (uint64_t)stage_rows * (uint64_t)max_int(max_int(L->k, L->n), L->r);
            const uint64_t more = spare < useful ? spare : useful;
            if (more > floats) floats = more;
        }
        L->scratch = take(&a, floats);
        L->scratch_floats = (long)floats;
    }
    L->plan.l1_bytes = a.bytes > UINT32_MAX ? UINT32_MAX : (uint32_t)a.bytes;
    return a.failed ? UINT64_MAX : a.bytes;
}

/* Whether the plan (mt, nt, resident), panels single-buffered, fits `l1_bytes` (it becomes L's plan). */
static int fits(lora_t *L, int mt, int nt, int resident, uint32_t l1_bytes) {
    L->plan.mt = mt, L->plan.nt = nt, L->plan.w_resident = resident, L->plan.in_buffers = 1;
    return layout(L, 0) <= l1_bytes;
}

/* The largest value in [lo, hi] of the panel (vary_mt) or the tile for which fits() holds, given it holds at lo
 * (the bytes grow with both). */
static int largest_fit(lora_t *L, int lo, int hi, int other, int vary_mt, int resident, uint32_t l1_bytes) {
    while (lo < hi) {
        const int mid = lo + (hi - lo + 1) / 2;
        if (fits(L, vary_mt ? mid : other, vary_mt ? other : mid, resident, l1_bytes)) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* The smallest size that cuts `whole` into as many parts as `size` does (equal parts, less L1). */
static int balanced(int size, int whole) {
    const int parts = (whole + size - 1) / size;
    return (whole + parts - 1) / parts;
}

/* The plan for `l1_bytes`: P resident if it fits, else streamed. For each tile width from the first (all columns
 * for a resident P, TILE_FLOOR for a streamed one: it is read once per panel, so the panel matters most), halving
 * to 1, the panel grows as far as it fits; the pair with the largest panel x tile area wins (the wider panel on a
 * tie: fewer reads of a streamed P). The tile then widens into what L1 has left, both are evened out, and the
 * panels are double-buffered if that fits too. 0 (plan.mt == 0): nothing fits, or a size exceeds 16 bits. */
static int choose_plan(lora_t *L, uint32_t l1_bytes) {
    memset(&L->plan, 0, sizeof L->plan);
    if (L->m <= 0 || L->n <= 0 || L->k <= 0 || L->r <= 0 || L->devices <= 0 || L->m % L->devices ||
        L->n > REDMULE_MAX_DIM || L->k > REDMULE_MAX_DIM || L->r > REDMULE_MAX_DIM)
        return 0;
    const int cols = L->backward ? L->k : L->n, rows = min_int(L->m / L->devices, REDMULE_MAX_DIM);
    for (int resident = has_tiles(L); resident >= 0; resident--) {
        int mt = 0, nt = 0;
        const int first = !has_tiles(L) || resident ? cols : min_int(cols, TILE_FLOOR);
        for (int t = first;; t = (t + 1) / 2) {
            if (fits(L, 1, t, resident, l1_bytes)) {
                const int m_t = largest_fit(L, 1, rows, t, 1, resident, l1_bytes);
                if ((long)m_t * t > (long)mt * nt || ((long)m_t * t == (long)mt * nt && m_t > mt)) mt = m_t, nt = t;
            }
            if (t == 1 || !has_tiles(L)) break;
        }
        if (!mt) continue;
        mt = balanced(mt, rows);
        if (has_tiles(L)) nt = balanced(largest_fit(L, nt, cols, mt, 0, resident, l1_bytes), cols);
        fits(L, mt, nt, resident, l1_bytes);
        if (L->g.total > 1) {
            L->plan.in_buffers = 2;
            if (layout(L, 0) > l1_bytes) fits(L, mt, nt, resident, l1_bytes);
        }
        return 1;
    }
    memset(&L->plan, 0, sizeof L->plan);
    return 0;
}

static lora_t lora_call(int m, int n, int k, int r, int devices, int trans_b, float scale, int backward, int dx, int da,
                        int db) {
    lora_t L;
    memset(&L, 0, sizeof L);
    L.m = m, L.n = n, L.k = k, L.r = r, L.devices = devices, L.trans_b = trans_b != 0, L.scale = scale;
    L.backward = backward, L.dx = dx != 0, L.da = da != 0, L.db = db != 0;
    return L;
}

ef_hal_lora_plan_t ef_hal_lora_linear_plan(int m, int n, int k, int r, int devices, int trans_b, uint32_t l1_bytes) {
    lora_t L = lora_call(m, n, k, r, devices, trans_b, 1.0f, 0, 0, 0, 0);
    choose_plan(&L, l1_bytes);
    return L.plan;
}

ef_hal_lora_plan_t ef_hal_lora_linear_grad_plan(int m, int n, int k, int r, int devices, int trans_b, int dx, int da,
                                                int db, uint32_t l1_bytes) {
    lora_t L = lora_call(m, n, k, r, devices, trans_b, 1.0f, 1, dx, da, db);
    choose_plan(&L, l1_bytes);
    return L.plan;
}

/* Plan and allocate; 0 when the core kernel has to run instead (the mark then needs no release). */
static int lora_begin(lora_t *L, uint32_t *mark) {
    ef_hal_init();
    if (!choose_plan(L, ef_hal_l1_free_bytes())) return 0;
    *mark = ef_hal_l1_mark();
    if (layout(L, 1) == UINT64_MAX) {
        ef_hal_l1_release(*mark);
        return 0;
    }
    return 1;
}

/* ---- the walk ------------------------------------------------------------------------------------------- */
/* low (mt x r) = scale·(panel·L) */
static void low_rank(lora_t *L, const float *panel, int mt) {
    cores(L->low, panel, L->l.rows, 1, L->l.res, NULL, mt, L->l.rows, L->r);
    if (L->scale != 1.0f) {
        scale_arg_t s = {L->low, (long)mt * L->r, L->scale};
        ef_hal_fork(0, scale_task, &s);
    }
}

/* out[row0.., all columns] = alpha·panel·P (+ beta·C) + low·Q, column tile by column tile. */
static void column_tiles(lora_t *L, const float *panel, long row0, int mt, float *out, const float *c, int c_rs,
                         int c_cs, float alpha, float beta) {
    const int cols = L->p.cols;
    for (int t = 0; t < L->p.tiles; t++) {
        const int j0 = t * L->p.tile, tw = tile_width(&L->p, t);
        const float *pt = operand_tile(&L->p, t);
        float *z = out_acquire(&L->out);
        redmule(z, panel, pt, NULL, mt, L->p.rows, tw);
        if (alpha != 1.0f || c) {
            ef_hal_epilogue_t e = {z, mt, tw, tw, c ? c + row0 * c_rs + (long)j0 * c_cs : NULL, c_rs, c_cs, alpha,
                                   beta};
            ef_hal_fork(0, ef_hal_epilogue_task, &e);
        }
        redmule(z, L->low, operand_tile(&L->q, t), z, mt, L->r, tw);
        out_store(&L->out, out + row0 * cols + j0, tw, mt, cols);
    }
}

void ef_hal_lora_linear(float *y, const float *x, const float *w, const float *a, const float *b, const float *c,
                        int m, int n, int k, int r, int devices, int trans_b, float alpha, float beta, int c_rs,
                        int c_cs, float scale) {
    lora_t L = lora_call(m, n, k, r, devices, trans_b, scale, 0, 0, 0, 0);
    uint32_t mark = 0;
    if (!lora_begin(&L, &mark)) {
        ef_lora_linear(y, x, w, a, b, c, m, n, k, r, devices, trans_b, alpha, beta, c_rs, c_cs, scale);
        return;
    }
    L.p.src = w, L.in.src = x;
    if (L.p.resident) operand_load(&L.p, w, L.scratch, L.scratch_floats);
    for (int d = 0; d < devices; d++) {
        operand_load(&L.l, a + (long)d * k * r, L.scratch, L.scratch_floats);   /* A_d */
        operand_load(&L.q, b + (long)d * r * n, L.scratch, L.scratch_floats);   /* B_d */
        for (int i = 0; i < L.g.panels; i++) {
            const long panel = (long)d * L.g.panels + i, row0 = panel_row0(&L.g, panel);
            const int mt = panel_rows(&L.g, panel);
            const float *xp = panel_in(&L.in, &L.g, panel);
            low_rank(&L, xp, mt);                                                /* S = scale·x·A_d */
            column_tiles(&L, xp, row0, mt, y, c, c_rs, c_cs, alpha, beta);
        }
    }
    out_drain(&L.out);
    ef_hal_l1_release(mark);
}

/* One pass over the rows for the gradients that are not NULL; 0 when its buffers do not fit the free L1. */
static int grad_pass(float *dx, float *da, float *db, const float *dy, const float *x, const float *w, const float *a,
                     const float *b, int m, int n, int k, int r, int devices, int trans_b, float alpha, float scale) {
    lora_t L = lora_call(m, n, k, r, devices, trans_b, scale, 1, dx != NULL, da != NULL, db != NULL);
    uint32_t mark = 0;
    if (!lora_begin(&L, &mark)) return 0;
    L.p.src = w, L.in.src = dy, L.xin.src = x;
    if (L.dx && L.p.resident) operand_load(&L.p, w, L.scratch, L.scratch_floats);   /* W'ᵀ */
    ef_hal_dma_t acc_store[2] = {0, 0};
    int storing = 0;
    for (int d = 0; d < devices; d++) {
        const float *ad = a + (long)d * k * r, *bd = b + (long)d * r * n;
        if (L.dx) operand_load(&L.q, ad, L.scratch, L.scratch_floats);         /* A_dᵀ */
        if (has_low(&L)) operand_load(&L.l, bd, L.scratch, L.scratch_floats);  /* B_dᵀ */
        if (L.db) operand_load(&L.as, ad, L.scratch, L.scratch_floats);        /* A_d */
        if (storing) {                 /* the previous device's dA and dB must have left L1 */
            if (L.da) ef_hal_dma_wait(acc_store[0]);
            if (L.db) ef_hal_dma_wait(acc_store[1]);
            storing = 0;
        }
        for (int i = 0; i < L.g.panels; i++) {
            const long panel = (long)d * L.g.panels + i, row0 = panel_row0(&L.g, panel);
            const int mt = panel_rows(&L.g, panel);
            const float *dyp = panel_in(&L.in, &L.g, panel);
            const float *xp = L.da || L.db ? panel_in(&L.xin, &L.g, panel) : NULL;
            if (has_low(&L)) low_rank(&L, dyp, mt);                            /* dS = scale·dY·B_dᵀ */
            if (L.dx) column_tiles(&L, dyp, row0, mt, dx, NULL, 0, 0, alpha, 1.0f);
            if (L.da) {                                                        /* dA_d += xᵀ·dS */
                cores(L.acc_a, xp, 1, k, L.low, i ? L.acc_a : NULL, k, mt, r);
            }
            if (L.db) {                                                        /* dB_d += Sᵀ·dY */
                cores(L.s, xp, k, 1, L.as.res, NULL, mt, k, r);
                transpose(L.st, mt, L.s, mt, r, scale);                        /* Sᵀ = scale·(x·A_d)ᵀ */
                redmule(L.acc_b, L.st, dyp, i ? L.acc_b : NULL, r, mt, n);
            }
        }
        if (L.da) acc_store[0] = ef_hal_dma_out(da + (long)d * k * r, L.acc_a, FLOAT_BYTES * (uint32_t)(k * r));
        if (L.db) acc_store[1] = ef_hal_dma_out(db + (long)d * r * n, L.acc_b, FLOAT_BYTES * (uint32_t)(r * n));
        storing = 1;
    }
    if (L.da) ef_hal_dma_wait(acc_store[0]);
    if (L.db) ef_hal_dma_wait(acc_store[1]);
    out_drain(&L.out);
    ef_hal_l1_release(mark);
    return 1;
}

/* All wanted gradients in one pass if its buffers fit; else dX in one pass and dA, dB in another (each reads dY
 * again), else a pass per gradient; a gradient no pass fits runs on the core kernel. */
void ef_hal_lora_linear_grad(float *dx, float *da, float *db, const float *dy, const float *x, const float *w,
                             const float *a, const float *b, int m, int n, int k, int r, int devices, int trans_b,
                             float alpha, float scale) {
    const int wanted = (dx != NULL) + (da != NULL) + (db != NULL);
    if (!wanted || grad_pass(dx, da, db, dy, x, w, a, b, m, n, k, r, devices, trans_b, alpha, scale)) return;
    if (wanted == 1) {
        ef_lora_linear_grad(dx, da, db, dy, x, w, a, b, m, n, k, r, devices, trans_b, alpha, scale);
    } else if (dx) {
        ef_hal_lora_linear_grad(dx, NULL, NULL, dy, x, w, a, b, m, n, k, r, devices, trans_b, alpha, scale);
        ef_hal_lora_linear_grad(NULL, da, db, dy, x, w, a, b, m, n, k, r, devices, trans_b, alpha, scale);
    } else {
        ef_hal_lora_linear_grad(NULL, da, NULL, dy, x, w, a, b, m, n, k, r, devices, trans_b, alpha, scale);
        ef_hal_lora_linear_grad(NULL, NULL, db, dy, x, w, a, b, m, n, k, r, devices, trans_b, alpha, scale);
    }
}
