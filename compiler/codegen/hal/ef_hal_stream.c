/* The non-GEMM kernels on the cluster: the ef_<op> ABI of kernels/ef_kernels.h run as ef_hal_<op>, streamed through
 * L1 and split over every core, as the cycle model charges them (compiler/targets/tiling.py, _best_streaming).
 *
 * A step is `rows` rows of work. Its large operands are streams: row r of a stream lies at l2 + r * stride in L2
 * and is `row_bytes` long; small operands the rows share (a bias, LayerNorm's scale, SGD's rate) are loaded into L1
 * once before the first tile (resident). The rows are cut into tiles of as many rows as fit the free L1 twice over:
 * tile t+1 loads while the cores compute tile t and tile t-1 stores (double buffering). Every tile is one fork:
 * each core runs the core kernel (kernels/) on its share of the tile's rows, in L1. Reductions (ReduceSumTo,
 * LayerNorm's scale gradient) accumulate a partial result per core in L1 and sum the partials at the end.
 *
 * Numerics: each element goes through the core kernel's own operations; with one core the sums run in the core
 * kernel's order too (a partial per core, rows in order). When a row does not fit L1 the core kernel runs as is.
 * Written against ef_hal.h only, so the generic HAL (host, rv32-qemu) runs the very code the pulp HAL runs.
 */
#include <stddef.h>
#include <string.h>

#include "ef_hal.h"
#include "ef_hal_stream.h"
#include "ef_kernels.h"

#define MAX_STREAMS 4
#define RESIDENT_FRACTION 16u   /* a broadcast operand up to 1/16 of the free L1 is kept resident (tiling.py) */
#define L1_ALIGN_BYTES 16u
#define FLOAT_BYTES 4u
#define MIN_CHUNK 16             /* elements: shorter rows of work cost more in calls than they save */

enum { IN = 1, OUT = 2, INOUT = 3 };

typedef struct stream_op stream_op_t;
/* One core's share of a tile: rows [row0, row0 + rows) of the step; l1[s] is stream s at row row0. */
typedef void (*stream_body_t)(const stream_op_t *op, void *const *l1, long row0, int rows, int core);

struct stream_op {
    long rows;
    int streams;
    void *l2[MAX_STREAMS];
    uint32_t row_bytes[MAX_STREAMS];
    uint32_t stride[MAX_STREAMS];   /* bytes from one row to the next in L2 */
    uint8_t dir[MAX_STREAMS];
    stream_body_t body;
    const void *ctx;                /* the op's arguments */
    uint32_t core_scratch_bytes;    /* zeroed L1 scratch per core (partial results), 0: none */
    uint8_t *scratch;               /* set by stream_run: core c's at scratch + c * core_scratch_bytes */
};

static void add_stream(stream_op_t *op, const void *l2, uint32_t row_bytes, uint32_t stride, int dir) {
    const int s = op->streams++;
    op->l2[s] = (void *)(uintptr_t)l2;
    op->row_bytes[s] = row_bytes;
    op->stride[s] = stride;
    op->dir[s] = (uint8_t)dir;
}

static uint32_t padded(uint32_t bytes) { return (bytes + L1_ALIGN_BYTES - 1) & ~(L1_ALIGN_BYTES - 1); }

/* A small operand in L1 for the whole step (NULL when it does not fit: the cores then read it where it lies). */
static const void *resident(const void *l2, uint32_t bytes) {
    if (!l2 || !bytes || bytes > ef_hal_l1_free_bytes() / RESIDENT_FRACTION) return l2;
    void *l1 = ef_hal_l1_alloc(bytes);
    if (!l1) return l2;
    ef_hal_dma_wait(ef_hal_dma_in(l1, l2, bytes));
    return l1;
}

typedef struct {
    const stream_op_t *op;
    void *l1[MAX_STREAMS];
    long row0;
    int rows;
} tile_t;

static void tile_task(void *arg) {
    const tile_t *t = (const tile_t *)arg;
    const stream_op_t *op = t->op;
    const int cores = ef_hal_team_size(), me = ef_hal_core_id();
    const int lo = (int)((long)t->rows * me / cores), hi = (int)((long)t->rows * (me + 1) / cores);
    if (hi <= lo) return;
    void *l1[MAX_STREAMS];
    for (int s = 0; s < op->streams; s++) l1[s] = (uint8_t *)t->l1[s] + (uint32_t)lo * op->row_bytes[s];
    op->body(op, l1, t->row0 + lo, hi - lo, me);
}

