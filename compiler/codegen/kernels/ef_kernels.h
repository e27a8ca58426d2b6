/* edgefleet C kernel library: one function per op of compiler/ops (float32), no dynamic allocation.
 *
 * ABI (see docs/codegen.md):
 *   - outputs first, then inputs, then shape and attribute arguments;
 *   - tensors are dense, row-major, C-contiguous; shapes and strides are `int` element counts;
 *   - an optional tensor is NULL when absent (Gemm's C, Conv's bias, SGD's velocity, ...);
 *   - broadcasting is expressed with strides: a stride of 0 repeats an operand along that axis;
 *     the code generator coalesces axes, so `rank` is small and `shape`/strides have `rank` entries;
 *   - an output may be the same buffer as input 0 only for the elementwise ops (the memory plan's
 *     in-place rule); every other output never overlaps an input;
 *   - data-movement kernels take `esize`, the element size in bytes (1, 2, 4 or 8), and work for any dtype.
 * The numpy forward of each op (compiler/ops) is the reference; tests/codegen checks every kernel against it.
 */
#ifndef EF_KERNELS_H
#define EF_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EF_MAX_RANK 8

/* dtype codes (Cast, Gather) */
enum { EF_F32 = 0, EF_F64 = 1, EF_I64 = 2, EF_I32 = 3, EF_BOOL = 4, EF_I8 = 5 };

/* sliding-window geometry (Conv, pools and their gradients): an int array indexed by these names.
 * 1-D ops run as 2-D with H = 1. M is the output channel count (C for pools); G the group count. */
enum {
    EF_WIN_N, EF_WIN_C, EF_WIN_H, EF_WIN_W, EF_WIN_M, EF_WIN_OH, EF_WIN_OW, EF_WIN_KH, EF_WIN_KW,
    EF_WIN_SH, EF_WIN_SW, EF_WIN_DH, EF_WIN_DW, EF_WIN_PT, EF_WIN_PL, EF_WIN_PB, EF_WIN_PR, EF_WIN_G,
    EF_WIN_LEN
};

/* ---- elementwise, binary with broadcasting: y[i] = a[i·sa] op b[i·sb] over an N-d index ---------------- */
void ef_add(float *y, const float *a, const float *b, int rank, const int *shape, const int *sa, const int *sb);
void ef_sub(float *y, const float *a, const float *b, int rank, const int *shape, const int *sa, const int *sb);
void ef_mul(float *y, const float *a, const float *b, int rank, const int *shape, const int *sa, const int *sb);
void ef_div(float *y, const float *a, const float *b, int rank, const int *shape, const int *sa, const int *sb);
void ef_pow(float *y, const float *a, const float *b, int rank, const int *shape, const int *sa, const int *sb);
void ef_prelu(float *y, const float *a, const float *b, int rank, const int *shape, const int *sa, const int *sb);
void ef_equal_mask(float *y, const float *a, const float *b, int rank, const int *shape, const int *sa,
                   const int *sb);
/* y[i] = cond[i·sc] ? a[i·sa] : b[i·sb] (cond: bool, one byte per element) */
void ef_where(float *y, const uint8_t *cond, const float *a, const float *b, int rank, const int *shape,
              const int *sc, const int *sa, const int *sb);

/* ---- elementwise, unary (n elements) ------------------------------------------------------------------- */
void ef_neg(float *y, const float *x, int n);
void ef_relu(float *y, const float *x, int n);
void ef_sigmoid(float *y, const float *x, int n);
void ef_tanh(float *y, const float *x, int n);
void ef_erf(float *y, const float *x, int n);
void ef_sqrt(float *y, const float *x, int n);
void ef_exp(float *y, const float *x, int n);
void ef_gelu(float *y, const float *x, int n, int approximate_tanh);
void ef_clip(float *y, const float *x, int n, float lo, float hi);
void ef_leaky_relu(float *y, const float *x, int n, float alpha);
void ef_hard_sigmoid(float *y, const float *x, int n, float alpha, float beta);
void ef_hard_swish(float *y, const float *x, int n);
void ef_elu(float *y, const float *x, int n, float alpha);
void ef_softplus(float *y, const float *x, int n);

