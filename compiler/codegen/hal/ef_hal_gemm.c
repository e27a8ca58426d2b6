/* ef_hal_gemm / ef_hal_mat_mul: the ef_gemm / ef_mat_mul ABI run as RedMulE jobs on L1 tiles.
 *
 * Y (m x n) = alpha A'B' + beta C is cut into tiles (mt, nt, kt) and walked output-stationary: for every output
 * tile, for every k tile, the DMA brings the A' and B' tiles into L1 (double-buffered: the next tile pair loads
 * while RedMulE computes this one), RedMulE computes Z = X W on the first k tile and Z = X W + Z on the others,
 * and after the last k tile the cores apply alpha and C (in L1; C is read where it lies) and the DMA writes the Z
 * tile back (double-buffered too). A transposed operand is moved as stored and transposed by the cores in L1
 * (RedMulE reads dense row-major matrices only).
 *
 * Numerics: every element is the sequential float sum over k from 0 (k tiles in order, each continuing the
 * previous partial sum), then alpha, then C: the same operations in the same order as ef_gemm's loops.
 * Written against ef_hal.h only, so the generic HAL (host, rv32-qemu) runs the very code the pulp HAL runs.
 */
#include <stddef.h>
#include <string.h>

#include "ef_hal.h"
#include "ef_hal_tasks.h"
#include "ef_kernels.h"

#define L1_ALIGN_BYTES 16u
#define REDMULE_MAX_DIM 0xFFFF   /* RedMulE's size fields are 16 bits wide */
#define FLOAT_BYTES 4u

static int min_int(int a, int b) { return a < b ? a : b; }

static uint64_t padded(uint64_t bytes) { return (bytes + L1_ALIGN_BYTES - 1) & ~(uint64_t)(L1_ALIGN_BYTES - 1); }

uint32_t ef_hal_gemm_l1_bytes(ef_hal_tile_t t, int trans_a, int trans_b) {
    const uint64_t x = padded(FLOAT_BYTES * (uint64_t)t.m * (uint64_t)t.k);
    const uint64_t w = padded(FLOAT_BYTES * (uint64_t)t.k * (uint64_t)t.n);
    const uint64_t z = padded(FLOAT_BYTES * (uint64_t)t.m * (uint64_t)t.n);
    uint64_t total = 2 * (x + w + z);           /* two of each: double buffering */
    if (trans_a) total += 2 * x;                /* staging: the A tile as stored, before the transpose */
    if (trans_b) total += 2 * w;
    return total > UINT32_MAX ? UINT32_MAX : (uint32_t)total;
}

static int clamp_dim(int d) { return d < 1 ? 1 : (d > REDMULE_MAX_DIM ? REDMULE_MAX_DIM : d); }

ef_hal_tile_t ef_hal_gemm_tile(int m, int n, int k, int trans_a, int trans_b, uint32_t l1_bytes) {
    ef_hal_tile_t t = {clamp_dim(m), clamp_dim(n), clamp_dim(k)};
    while (ef_hal_gemm_l1_bytes(t, trans_a, trans_b) > l1_bytes && (t.m > 1 || t.n > 1 || t.k > 1)) {
        int *side = &t.m;                       /* halve the largest side; k only when strictly largest */
        if (t.n > *side) side = &t.n;
        if (t.k > *side) side = &t.k;
        *side = (*side + 1) / 2;
    }
    return t;
}

/* ---- work for the cores ------------------------------------------------------------------------------- */
typedef struct {
    float *dst;            /* cols x rows */
    const float *src;      /* rows x cols */
    int rows, cols;
} transpose_arg_t;

static void transpose_task(void *arg) {
    const transpose_arg_t *t = (const transpose_arg_t *)arg;
    const int team = ef_hal_team_size();
    for (int c = ef_hal_core_id(); c < t->cols; c += team) {
        float *d = t->dst + (long)c * t->rows;
        for (int r = 0; r < t->rows; r++) d[r] = t->src[(long)r * t->cols + c];
    }
}

/* ---- the tiled GEMM ---------------------------------------------------------------------------------- */
typedef struct {
    float *y;
    const float *a, *b, *c;
    int m, n, k, trans_a, trans_b, c_rs, c_cs;
    float alpha, beta;
    ef_hal_tile_t t;
    int tiles_n, tiles_k, steps;
    float *x[2], *w[2], *z[2], *stage_a[2], *stage_b[2];
    ef_hal_dma_t loads[2][2];
    ef_hal_dma_t store[2];
    int storing[2];
} gemm_plan_t;