static ef_hal_dma_t move(const stream_op_t *op, int s, void *l1, long row0, int rows, int in) {
    uint8_t *l2 = (uint8_t *)op->l2[s] + (uint32_t)row0 * op->stride[s];
    const uint32_t rb = op->row_bytes[s];
    if (op->stride[s] == rb || rows == 1) return in ? ef_hal_dma_in(l1, l2, rb * (uint32_t)rows)
                                                    : ef_hal_dma_out(l2, l1, rb * (uint32_t)rows);
    return in ? ef_hal_dma_in_2d(l1, l2, rb, (uint32_t)rows, op->stride[s])
              : ef_hal_dma_out_2d(l2, l1, rb, (uint32_t)rows, op->stride[s]);
}

static void move_tile(const stream_op_t *op, void *const *l1, long row0, int rows, int in, ef_hal_dma_t *handles,
                      int *count) {
    *count = 0;
    for (int s = 0; s < op->streams; s++)
        if (op->dir[s] & (in ? IN : OUT)) handles[(*count)++] = move(op, s, l1[s], row0, rows, in);
}

static void wait_all(const ef_hal_dma_t *handles, int *count) {
    for (int i = 0; i < *count; i++) ef_hal_dma_wait(handles[i]);
    *count = 0;
}

/* Runs the step; returns 0, or -1 (nothing done) when one row of every stream does not fit the free L1. The caller
 * releases L1 (resident operands and scratch stay allocated until then). */
static int stream_run(stream_op_t *op) {
    if (op->rows <= 0) return 0;
    const int cores = ef_hal_cores();
    if (op->core_scratch_bytes) {
        const uint32_t bytes = padded(op->core_scratch_bytes) * (uint32_t)cores;
        op->core_scratch_bytes = padded(op->core_scratch_bytes);
        op->scratch = (uint8_t *)ef_hal_l1_alloc(bytes);
        if (!op->scratch) return -1;
        memset(op->scratch, 0, bytes);
    }
    uint32_t per_row = 0;
    for (int s = 0; s < op->streams; s++) per_row += op->row_bytes[s];
    const uint32_t slack = 2u * (uint32_t)op->streams * L1_ALIGN_BYTES, free = ef_hal_l1_free_bytes();
    if (per_row == 0 || free <= slack) return -1;
    long tile_rows = (long)((free - slack) / (2u * per_row));
    if (tile_rows < 1) return -1;
    if (tile_rows > op->rows) tile_rows = op->rows;
    const int buffers = tile_rows < op->rows ? 2 : 1;
    void *buf[2][MAX_STREAMS];
    for (int b = 0; b < buffers; b++)
        for (int s = 0; s < op->streams; s++) buf[b][s] = ef_hal_l1_alloc(op->row_bytes[s] * (uint32_t)tile_rows);
    const long tiles = (op->rows + tile_rows - 1) / tile_rows;
    ef_hal_dma_t in_h[2][MAX_STREAMS], out_h[2][MAX_STREAMS];
    int in_n[2] = {0, 0}, out_n[2] = {0, 0};
    move_tile(op, buf[0], 0, (int)(tile_rows < op->rows ? tile_rows : op->rows), 1, in_h[0], &in_n[0]);
    for (long t = 0; t < tiles; t++) {
        const int b = (int)(t & 1);
        const long row0 = t * tile_rows;
        const int rows = (int)(op->rows - row0 < tile_rows ? op->rows - row0 : tile_rows);
        wait_all(in_h[b], &in_n[b]);
        if (t + 1 < tiles) {                      /* the next tile loads into the other buffer, once it is stored */
            const long next0 = row0 + tile_rows;
            const int next = (int)(op->rows - next0 < tile_rows ? op->rows - next0 : tile_rows);
            wait_all(out_h[b ^ 1], &out_n[b ^ 1]);
            move_tile(op, buf[b ^ 1], next0, next, 1, in_h[b ^ 1], &in_n[b ^ 1]);
        }
        tile_t tile = {op, {0}, row0, rows};
        for (int s = 0; s < op->streams; s++) tile.l1[s] = buf[b][s];
        ef_hal_fork(0, tile_task, &tile);
        move_tile(op, buf[b], row0, rows, 0, out_h[b], &out_n[b]);
    }
    wait_all(out_h[0], &out_n[0]);
    wait_all(out_h[1], &out_n[1]);
    return 0;
}

