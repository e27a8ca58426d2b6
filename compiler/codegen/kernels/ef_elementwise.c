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