typedef struct {
    int i0, j0, k0, mt, nt, kt, tk, out;
} tile_pos_t;

static tile_pos_t tile_at(const gemm_plan_t *p, int step) {
    tile_pos_t at;
    at.tk = step % p->tiles_k;
    const int out = step / p->tiles_k;
    at.out = out;
    at.i0 = (out / p->tiles_n) * p->t.m;
    at.j0 = (out % p->tiles_n) * p->t.n;
    at.k0 = at.tk * p->t.k;
    at.mt = min_int(p->t.m, p->m - at.i0);
    at.nt = min_int(p->t.n, p->n - at.j0);
    at.kt = min_int(p->t.k, p->k - at.k0);
    return at;
}

static void load_tiles(gemm_plan_t *p, int step, int buf) {
    const tile_pos_t at = tile_at(p, step);
    const uint32_t f = FLOAT_BYTES;
    if (!p->trans_a)        /* A (m, k): mt rows of kt */
        p->loads[buf][0] = ef_hal_dma_in_2d(p->x[buf], p->a + (long)at.i0 * p->k + at.k0, at.kt * f, at.mt, p->k * f);
    else                    /* A stored (k, m): kt rows of mt, transposed later */
        p->loads[buf][0] = ef_hal_dma_in_2d(p->stage_a[buf], p->a + (long)at.k0 * p->m + at.i0, at.mt * f, at.kt,
                                            p->m * f);
    if (!p->trans_b)        /* B (k, n): kt rows of nt */
        p->loads[buf][1] = ef_hal_dma_in_2d(p->w[buf], p->b + (long)at.k0 * p->n + at.j0, at.nt * f, at.kt, p->n * f);
    else                    /* B stored (n, k): nt rows of kt */
        p->loads[buf][1] = ef_hal_dma_in_2d(p->stage_b[buf], p->b + (long)at.j0 * p->k + at.k0, at.kt * f, at.nt,
                                            p->k * f);
}

static void compute_tile(gemm_plan_t *p, int step, int buf) {
    const tile_pos_t at = tile_at(p, step);
    if (p->trans_a) {
        transpose_arg_t t = {p->x[buf], p->stage_a[buf], at.kt, at.mt};
        ef_hal_fork(0, transpose_task, &t);
    }
    if (p->trans_b) {
        transpose_arg_t t = {p->w[buf], p->stage_b[buf], at.nt, at.kt};
        ef_hal_fork(0, transpose_task, &t);
    }
    const int zb = at.out & 1;
    if (at.tk == 0 && p->storing[zb]) {   /* the Z buffer's previous tile must have left L1 */
        ef_hal_dma_wait(p->store[zb]);
        p->storing[zb] = 0;
    }
    ef_hal_redmule_job_t job = {p->z[zb], p->x[buf], p->w[buf], at.tk == 0 ? NULL : p->z[zb],
                                (uint16_t)at.mt, (uint16_t)at.kt, (uint16_t)at.nt};
    ef_hal_redmule_start(&job);
    ef_hal_redmule_wait();
    if (at.tk != p->tiles_k - 1) return;
    if (p->alpha != 1.0f || p->c) {
        ef_hal_epilogue_t e = {p->z[zb], at.mt, at.nt, at.nt,
                            p->c ? p->c + (long)at.i0 * p->c_rs + (long)at.j0 * p->c_cs : NULL, p->c_rs, p->c_cs,
                            p->alpha, p->beta};
        ef_hal_fork(0, ef_hal_epilogue_task, &e);
    }
    p->store[zb] = ef_hal_dma_out_2d(p->y + (long)at.i0 * p->n + at.j0, p->z[zb], at.nt * FLOAT_BYTES, at.mt,
                                     p->n * FLOAT_BYTES);
    p->storing[zb] = 1;
}

static float *alloc_floats(int count) {
    return (float *)ef_hal_l1_alloc(FLOAT_BYTES * (uint32_t)count);
}