/* ---- backward helpers: dx from (y or x, dy), n elements --------------------------------------------- */
void ef_relu_grad(float *dx, const float *y, const float *dy, int n);
void ef_sigmoid_grad(float *dx, const float *y, const float *dy, int n);
void ef_tanh_grad(float *dx, const float *y, const float *dy, int n);
void ef_erf_grad(float *dx, const float *x, const float *dy, int n);
void ef_gelu_grad(float *dx, const float *x, const float *dy, int n, int approximate_tanh);
void ef_clip_grad(float *dx, const float *x, const float *dy, int n, float lo, float hi);
void ef_leaky_relu_grad(float *dx, const float *x, const float *dy, int n, float alpha);
void ef_hard_sigmoid_grad(float *dx, const float *x, const float *dy, int n, float alpha, float beta);
void ef_hard_swish_grad(float *dx, const float *x, const float *dy, int n);
void ef_elu_grad(float *dx, const float *x, const float *dy, int n, float alpha);
void ef_softplus_grad(float *dx, const float *x, const float *dy, int n);

/* ---- GEMM ---------------------------------------------------------------------------------------------- */
/* y (M, N) = alpha·A'·B' + beta·C, A' = transA ? Aᵀ : A (A is (K, M) or (M, K)), likewise B';
 * C (optional) is read at c[i·c_rs + j·c_cs] (strides 0 broadcast a row or a column). */
void ef_gemm(float *y, const float *a, const float *b, const float *c, int m, int n, int k, int trans_a,
             int trans_b, float alpha, float beta, int c_rs, int c_cs);
/* numpy matmul: y (batch..., M, N) = a (..., M, K) @ b (..., K, N); the batch index runs over `bshape`
 * (brank axes), the matrices of a and b start at element offsets given by the strides sa, sb (0 = broadcast). */
void ef_mat_mul(float *y, const float *a, const float *b, int m, int n, int k, int brank, const int *bshape,
                const int *sa, const int *sb);

/* ---- LoRA: a frozen linear layer and its rank-r adapter in one pass over the rows (LoraLinear) ---------- */
/* x (M, K); W (K, N), or (N, K) when trans_b; A (D, K, r) and B (D, r, N) with D = devices (1: one adapter);
 * device d owns rows [d·M/D, (d+1)·M/D) (M % D == 0). C (optional) is read as in ef_gemm.
 *   y = alpha·x·W' + beta·C + (scale·x·A_d)·B_d
 * The rank-r vectors of a row live on the stack, EF_MAX_LORA_RANK floats at a time: a larger r runs in chunks
 * of that many (correct for any r; the stack holds 2·EF_MAX_LORA_RANK floats). */
#define EF_MAX_LORA_RANK 64
void ef_lora_linear(float *y, const float *x, const float *w, const float *a, const float *b, const float *c,
                    int m, int n, int k, int r, int devices, int trans_b, float alpha, float beta, int c_rs,
                    int c_cs, float scale);
/* The backward pass (LoraLinearGrad), with S = scale·x·A_d and dS = scale·dY·B_dᵀ per row:
 *   dx = alpha·dY·W'ᵀ + dS·A_dᵀ (M, K),  da_d = x_dᵀ·dS (D, K, r),  db_d = S_dᵀ·dY_d (D, r, N);
 * an output is NULL when not requested. */
void ef_lora_linear_grad(float *dx, float *da, float *db, const float *dy, const float *x, const float *w,
                         const float *a, const float *b, int m, int n, int k, int r, int devices, int trans_b,
                         float alpha, float scale);

