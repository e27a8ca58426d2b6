/* Elementwise kernels: broadcasting binary ops, unary activations and their backward helpers. */
#include <math.h>

#include "ef_kernels.h"

#define SQRT_HALF 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f
#define TWO_OVER_SQRT_PI 1.12837916709551257390f
#define SQRT_2_OVER_PI 0.79788456080286535588f
#define GELU_CUBIC 0.044715f

/* y[i] = EXPR(u = a[i·sa], v = b[i·sb]) over an N-d index; the last axis is the inner loop, with fast paths
 * for the common stride pairs. y may be a (same shape, in place): each element is read before it is written. */
#define EF_BINARY(NAME, EXPR)                                                                               \
    void NAME(float *y, const float *a, const float *b, int rank, const int *shape, const int *sa,          \
              const int *sb) {                                                                              \
        int idx[EF_MAX_RANK] = {0};                                                                         \
        const int inner = shape[rank - 1], ia = sa[rank - 1], ib = sb[rank - 1];                           \
        long outer = 1, offa = 0, offb = 0;                                                                 \
        for (int d = 0; d < rank - 1; d++) outer *= shape[d];                                               \
        for (long o = 0; o < outer; o++) {                                                                  \
            const float *pa = a + offa, *pb = b + offb;                                                     \
            float *py = y + o * inner;                                                                      \
            if (ia == 1 && ib == 1) {                                                                       \
                for (int j = 0; j < inner; j++) { float u = pa[j], v = pb[j]; py[j] = (EXPR); }             \
            } else if (ia == 1 && ib == 0) {                                                                \
                const float v = pb[0];                                                                      \
                for (int j = 0; j < inner; j++) { float u = pa[j]; py[j] = (EXPR); }                        \
            } else if (ia == 0 && ib == 1) {                                                                \
                const float u = pa[0];                                                                      \
                for (int j = 0; j < inner; j++) { float v = pb[j]; py[j] = (EXPR); }                        \
            } else {                                                                                        \
                for (int j = 0; j < inner; j++) { float u = pa[j * ia], v = pb[j * ib]; py[j] = (EXPR); }   \
            }                                                                                               \
            for (int d = rank - 2; d >= 0; d--) {                                                           \
                offa += sa[d];                                                                              \
                offb += sb[d];                                                                              \
                if (++idx[d] < shape[d]) break;                                                             \
                offa -= (long)sa[d] * shape[d];                                                             \
                offb -= (long)sb[d] * shape[d];                                                             \
                idx[d] = 0;                                                                                 \
            }                                                                                               \
        }                                                                                                   \
    }

EF_BINARY(ef_add, u + v)
EF_BINARY(ef_sub, u - v)
EF_BINARY(ef_mul, u * v)
EF_BINARY(ef_div, u / v)
EF_BINARY(ef_pow, powf(u, v))

void ef_neg(float *y, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] = -x[i];
}

void ef_relu(float *y, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

void ef_sigmoid(float *y, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] = 1.0f / (1.0f + expf(-x[i]));
}

void ef_tanh(float *y, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] = tanhf(x[i]);
}

void ef_erf(float *y, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] = erff(x[i]);
}

void ef_sqrt(float *y, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] = sqrtf(x[i]);
}

void ef_exp(float *y, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] = expf(x[i]);
}

void ef_gelu(float *y, const float *x, int n, int approximate_tanh) {
    if (approximate_tanh) {
        for (int i = 0; i < n; i++) {
            const float v = x[i];
            y[i] = 0.5f * v * (1.0f + tanhf(SQRT_2_OVER_PI * (v + GELU_CUBIC * v * v * v)));
        }
    } else {
        for (int i = 0; i < n; i++) y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * SQRT_HALF));
    }
}

void ef_relu_grad(float *dx, const float *y, const float *dy, int n) {
    for (int i = 0; i < n; i++) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

void ef_sigmoid_grad(float *dx, const float *y, const float *dy, int n) {
    for (int i = 0; i < n; i++) dx[i] = dy[i] * y[i] * (1.0f - y[i]);
}

void ef_tanh_grad(float *dx, const float *y, const float *dy, int n) {
    for (int i = 0; i < n; i++) dx[i] = dy[i] * (1.0f - y[i] * y[i]);
}

void ef_erf_grad(float *dx, const float *x, const float *dy, int n) {
    for (int i = 0; i < n; i++) dx[i] = dy[i] * TWO_OVER_SQRT_PI * expf(-x[i] * x[i]);
}

void ef_gelu_grad(float *dx, const float *x, const float *dy, int n, int approximate_tanh) {
    for (int i = 0; i < n; i++) {
        const float v = x[i];
        float d;
        if (approximate_tanh) {
            const float t = tanhf(SQRT_2_OVER_PI * (v + GELU_CUBIC * v * v * v));
            d = 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_CUBIC * v * v);
        } else {
            d = 0.5f * (1.0f + erff(v * SQRT_HALF)) + v * INV_SQRT_2PI * expf(-0.5f * v * v);
        }
        dx[i] = dy[i] * d;
    }
}