/* Sums the cores' partials (n floats each, in scratch) into y (L2), elements spread over the cores. */
typedef struct {
    float *y;
    const uint8_t *scratch;
    uint32_t core_bytes;
    int n, cores;
} combine_t;

static void combine_task(void *arg) {
    const combine_t *c = (const combine_t *)arg;
    const int team = ef_hal_team_size(), me = ef_hal_core_id();
    const int lo = (int)((long)c->n * me / team), hi = (int)((long)c->n * (me + 1) / team);
    for (int k = lo; k < hi; k++) {
        float s = ((const float *)c->scratch)[k];
        for (int p = 1; p < c->cores; p++) s += ((const float *)(c->scratch + (uint32_t)p * c->core_bytes))[k];
        c->y[k] = s;
    }
}

static void combine(float *y, const stream_op_t *op, int n) {
    combine_t c = {y, op->scratch, op->core_scratch_bytes, n, ef_hal_cores()};
    ef_hal_fork(0, combine_task, &c);
}

/* ---- unary maps: rows are elements -------------------------------------------------------------------- */
typedef struct {
    float a, b;
    int i;
} attrs_t;

#define EF_STREAM_UNARY(NAME, PARAMS, CTX, CALL)                                                           \
    static void NAME##_body(const stream_op_t *op, void *const *l1, long row0, int rows, int core) {          \
        const attrs_t *at = (const attrs_t *)op->ctx;                                                        \
        float *y = (float *)l1[0];                                                                           \
        const float *x = (const float *)l1[1];                                                               \
        (void)at, (void)row0, (void)core;                                                                    \
        ef_##NAME(y, x, rows CALL);                                                                          \
    }                                                                                                        \
    void ef_hal_##NAME(float *y, const float *x, int n PARAMS) {                                             \
        const attrs_t attrs = CTX, *at = &attrs;                                                             \
        const uint32_t mark = ef_hal_l1_mark();                                                              \
        stream_op_t op = {.rows = n, .body = NAME##_body, .ctx = at};                                        \
        (void)at;                                                                                            \
        add_stream(&op, y, FLOAT_BYTES, FLOAT_BYTES, OUT);                                                   \
        add_stream(&op, x, FLOAT_BYTES, FLOAT_BYTES, IN);                                                    \
        if (stream_run(&op) != 0) ef_##NAME(y, x, n CALL);                                                   \
        ef_hal_l1_release(mark);                                                                             \
    }

#define EF_STREAM_UNARY_GRAD(NAME, PARAMS, CTX, CALL)                                                      \
    static void NAME##_body(const stream_op_t *op, void *const *l1, long row0, int rows, int core) {          \
        const attrs_t *at = (const attrs_t *)op->ctx;                                                        \
        (void)at, (void)row0, (void)core;                                                                    \
        ef_##NAME((float *)l1[0], (const float *)l1[1], (const float *)l1[2], rows CALL);                    \
    }                                                                                                        \
    void ef_hal_##NAME(float *dx, const float *v, const float *dy, int n PARAMS) {                           \
        const attrs_t attrs = CTX, *at = &attrs;                                                             \
        const uint32_t mark = ef_hal_l1_mark();                                                              \
        stream_op_t op = {.rows = n, .body = NAME##_body, .ctx = at};                                        \
        (void)at;                                                                                            \
        add_stream(&op, dx, FLOAT_BYTES, FLOAT_BYTES, OUT);                                                  \
        add_stream(&op, v, FLOAT_BYTES, FLOAT_BYTES, IN);                                                    \
        add_stream(&op, dy, FLOAT_BYTES, FLOAT_BYTES, IN);                                                   \
        if (stream_run(&op) != 0) ef_##NAME(dx, v, dy, n CALL);                                              \
        ef_hal_l1_release(mark);                                                                             \
    }