/* ---- data movement (any dtype; esize bytes per element) --------------------------------------------- */
/* y (contiguous, `shape`) = x read at strides sx (element units) from element offset `offset`. */
void ef_transpose(void *y, const void *x, int esize, int rank, const int *shape, const int *sx);
void ef_expand(void *y, const void *x, int esize, int rank, const int *shape, const int *sx);
void ef_slice(void *y, const void *x, int esize, int offset, int rank, const int *shape, const int *sx);
/* dx (n_dx elements) = 0, then dy (contiguous, `shape`) written at dx + offset with strides sdx. */
void ef_slice_grad(void *dx, const void *dy, int esize, int n_dx, int offset, int rank, const int *shape,
                   const int *sdx);
/* along one axis: each of the `outer` rows of y is chunk[0] elements of xs[0], then chunk[1] of xs[1], ...
 * (Split is the inverse); the pointer arrays hold n_inputs / n_outputs tensors. */
void ef_concat(void *y, void *const *xs, int esize, int n_inputs, int outer, const int *chunk);
void ef_split(void *const *ys, const void *x, int esize, int n_outputs, int outer, const int *chunk);
void ef_cast(void *y, int y_dtype, const void *x, int x_dtype, int n);
void ef_shape(int64_t *y, int n, const int *dims);
/* np.take along an axis: data (outer, axis_len, inner) and nidx indices (int64 if idx64, else int32). */
void ef_gather(void *y, const void *data, const void *indices, int esize, int idx64, int outer, int axis_len,
               int inner, int nidx);
/* Gather's gradient (float32): dx (outer, axis_len, inner) = 0, each dy row added at its index. */
void ef_gather_grad(float *dx, const float *dy, const void *indices, int idx64, int outer, int axis_len,
                    int inner, int nidx);

/* ---- reductions: y (ny elements) = Σ x over an N-d index, y read at strides sy (0 on reduced axes) ----- */
void ef_reduce_sum(float *y, const float *x, int ny, int rank, const int *shape, const int *sy);
void ef_reduce_max(float *y, const float *x, int ny, int rank, const int *shape, const int *sy);
void ef_reduce_mean(float *y, const float *x, int ny, int rank, const int *shape, const int *sy, int count);
void ef_reduce_sum_to(float *y, const float *x, int ny, int rank, const int *shape, const int *sy);

/* ---- sliding windows (NCHW; `win` holds EF_WIN_LEN ints) ---------------------------------------------- */
void ef_conv(float *y, const float *x, const float *w, const float *bias, const int *win);
void ef_conv_grad_input(float *dx, const float *dy, const float *w, const int *win);
void ef_conv_grad_weight(float *dw, const float *x, const float *dy, const int *win);
/* LoRA on an ungrouped conv (LoraConv): y = conv(x, W) + bias + B_d ⊛ (scale · A_d ⊛ x), A (D, r, C, kh, kw) with
 * the layer's window, B (D, M, r) a 1×1 conv; device d owns samples [d·N/D, (d+1)·N/D). The rank-r vector of one
 * output pixel lives on the stack, EF_MAX_LORA_RANK floats at a time. */
void ef_lora_conv(float *y, const float *x, const float *w, const float *a, const float *b, const float *bias,
                  const int *win, int r, int devices, float scale);
/* Its backward (LoraConvGrad), with S = scale·A_d ⊛ x and dS = scale·B_dᵀ·dY per pixel: dx = convᵀ(dY, W) +
 * convᵀ(dS, A_d), da_d = Σ dS·x (taps read), db_d = Σ dY·Sᵀ; an output is NULL when not requested. */
void ef_lora_conv_grad(float *dx, float *da, float *db, const float *dy, const float *x, const float *w,
                       const float *a, const float *b, const int *win, int r, int devices, float scale);
void ef_max_pool(float *y, const float *x, const int *win);
void ef_max_pool_grad(float *dx, const float *x, const float *dy, const int *win);
void ef_average_pool(float *y, const float *x, const int *win, int count_include_pad);
void ef_average_pool_grad(float *dx, const float *dy, const int *win, int count_include_pad);
void ef_global_average_pool(float *y, const float *x, int planes, int plane_size);

