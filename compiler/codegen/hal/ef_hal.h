/* edgefleet HAL: the few cluster services a generated program uses on a PULP-style SoC.
 *
 *   cluster   fork a function onto N cores (core id, team size, barrier)
 *   DMA       1-D and 2-D copies between L2 (anything outside the cluster) and L1, start + wait
 *   RedMulE   one GEMM job on L1 operands (FP32), start + wait
 *   counters  a cycle counter
 *   L1        a stack-like allocator for tile buffers
 *   GEMM      ef_hal_gemm / ef_hal_mat_mul: the ef_gemm / ef_mat_mul ABI of kernels/ef_kernels.h, run as
 *             RedMulE jobs on L1 tiles moved by the DMA (ef_hal_gemm.c, written once against this header)
 *   LoRA      ef_hal_lora_linear / ef_hal_lora_linear_grad: the ef_lora_linear(_grad) ABI, one pass over row
 *             panels with the adapter fused into each output tile (ef_hal_lora.c, against this header too)
 *   conv      ef_hal_conv / ef_hal_conv_grad_weight: im2col tiles in L1, GEMM jobs on RedMulE (ef_hal_conv.c)
 *   streams   ef_hal_<op> for the elementwise, normalisation, reduction, data, pooling and optimizer kernels: the
 *             ef_<op> ABI streamed through L1 and split over the cores (ef_hal_stream.c, against this header too;
 *             declared in ef_hal_stream.h)
 *
 * Two implementations (docs/codegen.md, "The HAL and the siracusa board"):
 *   generic/  portable and single-threaded: memcpy DMA, a C loop standing in for RedMulE, a static L1 pool.
 *             Linked by the host and rv32-qemu boards, so the tiled GEMM path runs (and is tested) everywhere.
 *   pulp/     register-level code for the PULP cluster of Siracusa: L1 mailbox fork and barrier, MCHAN cluster DMA,
 *             RedMulE's HWPE register file (or the cores where the model has no RedMulE); bare metal.
 *
 * Rules every implementation keeps:
 *   - DMA and RedMulE calls come from one core at a time (the core that runs the program, core 0);
 *   - a forked task must not rely on the order in which cores run: the generic HAL runs them one after
 *     another, so it refuses ef_hal_barrier() inside a team of more than one core;
 *   - L1 buffers are released in the reverse order of allocation (ef_hal_l1_mark / ef_hal_l1_release).
 */
#ifndef EF_HAL_H
#define EF_HAL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- life cycle ---------------------------------------------------------------------------------------- */
/* Once per cluster session, on the core that runs the program, before anything else. Returns 0, or -1 when the
 * L1 pool cannot be allocated. Idempotent. */
int ef_hal_init(void);

/* ---- cluster: fork/join and barrier -------------------------------------------------------------------- */
typedef void (*ef_hal_task_t)(void *arg);
int ef_hal_cores(void);                                  /* cores a fork can use */
void ef_hal_fork(int cores, ef_hal_task_t task, void *arg);  /* task(arg) on `cores` cores (<= 0: all); joins */
int ef_hal_core_id(void);                                /* 0 .. team size - 1 inside a fork */
int ef_hal_team_size(void);                              /* cores of the current fork (1 outside a fork) */
void ef_hal_barrier(void);                               /* every core of the current team */

/* ---- DMA between L2 and L1 ----------------------------------------------------------------------------- */
/* A transfer handle; several commands may share one. L1 data is always packed; a 2-D transfer moves `rows` rows
 * of `row_bytes`, whose starts are `l2_stride_bytes` apart in L2. */
typedef uint32_t ef_hal_dma_t;
ef_hal_dma_t ef_hal_dma_in(void *l1, const void *l2, uint32_t bytes);
ef_hal_dma_t ef_hal_dma_out(void *l2, const void *l1, uint32_t bytes);
ef_hal_dma_t ef_hal_dma_in_2d(void *l1, const void *l2, uint32_t row_bytes, uint32_t rows, uint32_t l2_stride_bytes);
ef_hal_dma_t ef_hal_dma_out_2d(void *l2, const void *l1, uint32_t row_bytes, uint32_t rows,
                               uint32_t l2_stride_bytes);
void ef_hal_dma_wait(ef_hal_dma_t transfer);

/* ---- RedMulE (FP32) -------------------------------------------------------------------------------------- */
/* RedMulE's own names: X is m x n, W is n x k, Y and Z are m x k; dense, row-major, in L1.
 *   y == NULL  Z = X W          (MATMUL)
 *   y == z     Z = X W + Z      (GEMM, accumulating in place)
 *   otherwise  Z = X W + Y      (Y copied into Z first: the hardware reads Y from Z's address) */