#define EF_COMMA ,
#define NONE ((attrs_t){0.0f, 0.0f, 0})
EF_STREAM_UNARY(neg, , NONE, )
EF_STREAM_UNARY(relu, , NONE, )
EF_STREAM_UNARY(sigmoid, , NONE, )
EF_STREAM_UNARY(tanh, , NONE, )
EF_STREAM_UNARY(erf, , NONE, )
EF_STREAM_UNARY(sqrt, , NONE, )
EF_STREAM_UNARY(exp, , NONE, )
EF_STREAM_UNARY(gelu, EF_COMMA int approximate_tanh, ((attrs_t){0.0f, 0.0f, approximate_tanh}), EF_COMMA at->i)
EF_STREAM_UNARY_GRAD(relu_grad, , NONE, )
EF_STREAM_UNARY_GRAD(sigmoid_grad, , NONE, )
EF_STREAM_UNARY_GRAD(tanh_grad, , NONE, )
EF_STREAM_UNARY_GRAD(erf_grad, , NONE, )
EF_STREAM_UNARY_GRAD(gelu_grad, EF_COMMA int approximate_tanh, ((attrs_t){0.0f, 0.0f, approximate_tanh}),
                     EF_COMMA at->i)

/* ---- binary ops with broadcasting: rows of the output's last axis ---------------------------------------- */
typedef struct {
    void (*kernel)(float *, const float *, const float *, int, const int *, const int *, const int *);
    const float *a, *b;           /* where the body reads a and b: NULL = streamed; else L1 (resident) or L2 */
    int rank, chunk, parts;       /* a row of work: `chunk` elements of the last axis, `parts` per output row */
    const int *shape, *sa, *sb;
} binary_t;

/* Element offset of row `row` (an index over shape[0 .. rank-2]) in an operand with strides s. */
static long row_offset(long row, int rank, const int *shape, const int *s) {
    long off = 0;
    for (int d = rank - 2; d >= 0; d--) {
        off += (row % shape[d]) * (long)s[d];
        row /= shape[d];
    }
    return off;
}

static void binary_body(const stream_op_t *op, void *const *l1, long row0, int rows, int core) {
    const binary_t *c = (const binary_t *)op->ctx;
    (void)core;
    float *y = (float *)l1[0];
    int next = 1;
    const float *a_l1 = c->a ? NULL : (const float *)l1[next++];
    const float *b_l1 = c->b ? NULL : (const float *)l1[next];
    const int ia = c->sa[c->rank - 1], ib = c->sb[c->rank - 1];
    for (int r = 0; r < rows; r++) {
        const long row = (row0 + r) / c->parts, part = (long)((row0 + r) % c->parts) * c->chunk;
        const float *a = a_l1 ? a_l1 + (long)r * c->chunk : c->a + row_offset(row, c->rank, c->shape, c->sa) + part * ia;
        const float *b = b_l1 ? b_l1 + (long)r * c->chunk : c->b + row_offset(row, c->rank, c->shape, c->sb) + part * ib;
        c->kernel(y + (long)r * c->chunk, a, b, 1, &c->chunk, &ia, &ib);
    }
}

/* Elements per row of work: the whole last axis, or a divisor of it when a row is long (at least 4 rows of the three
 * operands fit the free L1 twice over) or when there are fewer rows than cores (every core gets a share). */
static int chunk_of(int inner, long rows) {
    const int cores = ef_hal_cores();
    int limit = (int)(ef_hal_l1_free_bytes() / (2u * 3u * 4u * FLOAT_BYTES));
    if (rows < cores && inner / cores < limit) limit = inner / cores;
    if (inner <= limit) return inner;
    for (int c = limit; c >= MIN_CHUNK; c--)
        if (inner % c == 0) return c;
    return inner;
}

/* Whether operand strides s read the output's elements in order (a dense operand of the output's shape). */
static int dense(int rank, const int *shape, const int *s) {
    long expect = 1;
    for (int d = rank - 1; d >= 0; d--) {
        if (shape[d] != 1 && s[d] != expect) return 0;
        expect *= shape[d];
    }
    return 1;
}