/* ---- normalizations (the normalized axis / axes are viewed as (outer, n, inner) or (rows, n)) -------- */
void ef_softmax(float *y, const float *x, int outer, int n, int inner);
void ef_softmax_grad(float *dx, const float *y, const float *dy, int outer, int n, int inner);
/* rows of n elements; scale/bias (bias may be NULL) hold ns elements repeated along the row (n % ns == 0) */
void ef_layer_normalization(float *y, const float *x, const float *scale, const float *bias, int rows, int n,
                            int ns, float epsilon);
void ef_layer_norm_grad_input(float *dx, const float *x, const float *scale, const float *dy, int rows, int n,
                              int ns, float epsilon);
void ef_layer_norm_grad_scale(float *dscale, const float *x, const float *dy, int rows, int n, float epsilon);
void ef_batch_normalization(float *y, const float *x, const float *scale, const float *bias, const float *mean,
                            const float *var, int batch, int channels, int inner, float epsilon);

/* ---- losses (scalar results) ------------------------------------------------------------------------- */
void ef_softmax_cross_entropy(float *loss, const float *logits, const int64_t *labels, int rows, int classes);
void ef_softmax_cross_entropy_grad(float *dlogits, const float *logits, const int64_t *labels, const float *dy,
                                   int rows, int classes);
void ef_mse_loss(float *loss, const float *pred, const float *target, int n);
void ef_mse_loss_grad(float *dpred, const float *pred, const float *target, const float *dy, int n);

/* ---- optimizer: in place; velocity NULL = no momentum buffer; param rows of cols elements ld apart ------- */
void ef_sgd(float *param, const float *grad, const float *lr, float *velocity, int rows, int cols, int ld,
            float momentum, float weight_decay);
void ef_adam(float *param, const float *grad, const float *lr, float *m, float *v, float *corrections, int rows,
             int cols, int ld, float beta1, float beta2, float eps, float weight_decay);

/* ---- int8 (ef_quant.c): the quantized graph's forward in integers, its float32 backward helpers ----------- */
/* y = clamp(rint(x / scale) + zero_point, -128, 127) */
void ef_quantize(int8_t *y, const float *x, int n, float scale, int zero_point);
/* y = (x - zero_point) · scale */
void ef_dequantize(float *y, const int8_t *x, int n, float scale, int zero_point);
/* dx = dy · scale[c] over (outer, channels, inner), 0 where y (NULL: none) is -128 or 127 */
void ef_requant_grad(float *dx, const float *dy, const float *scale, const int8_t *y, int outer, int channels,
                     int inner);
/* y = clamp(rint((Σ (x - x_zero)·w + bias) · scale[m]) + y_zero): a grouped conv over the window `win` */
void ef_qconv(int8_t *y, const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale, const int *win,
              int x_zero, int y_zero);
/* x (n, k), w (m, k): acc = (x - x_zero)·wᵀ + b; y int8 requantized, or (out_float) float32 acc · scale[j] */
void ef_qlinear(void *y, const int8_t *x, const int8_t *w, const int32_t *b, const float *scale, int n, int m, int k,
                int x_zero, int y_zero, int out_float);
/* y[p] = clamp(rint(Σ x / plane_size)) per plane */
void ef_qglobal_average_pool(int8_t *y, const int8_t *x, int planes, int plane_size);
/* integer SGD in place (int8, or int32 when int32 != 0), rows of cols updated elements ld apart:
 * master NULL: p = clamp(p + rint(-(g·lr))); else master -= g·lr, p = clamp(rint(master)) */
void ef_qsgd(void *param, int int32, const float *grad, const float *lr, float *master, int rows, int cols, int ld);

#ifdef __cplusplus
}
#endif
#endif /* EF_KERNELS_H */
