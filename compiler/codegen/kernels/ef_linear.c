/* GEMM kernels. Loop orders keep the innermost loop on contiguous rows: i-k-j when B' is B, dot products
 * (i-j-k) when B' is Bᵀ. */
#include <string.h>

#include "ef_kernels.h"

#ifdef EF_NAIVE_GEMM
/* Baseline for benchmarks/qemu_instructions.py only (-DEF_NAIVE_GEMM): the textbook i-j-k triple loop, no
 * blocking, no loop-order care, the transposes resolved in the innermost loop and the sum kept in y. Every
 * element is the same sequential sum as below. */
static void gemm_core(float *y, const float *a, const float *b, int m, int n, int k, int trans_a, int trans_b) {
    for (int i = 0; i < m; i++) {
        for (int j = 0; j < n; j++) {
            y[(long)i * n + j] = 0.0f;
            for (int p = 0; p < k; p++) {
                const float av = trans_a ? a[(long)p * m + i] : a[(long)i * k + p];
                const float bv = trans_b ? b[(long)j * k + p] : b[(long)p * n + j];
                y[(long)i * n + j] += av * bv;
            }
        }
    }
}
#else
/* y (m, n) = A'·B' (overwrites y) */
static void gemm_core(float *y, const float *a, const float *b, int m, int n, int k, int trans_a, int trans_b) {
    if (!trans_b) {
        for (int i = 0; i < m; i++) {
            float *yr = y + (long)i * n;
            memset(yr, 0, sizeof(float) * (size_t)n);
            for (int p = 0; p < k; p++) {
                const float av = trans_a ? a[(long)p * m + i] : a[(long)i * k + p];
                const float *br = b + (long)p * n;
                for (int j = 0; j < n; j++) yr[j] += av * br[j];
            }
        }
        return;
    }
    for (int i = 0; i < m; i++) {
        float *yr = y + (long)i * n;
        for (int j = 0; j < n; j++) {
            const float *br = b + (long)j * k;
            float s = 0.0f;
            if (!trans_a) {
                const float *ar = a + (long)i * k;
                for (int p = 0; p < k; p++) s += ar[p] * br[p];
            } else {
                for (int p = 0; p < k; p++) s += a[(long)p * m + i] * br[p];
            }
            yr[j] = s;
        }
    }
}
#endif

void ef_gemm(float *y, const float *a, const float *b, const float *c, int m, int n, int k, int trans_a,
             int trans_b, float alpha, float beta, int c_rs, int c_cs) {
    gemm_core(y, a, b, m, n, k, trans_a, trans_b);
    if (alpha != 1.0f) {
        for (long i = 0; i < (long)m * n; i++) y[i] *= alpha;
    }
    if (c) {
        for (int i = 0; i < m; i++) {
            float *yr = y + (long)i * n;
            const float *cr = c + (long)i * c_rs;
            if (beta == 1.0f) {
                for (int j = 0; j < n; j++) yr[j] += cr[(long)j * c_cs];
            } else {
                for (int j = 0; j < n; j++) yr[j] += cr[(long)j * c_cs] * beta;
            }
        }
    }
}

void ef_mat_mul(float *y, const float *a, const float *b, int m, int n, int k, int brank, const int *bshape,
                const int *sa, const int *sb) {
    int idx[EF_MAX_RANK] = {0};
    long batches = 1, offa = 0, offb = 0;
    for (int d = 0; d < brank; d++) batches *= bshape[d];
    for (long t = 0; t < batches; t++) {
        gemm_core(y + t * m * n, a + offa, b + offb, m, n, k, 0, 0);
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