int ef_hal_gemm_tiled(float *y, const float *a, const float *b, const float *c, int m, int n, int k, int trans_a,
                      int trans_b, float alpha, float beta, int c_rs, int c_cs, ef_hal_tile_t tile) {
    if (m <= 0 || n <= 0) return 0;
    if (k <= 0) {           /* no products: Y = alpha 0 + beta C, on this core */
        for (long i = 0; i < (long)m * n; i++) y[i] = 0.0f;
        ef_hal_epilogue_t e = {y, m, n, n, c, c_rs, c_cs, alpha, beta};
        ef_hal_fork(1, ef_hal_epilogue_task, &e);
        return 0;
    }
    gemm_plan_t p;
    memset(&p, 0, sizeof p);
    p.y = y, p.a = a, p.b = b, p.c = c, p.m = m, p.n = n, p.k = k, p.trans_a = trans_a != 0;
    p.trans_b = trans_b != 0, p.c_rs = c_rs, p.c_cs = c_cs, p.alpha = alpha, p.beta = beta;
    p.t.m = min_int(clamp_dim(tile.m), m), p.t.n = min_int(clamp_dim(tile.n), n), p.t.k = min_int(clamp_dim(tile.k), k);
    if (ef_hal_gemm_l1_bytes(p.t, p.trans_a, p.trans_b) > ef_hal_l1_free_bytes()) return -1;
    const uint32_t mark = ef_hal_l1_mark();
    for (int i = 0; i < 2; i++) {
        p.x[i] = alloc_floats(p.t.m * p.t.k);
        p.w[i] = alloc_floats(p.t.k * p.t.n);
        p.z[i] = alloc_floats(p.t.m * p.t.n);
        if (p.trans_a) p.stage_a[i] = alloc_floats(p.t.m * p.t.k);
        if (p.trans_b) p.stage_b[i] = alloc_floats(p.t.k * p.t.n);
        if (!p.x[i] || !p.w[i] || !p.z[i] || (p.trans_a && !p.stage_a[i]) || (p.trans_b && !p.stage_b[i])) {
            ef_hal_l1_release(mark);
            return -1;
        }
    }
    const int tiles_m = (m + p.t.m - 1) / p.t.m;
    p.tiles_n = (n + p.t.n - 1) / p.t.n;
    p.tiles_k = (k + p.t.k - 1) / p.t.k;
    p.steps = tiles_m * p.tiles_n * p.tiles_k;

    load_tiles(&p, 0, 0);
    for (int step = 0; step < p.steps; step++) {
        const int buf = step & 1;
        ef_hal_dma_wait(p.loads[buf][0]);
        ef_hal_dma_wait(p.loads[buf][1]);
        if (step + 1 < p.steps) load_tiles(&p, step + 1, buf ^ 1);   /* overlaps this step's compute */
        compute_tile(&p, step, buf);
    }
    for (int zb = 0; zb < 2; zb++) {
        if (p.storing[zb]) ef_hal_dma_wait(p.store[zb]);
    }
    ef_hal_l1_release(mark);
    return 0;
}

void ef_hal_gemm(float *y, const float *a, const float *b, const float *c, int m, int n, int k, int trans_a,
                 int trans_b, float alpha, float beta, int c_rs, int c_cs) {
    ef_hal_init();
    const ef_hal_tile_t t = ef_hal_gemm_tile(m, n, k, trans_a, trans_b, ef_hal_l1_free_bytes());
    if (ef_hal_gemm_tiled(y, a, b, c, m, n, k, trans_a, trans_b, alpha, beta, c_rs, c_cs, t) != 0) {
        /* not even a 1 x 1 x 1 tile fits the free L1: the core kernel, reading L2 directly */
        ef_gemm(y, a, b, c, m, n, k, trans_a, trans_b, alpha, beta, c_rs, c_cs);
    }
}

void ef_hal_mat_mul(float *y, const float *a, const float *b, int m, int n, int k, int brank, const int *bshape,
                    const int *sa, const int *sb) {
    int idx[EF_MAX_RANK] = {0};
    long batches = 1, offa = 0, offb = 0;
    for (int d = 0; d < brank; d++) batches *= bshape[d];
    for (long t = 0; t < batches; t++) {
        ef_hal_gemm(y + t * m * n, a + offa, b + offb, NULL, m, n, k, 0, 0, 1.0f, 1.0f, 0, 0);
        for (int d = brank - 1; d >= 0; d--) {
            offa += sa[d];
            offb += sb[d];
            if (++idx[d] < bshape[d]) break;
            offa -= (long)sa[d] * bshape[d];
            offb -= (long)sb[d] * bshape[d];
            idx[d] = 0;
        }
    }
}