static long extent(int rank, const int *shape, const int *s) {   /* elements an operand spans */
    long last = 0;
    for (int d = 0; d < rank; d++) last += (long)(shape[d] - 1) * s[d];
    return last + 1;
}

static void binary(void (*kernel)(float *, const float *, const float *, int, const int *, const int *, const int *),
                   float *y, const float *a, const float *b, int rank, const int *shape, const int *sa, const int *sb) {
    const uint32_t mark = ef_hal_l1_mark();
    long rows = 1;
    for (int d = 0; d < rank - 1; d++) rows *= shape[d];
    const int inner = shape[rank - 1], chunk = chunk_of(inner, rows);
    binary_t c = {kernel, NULL, NULL, rank, chunk, inner / chunk, shape, sa, sb};
    stream_op_t op = {.rows = rows * c.parts, .body = binary_body, .ctx = &c};
    const uint32_t row_bytes = FLOAT_BYTES * (uint32_t)chunk;
    add_stream(&op, y, row_bytes, row_bytes, OUT);
    if (dense(rank, shape, sa)) add_stream(&op, a, row_bytes, row_bytes, IN);
    else c.a = (const float *)resident(a, FLOAT_BYTES * (uint32_t)extent(rank, shape, sa));
    if (dense(rank, shape, sb)) add_stream(&op, b, row_bytes, row_bytes, IN);
    else c.b = (const float *)resident(b, FLOAT_BYTES * (uint32_t)extent(rank, shape, sb));
    if (stream_run(&op) != 0) kernel(y, a, b, rank, shape, sa, sb);
    ef_hal_l1_release(mark);
}