/* ---- activations (compiler/ops/activation.py); backward helpers read the forward input x ------------ */
#define SOFTPLUS_THRESHOLD 20.0f

EF_BINARY(ef_prelu, u > 0.0f ? u : u * v)
EF_BINARY(ef_equal_mask, u == v ? 1.0f : 0.0f)

void ef_clip(float *y, const float *x, int n, float lo, float hi) {
    for (int i = 0; i < n; i++) y[i] = x[i] < lo ? lo : (x[i] > hi ? hi : x[i]);
}

void ef_clip_grad(float *dx, const float *x, const float *dy, int n, float lo, float hi) {
    for (int i = 0; i < n; i++) dx[i] = (x[i] >= lo && x[i] <= hi) ? dy[i] : 0.0f;
}

void ef_leaky_relu(float *y, const float *x, int n, float alpha) {
    for (int i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : x[i] * alpha;
}

void ef_leaky_relu_grad(float *dx, const float *x, const float *dy, int n, float alpha) {
    for (int i = 0; i < n; i++) dx[i] = x[i] > 0.0f ? dy[i] : dy[i] * alpha;
}

void ef_hard_sigmoid(float *y, const float *x, int n, float alpha, float beta) {
    for (int i = 0; i < n; i++) {
        const float v = x[i] * alpha + beta;
        y[i] = v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);
    }
}

void ef_hard_sigmoid_grad(float *dx, const float *x, const float *dy, int n, float alpha, float beta) {
    for (int i = 0; i < n; i++) {
        const float v = x[i] * alpha + beta;
        dx[i] = (v > 0.0f && v < 1.0f) ? dy[i] * alpha : 0.0f;
    }
}

void ef_hard_swish(float *y, const float *x, int n) {
    for (int i = 0; i < n; i++) {
        const float v = x[i] / 6.0f + 0.5f;
        y[i] = x[i] * (v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v));
    }
}

void ef_hard_swish_grad(float *dx, const float *x, const float *dy, int n) {
    for (int i = 0; i < n; i++) {
        const float v = x[i];
        dx[i] = v < -3.0f ? 0.0f : (v <= 3.0f ? dy[i] * (v / 3.0f + 0.5f) : dy[i]);
    }
}

void ef_elu(float *y, const float *x, int n, float alpha) {
    for (int i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : alpha * expm1f(x[i]);
}

void ef_elu_grad(float *dx, const float *x, const float *dy, int n, float alpha) {
    for (int i = 0; i < n; i++) dx[i] = x[i] > 0.0f ? dy[i] : dy[i] * alpha * expf(x[i]);
}

void ef_softplus(float *y, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] = x[i] > SOFTPLUS_THRESHOLD ? x[i] : log1pf(expf(x[i]));
}

void ef_softplus_grad(float *dx, const float *x, const float *dy, int n) {
    for (int i = 0; i < n; i++) {
        if (x[i] > SOFTPLUS_THRESHOLD) {
            dx[i] = dy[i];
        } else {
            const float z = expf(x[i]);
            dx[i] = dy[i] * z / (z + 1.0f);
        }
    }
}

/* y[i] = cond[i·sc] ? a[i·sa] : b[i·sb] over an N-d index (cond is bool, one byte per element). */
void ef_where(float *y, const uint8_t *cond, const float *a, const float *b, int rank, const int *shape,
              const int *sc, const int *sa, const int *sb) {
    int idx[EF_MAX_RANK] = {0};
    const int inner = shape[rank - 1];
    long outer = 1, offc = 0, offa = 0, offb = 0;
    for (int d = 0; d < rank - 1; d++) outer *= shape[d];
    for (long o = 0; o < outer; o++) {
        float *py = y + o * inner;
        for (int j = 0; j < inner; j++) {
            py[j] = cond[offc + (long)j * sc[rank - 1]] ? a[offa + (long)j * sa[rank - 1]]
                                                        : b[offb + (long)j * sb[rank - 1]];
        }
        for (int d = rank - 2; d >= 0; d--) {
            offc += sc[d];
            offa += sa[d];
            offb += sb[d];
            if (++idx[d] < shape[d]) break;
            offc -= (long)sc[d] * shape[d];
            offa -= (long)sa[d] * shape[d];
            offb -= (long)sb[d] * shape[d];
            idx[d] = 0;
        }
    }
}
