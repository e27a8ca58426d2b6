/* int8 kernels of the quantized graph (the Tiny Training Engine's; compiler/ops/quantized.py is the reference).
 *
 * Requantization is float32 and bit-exact with numpy and PyTorch: y = clamp(rintf((float)acc * m) + z_y) with
 * rintf rounding half to even (the default rounding mode) and no FMA contraction in these expressions.
 * The GEMM-like loops accumulate int8 x int8 products in int32 over contiguous rows (QLinear: Σ x·w − z_x·Σ w,
 * the weight-row sums taken once), the loop shape XpulpV2's 4-way int8 dot product (pv.sdotsp.b) serves (zig's
 * clang, the siracusa build here, has no XpulpV2: these loops run scalar there). QConv accumulates one output row
 * segment in int32 on the stack, tap by tap over the range of outputs that read inside the input (no bounds
 * checks in the inner loop), with the zero point subtracted per product, so padding contributes nothing. */
#include <math.h>
#include <stdint.h>

#include "ef_kernels.h"

#define EF_STEP_LIMIT 1073741824.0f /* |rint(-lr·g)| clamped to 2^30 before it is added to an integer */

static inline int8_t sat8(float v) {
    return v < -128.0f ? (int8_t)-128 : (v > 127.0f ? (int8_t)127 : (int8_t)v);
}

static inline int8_t requant(int32_t acc, float m, int zero) {
    const float scaled = (float)acc * m;
    return sat8(rintf(scaled) + (float)zero);
}

void ef_quantize(int8_t *y, const float *x, int n, float scale, int zero_point) {
    for (int i = 0; i < n; i++) {
        const float q = x[i] / scale;
        y[i] = sat8(rintf(q) + (float)zero_point);
    }
}

void ef_dequantize(float *y, const int8_t *x, int n, float scale, int zero_point) {
    for (int i = 0; i < n; i++) y[i] = ((float)x[i] - (float)zero_point) * scale;
}

void ef_requant_grad(float *dx, const float *dy, const float *scale, const int8_t *y, int outer, int channels,
                     int inner) {
    for (int o = 0; o < outer; o++) {
        for (int c = 0; c < channels; c++) {
            const long base = ((long)o * channels + c) * inner;
            for (int i = 0; i < inner; i++) {
                float d = dy[base + i] * scale[c];
                if (y && (y[base + i] == -128 || y[base + i] == 127)) d = 0.0f;
                dx[base + i] = d;
            }
        }
    }
}

/* outputs o in [*lo, *hi) with 0 <= o·stride + offset < in_len (as ef_window.c) */
static void valid_range(int out_len, int stride, int offset, int in_len, int *lo, int *hi) {
    int a = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
    int last = in_len - 1 - offset;
    int b = last < 0 ? 0 : last / stride + 1;
    if (b > out_len) b = out_len;
    if (a > b) a = b;
    *lo = a;
    *hi = b;
}

#define EF_QCONV_ROW 128 /* int32 accumulators of one output row segment, on the stack */