#define EF_STREAM_BINARY(NAME)                                                                             \
    void ef_hal_##NAME(float *y, const float *a, const float *b, int rank, const int *shape, const int *sa,   \
                       const int *sb) {                                                                      \
        binary(ef_##NAME, y, a, b, rank, shape, sa, sb);                                                     \
    }
EF_STREAM_BINARY(add)
EF_STREAM_BINARY(sub)
EF_STREAM_BINARY(mul)
EF_STREAM_BINARY(div)

/* ---- SGD: the updated rows (or, for a dense parameter, its elements) ------------------------------------- */
typedef struct {
    const float *lr;
    float momentum, weight_decay;
    int cols, velocity;
} sgd_t;

static void sgd_body(const stream_op_t *op, void *const *l1, long row0, int rows, int core) {
    const sgd_t *c = (const sgd_t *)op->ctx;
    (void)row0, (void)core;
    const int cols = c->cols ? c->cols : rows, n = c->cols ? rows : 1;
    ef_sgd((float *)l1[0], (const float *)l1[1], c->lr, c->velocity ? (float *)l1[2] : NULL, n, cols, cols,
           c->momentum, c->weight_decay);
}

void ef_hal_sgd(float *param, const float *grad, const float *lr, float *velocity, int rows, int cols, int ld,
                float momentum, float weight_decay) {
    const uint32_t mark = ef_hal_l1_mark();
    const int flat = ld == cols || rows == 1; /* contiguous: stream elements, so that one row splits over the cores */
    sgd_t c = {(const float *)resident(lr, FLOAT_BYTES), momentum, weight_decay, flat ? 0 : cols, velocity != NULL};
    stream_op_t op = {.rows = flat ? (long)rows * cols : rows, .body = sgd_body, .ctx = &c};
    const uint32_t rb = FLOAT_BYTES * (flat ? 1u : (uint32_t)cols);
    add_stream(&op, param, rb, flat ? rb : FLOAT_BYTES * (uint32_t)ld, INOUT);
    add_stream(&op, grad, rb, rb, IN);
    if (velocity) add_stream(&op, velocity, rb, rb, INOUT);
    if (stream_run(&op) != 0) ef_sgd(param, grad, lr, velocity, rows, cols, ld, momentum, weight_decay);
    ef_hal_l1_release(mark);
}

/* ---- normalisations: rows of the normalised axis ----------------------------------------------------------- */
typedef struct {
    int n, inner, ns;
    const float *scale, *bias;
    float epsilon;
} norm_t;

static void softmax_body(const stream_op_t *op, void *const *l1, long row0, int rows, int core) {
    const norm_t *c = (const norm_t *)op->ctx;
    (void)row0, (void)core;
    ef_softmax((float *)l1[0], (const float *)l1[1], rows, c->n, c->inner);
}

static void softmax_grad_body(const stream_op_t *op, void *const *l1, long row0, int rows, int core) {
    const norm_t *c = (const norm_t *)op->ctx;
    (void)row0, (void)core;
    ef_softmax_grad((float *)l1[0], (const float *)l1[1], (const float *)l1[2], rows, c->n, c->inner);
}

static void rows_op(stream_op_t *op, long rows, uint32_t row_bytes, void *out, const void *in0, const void *in1) {
    op->rows = rows;
    add_stream(op, out, row_bytes, row_bytes, OUT);
    add_stream(op, in0, row_bytes, row_bytes, IN);
    if (in1) add_stream(op, in1, row_bytes, row_bytes, IN);
}

void ef_hal_softmax(float *y, const float *x, int outer, int n, int inner) {
    const uint32_t mark = ef_hal_l1_mark();
    norm_t c = {n, inner, 0, NULL, NULL, 0.0f};
    stream_op_t op = {.body = softmax_body, .ctx = &c};
    rows_op(&op, outer, FLOAT_BYTES * (uint32_t)n * (uint32_t)inner, y, x, NULL);
    if (stream_run(&op) != 0) ef_softmax(y, x, outer, n, inner);
    ef_hal_l1_release(mark);
}

void ef_hal_softmax_grad(float *dx, const float *y, const float *dy, int outer, int n, int inner) {
    const uint32_t mark = ef_hal_l1_mark();
    norm_t c = {n, inner, 0, NULL, NULL, 0.0f};
    stream_op_t op = {.body = softmax_grad_body, .ctx = &c};
    rows_op(&op, outer, FLOAT_BYTES * (uint32_t)n * (uint32_t)inner, dx, y, dy);
    if (stream_run(&op) != 0) ef_softmax_grad(dx, y, dy, outer, n, inner);
    ef_hal_l1_release(mark);
}

static void layer_norm_body(const stream_op_t *op, void *const *l1, long row0, int rows, int core) {
    const norm_t *c = (const norm_t *)op->ctx;
    (void)row0, (void)core;
    ef_layer_normalization((float *)l1[0], (const float *)l1[1], c->scale, c->bias, rows, c->n, c->ns, c->epsilon);
}

void ef_hal_layer_normalization(float *y, const float *x, const float *scale, const float *bias, int rows, int n,
                                int ns, float epsilon) {
    const uint32_t mark = ef_hal_l1_mark();
    norm_t c = {n, 1, ns, (const float *)resident(scale, FLOAT_BYTES * (uint32_t)ns),
                (const float *)resident(bias, FLOAT_BYTES * (uint32_t)ns), epsilon};
    stream_op_t op = {.body = layer_norm_body, .ctx = &c};
    rows_op(&op, rows, FLOAT_BYTES * (uint32_t)n, y, x, NULL);
    if (stream_run(&op) != 0) ef_layer_normalization(y, x, scale, bias, rows, n, ns, epsilon);
    ef_hal_l1_release(mark);
}

static void layer_norm_grad_input_body(const stream_op_t *op, void *const *l1, long row0, int rows, int core) {
    const norm_t *c = (const norm_t *)op->ctx;
    (void)row0, (void)core;
    ef_layer_norm_grad_input((float *)l1[0], (const float *)l1[1], c->scale, (const float *)l1[2], rows, c->n, c->ns,
                             c->epsilon);
}

void ef_hal_layer_norm_grad_input(float *dx, const float *x, const float *scale, const float *dy, int rows, int n,
                                  int ns, float epsilon) {
    const uint32_t mark = ef_hal_l1_mark();
    norm_t c = {n, 1, ns, (const float *)resident(scale, FLOAT_BYTES * (uint32_t)ns), NULL, epsilon};
    stream_op_t op = {.body = layer_norm_grad_input_body, .ctx = &c};
    rows_op(&op, rows, FLOAT_BYTES * (uint32_t)n, dx, x, dy);
    if (stream_run(&op) != 0) ef_layer_norm_grad_input(dx, x, scale, dy, rows, n, ns, epsilon);
    ef_hal_l1_release(mark);
}

/* dscale = Σ over rows: each core sums its rows into its partial (row by row, as the core kernel does). */
static void layer_norm_grad_scale_body(const stream_op_t *op, void *const *l1, long row0, int rows, int core) {
    const norm_t *c = (const norm_t *)op->ctx;
    (void)row0;
    float *part = (float *)(op->scratch + (uint32_t)core * op->core_scratch_bytes), *row = part + c->n;
    for (int r = 0; r < rows; r++) {
        const long at = (long)r * c->n;
        ef_layer_norm_grad_scale(row, (const float *)l1[0] + at, (const float *)l1[1] + at, 1, c->n, c->epsilon);
        for (int j = 0; j < c->n; j++) part[j] += row[j];
    }
}

void ef_hal_layer_norm_grad_scale(float *dscale, const float *x, const float *dy, int rows, int n, float epsilon) {
    const uint32_t mark = ef_hal_l1_mark();
    norm_t c = {n, 1, n, NULL, NULL, epsilon};
    stream_op_t op = {.rows = rows, .body = layer_norm_grad_scale_body, .ctx = &c,
                      .core_scratch_bytes = 2u * FLOAT_BYTES * (uint32_t)n};
    add_stream(&op, x, FLOAT_BYTES * (uint32_t)n, FLOAT_BYTES * (uint32_t)n, IN);
    add_stream(&op, dy, FLOAT_BYTES * (uint32_t)n, FLOAT_BYTES * (uint32_t)n, IN);
    if (stream_run(&op) != 0) ef_layer_norm_grad_scale(dscale, x, dy, rows, n, epsilon);
    else combine(dscale, &op, n);
    ef_hal_l1_release(mark);
}

/* ---- ReduceSumTo: rows of x's last axis, summed into a partial y per core ------------------------------------ */
typedef struct {
    int rank, inner;
    const int *shape, *sy;
} reduce_t;

static void reduce_body(const stream_op_t *op, void *const *l1, long row0, int rows, int core) {
    const reduce_t *c = (const reduce_t *)op->ctx;
    float *part = (float *)(op->scratch + (uint32_t)core * op->core_scratch_bytes);
    const int si = c->sy[c->rank - 1];
    for (int r = 0; r < rows; r++) {
        const float *px = (const float *)l1[0] + (long)r * c->inner;
        float *py = part + row_offset(row0 + r, c->rank, c->shape, c->sy);
        if (si == 0) {                            /* the core kernel's two cases, in its order */
            float s = 0.0f;
            for (int j = 0; j < c->inner; j++) s += px[j];
            py[0] += s;
        } else {
            for (int j = 0; j < c->inner; j++) py[(long)j * si] += px[j];
        }
    }
}

void ef_hal_reduce_sum_to(float *y, const float *x, int ny, int rank, const int *shape, const int *sy) {
    const uint32_t mark = ef_hal_l1_mark();
    reduce_t c = {rank, shape[rank - 1], shape, sy};
    long rows = 1;
    for (int d = 0; d < rank - 1; d++) rows *= shape[d];
    const uint32_t part = FLOAT_BYTES * (uint32_t)ny;
    stream_op_t op = {.rows = rows, .body = reduce_body, .ctx = &c, .core_scratch_bytes = part};
    add_stream(&op, x, FLOAT_BYTES * (uint32_t)c.inner, FLOAT_BYTES * (uint32_t)c.inner, IN);
    if (part * (uint32_t)ef_hal_cores() > ef_hal_l1_free_bytes() / 2 || stream_run(&op) != 0)
        ef_reduce_sum_to(y, x, ny, rank, shape, sy);
    else
        combine(y, &op, ny);
    ef_hal_l1_release(mark);
}

/* ---- Transpose: rows of y's last axis; x resident in L1 when it fits, else read where it lies -------------- */
typedef struct {
    const uint8_t *x;
    int esize, rank, inner;
    const int *shape, *sx;
} transpose_t;

static void transpose_body(const stream_op_t *op, void *const *l1, long row0, int rows, int core) {
    const transpose_t *c = (const transpose_t *)op->ctx;
    (void)core;
    const int si = c->sx[c->rank - 1];
    for (int r = 0; r < rows; r++) {
        const uint8_t *x = c->x + row_offset(row0 + r, c->rank, c->shape, c->sx) * c->esize;
        ef_transpose((uint8_t *)l1[0] + (long)r * c->inner * c->esize, x, c->esize, 1, &c->inner, &si);
    }
}

void ef_hal_transpose(void *y, const void *x, int esize, int rank, const int *shape, const int *sx) {
    const uint32_t mark = ef_hal_l1_mark();
    const long span = extent(rank, shape, sx) * esize;
    const void *where = x;
    if (span <= (long)ef_hal_l1_free_bytes() / 2) {   /* the whole source in L1: every tile reads it there */
        void *l1 = ef_hal_l1_alloc((uint32_t)span);
        if (l1) {
            ef_hal_dma_wait(ef_hal_dma_in(l1, x, (uint32_t)span));
            where = l1;
        }
    }
    transpose_t c = {(const uint8_t *)where, esize, rank, shape[rank - 1], shape, sx};
    long rows = 1;
    for (int d = 0; d < rank - 1; d++) rows *= shape[d];
    stream_op_t op = {.rows = rows, .body = transpose_body, .ctx = &c};
    const uint32_t rb = (uint32_t)c.inner * (uint32_t)esize;
    add_stream(&op, y, rb, rb, OUT);
    if (stream_run(&op) != 0) ef_transpose(y, x, esize, rank, shape, sx);
    ef_hal_l1_release(mark);
}

/* ---- max pooling: rows are the N x C planes ---------------------------------------------------------------- */
static void pool_window(int *local, const int *win, int planes) {
    memcpy(local, win, sizeof(int) * EF_WIN_LEN);
    local[EF_WIN_N] = planes;
    local[EF_WIN_C] = local[EF_WIN_M] = local[EF_WIN_G] = 1;
}

static void max_pool_body(const stream_op_t *op, void *const *l1, long row0, int rows, int core) {
    int win[EF_WIN_LEN];
    (void)row0, (void)core;
    pool_window(win, (const int *)op->ctx, rows);
    ef_max_pool((float *)l1[0], (const float *)l1[1], win);
}

static void max_pool_grad_body(const stream_op_t *op, void *const *l1, long row0, int rows, int core) {
    int win[EF_WIN_LEN];
    (void)row0, (void)core;
    pool_window(win, (const int *)op->ctx, rows);
    ef_max_pool_grad((float *)l1[0], (const float *)l1[1], (const float *)l1[2], win);
}

/* y (planes of OH x OW) from x (planes of H x W); the gradient also reads dy (OH x OW) and writes dx (H x W). */
static int pool(const int *win, stream_body_t body, float *out, const float *x, const float *dy) {
    const uint32_t plane = FLOAT_BYTES * (uint32_t)(win[EF_WIN_H] * win[EF_WIN_W]);
    const uint32_t pooled = FLOAT_BYTES * (uint32_t)(win[EF_WIN_OH] * win[EF_WIN_OW]);
    stream_op_t op = {.rows = (long)win[EF_WIN_N] * win[EF_WIN_C], .body = body, .ctx = win};
    add_stream(&op, out, dy ? plane : pooled, dy ? plane : pooled, OUT);
    add_stream(&op, x, plane, plane, IN);
    if (dy) add_stream(&op, dy, pooled, pooled, IN);
    return stream_run(&op);
}

void ef_hal_max_pool(float *y, const float *x, const int *win) {
    const uint32_t mark = ef_hal_l1_mark();
    if (pool(win, max_pool_body, y, x, NULL) != 0) ef_max_pool(y, x, win);
    ef_hal_l1_release(mark);
}

void ef_hal_max_pool_grad(float *dx, const float *x, const float *dy, const int *win) {
    const uint32_t mark = ef_hal_l1_mark();
    if (pool(win, max_pool_grad_body, dx, x, dy) != 0) ef_max_pool_grad(dx, x, dy, win);
    ef_hal_l1_release(mark);
}