typedef struct {
    float *z;
    const float *x;
    const float *w;
    const float *y;
    uint16_t m, n, k;
} ef_hal_redmule_job_t;
void ef_hal_redmule_start(const ef_hal_redmule_job_t *job);
void ef_hal_redmule_wait(void);

/* ---- counters and L1 ------------------------------------------------------------------------------------ */
uint64_t ef_hal_cycles(void);
void *ef_hal_l1_alloc(uint32_t bytes);                   /* 16-byte aligned; NULL when it does not fit */
uint32_t ef_hal_l1_mark(void);
void ef_hal_l1_release(uint32_t mark);                   /* frees everything allocated after the mark */
uint32_t ef_hal_l1_free_bytes(void);

/* ---- GEMM on RedMulE (ef_hal_gemm.c) -------------------------------------------------------------------- */
/* Same arguments and results as ef_gemm / ef_mat_mul (kernels/ef_kernels.h). */
void ef_hal_gemm(float *y, const float *a, const float *b, const float *c, int m, int n, int k, int trans_a,
                 int trans_b, float alpha, float beta, int c_rs, int c_cs);
void ef_hal_mat_mul(float *y, const float *a, const float *b, int m, int n, int k, int brank, const int *bshape,
                    const int *sa, const int *sb);
/* Same arguments and results as ef_conv / ef_conv_grad_weight: im2col tiles in L1, GEMM jobs on RedMulE
 * (ef_hal_conv.c; an ungrouped convolution, else the core kernel). */
void ef_hal_conv(float *y, const float *x, const float *w, const float *bias, const int *win);
void ef_hal_conv_grad_weight(float *dw, const float *x, const float *dy, const int *win);

/* Tile sizes along the GEMM's m (rows of Y), n (columns of Y) and k (the reduction). */
typedef struct {
    int m, n, k;
} ef_hal_tile_t;
/* L1 bytes the tile buffers of one GEMM take (double-buffered operands and results, transpose staging). */
uint32_t ef_hal_gemm_l1_bytes(ef_hal_tile_t tile, int trans_a, int trans_b);
/* The largest tile (halving the largest side from the whole problem) whose buffers fit `l1_bytes`. */
ef_hal_tile_t ef_hal_gemm_tile(int m, int n, int k, int trans_a, int trans_b, uint32_t l1_bytes);
/* ef_hal_gemm with a given tile; returns 0, or -1 when the tile's buffers do not fit the free L1. */
int ef_hal_gemm_tiled(float *y, const float *a, const float *b, const float *c, int m, int n, int k, int trans_a,
                      int trans_b, float alpha, float beta, int c_rs, int c_cs, ef_hal_tile_t tile);

/* ---- LoRA layer on RedMulE (ef_hal_lora.c) -------------------------------------------------------------- */
/* Same arguments and results as ef_lora_linear / ef_lora_linear_grad (kernels/ef_kernels.h): one pass over row
 * panels of mt rows per device, the rank-r products fused into each output tile (docs/codegen.md). */
void ef_hal_lora_linear(float *y, const float *x, const float *w, const float *a, const float *b, const float *c,
                        int m, int n, int k, int r, int devices, int trans_b, float alpha, float beta, int c_rs,
                        int c_cs, float scale);
void ef_hal_lora_linear_grad(float *dx, float *da, float *db, const float *dy, const float *x, const float *w,
                             const float *a, const float *b, int m, int n, int k, int r, int devices, int trans_b,
                             float alpha, float scale);

/* How a call uses L1. mt == 0: nothing fits (or a size exceeds RedMulE's 16 bits): the core kernel runs. */
typedef struct {
    int mt;                /* rows per panel (a device's rows are cut into panels) */
    int nt;                /* columns per output tile: of Y (forward), of dX (backward) */
    int w_resident;        /* W' (forward) / W'ᵀ (backward) stays in L1 for the whole call; else streamed per panel */
    int in_buffers;        /* 2: the next panel loads while this one computes */
    uint32_t l1_bytes;     /* the buffers' bytes (at least; a transposing load's scratch takes spare L1 too) */
} ef_hal_lora_plan_t;
ef_hal_lora_plan_t ef_hal_lora_linear_plan(int m, int n, int k, int r, int devices, int trans_b, uint32_t l1_bytes);
/* dx, da, db: whether that gradient is wanted (non-NULL in the call) */
ef_hal_lora_plan_t ef_hal_lora_linear_grad_plan(int m, int n, int k, int r, int devices, int trans_b, int dx, int da,
                                                int db, uint32_t l1_bytes);


#ifdef __cplusplus
}
#endif
#endif /* EF_HAL_H */