void ef_qconv(int8_t *y, const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale, const int *win,
              int x_zero, int y_zero) {
    const int n_ = win[EF_WIN_N], c_ = win[EF_WIN_C], h = win[EF_WIN_H], wd = win[EF_WIN_W], m_ = win[EF_WIN_M];
    const int oh = win[EF_WIN_OH], ow = win[EF_WIN_OW], kh = win[EF_WIN_KH], kw = win[EF_WIN_KW];
    const int sh = win[EF_WIN_SH], sw = win[EF_WIN_SW], dh = win[EF_WIN_DH], dw = win[EF_WIN_DW];
    const int pt = win[EF_WIN_PT], pl = win[EF_WIN_PL], g = win[EF_WIN_G];
    const int cg = c_ / g, mg = m_ / g;
    int32_t acc[EF_QCONV_ROW];
    for (int n = 0; n < n_; n++) {
        for (int m = 0; m < m_; m++) {
            const int8_t *xg = x + ((long)n * c_ + (long)(m / mg) * cg) * h * wd;
            const int8_t *wm = w + (long)m * cg * kh * kw;
            int8_t *ym = y + ((long)n * m_ + m) * oh * ow;
            for (int oy = 0; oy < oh; oy++) {
                for (int o0 = 0; o0 < ow; o0 += EF_QCONV_ROW) { /* a row segment of at most EF_QCONV_ROW outputs */
                    const int len = ow - o0 < EF_QCONV_ROW ? ow - o0 : EF_QCONV_ROW;
                    for (int t = 0; t < len; t++) acc[t] = bias[m];
                    for (int i = 0; i < kh; i++) {
                        const int iy = oy * sh + i * dh - pt;
                        if (iy < 0 || iy >= h) continue;
                        for (int j = 0; j < kw; j++) {
                            const int offx = j * dw - pl;
                            int lo, hi;  /* the segment's outputs whose tap j reads inside the row */
                            valid_range(ow, sw, offx, wd, &lo, &hi);
                            if (lo < o0) lo = o0;
                            if (hi > o0 + len) hi = o0 + len;
                            for (int c = 0; c < cg; c++) {
                                const int32_t wv = wm[((long)c * kh + i) * kw + j];
                                const int8_t *xr = xg + ((long)c * h + iy) * wd + offx;
                                for (int ox = lo; ox < hi; ox++)
                                    acc[ox - o0] += ((int32_t)xr[ox * sw] - x_zero) * wv;
                            }
                        }
                    }
                    for (int t = 0; t < len; t++) ym[oy * ow + o0 + t] = requant(acc[t], scale[m], y_zero);
                }
            }
        }
    }
}

void ef_qlinear(void *y, const int8_t *x, const int8_t *w, const int32_t *b, const float *scale, int n, int m, int k,
                int x_zero, int y_zero, int out_float) {
    for (int j = 0; j < m; j++) {
        const int8_t *wr = w + (long)j * k;
        int32_t wsum = 0;
        for (int t = 0; t < k; t++) wsum += wr[t];
        for (int i = 0; i < n; i++) {
            const int8_t *xr = x + (long)i * k;
            int32_t dot = 0;
            for (int t = 0; t < k; t++) dot += (int32_t)xr[t] * (int32_t)wr[t]; /* 4-way int8 sdotp */
            const int32_t acc = dot - x_zero * wsum + b[j];
            if (out_float) ((float *)y)[(long)i * m + j] = (float)acc * scale[j];
            else ((int8_t *)y)[(long)i * m + j] = requant(acc, scale[j], y_zero);
        }
    }
}

void ef_qglobal_average_pool(int8_t *y, const int8_t *x, int planes, int plane_size) {
    for (int p = 0; p < planes; p++) {
        const int8_t *xp = x + (long)p * plane_size;
        int32_t sum = 0;
        for (int i = 0; i < plane_size; i++) sum += xp[i];
        const float mean = (float)sum / (float)plane_size;
        y[p] = sat8(rintf(mean));
    }
}

void ef_qsgd(void *param, int int32, const float *grad, const float *lr, float *master, int rows, int cols, int ld) {
    const float rate = lr[0];
    const int64_t lo = int32 ? INT32_MIN : -128, hi = int32 ? INT32_MAX : 127;
    for (int r = 0; r < rows; r++) {
        for (int i = 0; i < cols; i++) {
            const long at = (long)r * ld + i, gi = (long)r * cols + i;
            const float step = grad[gi] * rate;
            int64_t v;
            if (master) {
                const float mv = master[gi] - step;
                master[gi] = mv;
                const float q = rintf(mv);
                v = q < (float)lo ? lo : (q > (float)hi ? hi : (int64_t)q);
            } else {
                float t = rintf(-step);
                if (t > EF_STEP_LIMIT) t = EF_STEP_LIMIT;
                if (t < -EF_STEP_LIMIT) t = -EF_STEP_LIMIT;
                const int64_t p = int32 ? ((const int32_t *)param)[at] : ((const int8_t *)param)[at];
                v = p + (int64_t)t;
                v = v < lo ? lo : (v > hi ? hi : v);
            }
            if (int32) ((int32_t *)param)[at] = (int32_t)v;
            else ((int8_t *)param)[at] = (int8_t)v;
        }
    }
}
