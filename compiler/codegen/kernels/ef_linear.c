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

/* ---- LoRA: one pass over the rows. Row i of device d: y_i = ef_gemm's row, then the adapter, EF_MAX_LORA_RANK
 * ranks at a time (s = scale·(x_i·A_d[:, chunk]), y_i += s·B_d[chunk, :]). Per element the operations of the numpy
 * forward (product, alpha, C, then the adapter); every sum is sequential and adds onto its output in place, in the
 * order ef_hal_lora.c's RedMulE jobs add (the HAL path gives the same bits on the generic HAL). ------------------ */
static int min_rank(int a, int b) { return a < b ? a : b; }

/* s[0, rc) = scale · v·A[:, p0:p0+rc], v of length k, A (k, r) */
static void lora_down(float *s, const float *v, const float *a, int k, int r, int p0, int rc, float scale) {
    for (int p = 0; p < rc; p++) s[p] = 0.0f;
    for (int q = 0; q < k; q++) {
        const float vq = v[q];
        const float *ar = a + (long)q * r + p0;
        for (int p = 0; p < rc; p++) s[p] += vq * ar[p];
    }
    for (int p = 0; p < rc; p++) s[p] *= scale;
}

/* ds[0, rc) = scale · v·B[p0:p0+rc, :]ᵀ, v of length n, B (r, n) */
static void lora_down_t(float *ds, const float *v, const float *b, int n, int p0, int rc, float scale) {
    for (int p = 0; p < rc; p++) {
        const float *br = b + (long)(p0 + p) * n;
        float acc = 0.0f;
        for (int j = 0; j < n; j++) acc += v[j] * br[j];
        ds[p] = acc * scale;
    }
}

void ef_lora_linear(float *y, const float *x, const float *w, const float *a, const float *b, const float *c,
                    int m, int n, int k, int r, int devices, int trans_b, float alpha, float beta, int c_rs,
                    int c_cs, float scale) {
    float s[EF_MAX_LORA_RANK];
    const int rows = m / (devices > 1 ? devices : 1);
    for (int i = 0; i < m; i++) {
        const long d = i / rows;
        const float *xr = x + (long)i * k, *ad = a + d * k * r, *bd = b + d * r * n;
        float *yr = y + (long)i * n;
        ef_gemm(yr, xr, w, c ? c + (long)i * c_rs : NULL, 1, n, k, 0, trans_b, alpha, beta, 0, c_cs);
        for (int p0 = 0; p0 < r; p0 += EF_MAX_LORA_RANK) {
            const int rc = min_rank(EF_MAX_LORA_RANK, r - p0);
            lora_down(s, xr, ad, k, r, p0, rc, scale);
            for (int p = 0; p < rc; p++) {
                const float sv = s[p];
                const float *br = bd + (long)(p0 + p) * n;
                for (int j = 0; j < n; j++) yr[j] += sv * br[j];
            }
        }
    }
}

void ef_lora_linear_grad(float *dx, float *da, float *db, const float *dy, const float *x, const float *w,
                         const float *a, const float *b, int m, int n, int k, int r, int devices, int trans_b,
                         float alpha, float scale) {
    float s[EF_MAX_LORA_RANK], ds[EF_MAX_LORA_RANK];
    const int d_count = devices > 1 ? devices : 1, rows = m / d_count;
    if (da) memset(da, 0, sizeof(float) * (size_t)d_count * (size_t)k * (size_t)r);
    if (db) memset(db, 0, sizeof(float) * (size_t)d_count * (size_t)r * (size_t)n);
    for (int i = 0; i < m; i++) {
        const long d = i / rows;
        const float *dyr = dy + (long)i * n, *xr = x + (long)i * k, *ad = a + d * k * r, *bd = b + d * r * n;
        float *dxr = dx ? dx + (long)i * k : NULL, *dad = da ? da + d * k * r : NULL;
        float *dbd = db ? db + d * r * n : NULL;
        if (dxr) ef_gemm(dxr, dyr, w, NULL, 1, k, n, 0, !trans_b, alpha, 1.0f, 0, 0);   /* alpha·dY_i·W'ᵀ */
        for (int p0 = 0; p0 < r; p0 += EF_MAX_LORA_RANK) {
            const int rc = min_rank(EF_MAX_LORA_RANK, r - p0);
            if (dxr || dad) lora_down_t(ds, dyr, bd, n, p0, rc, scale);
            if (dxr) {                                      /* dx_i += dS_i·A_d[:, chunk]ᵀ */
                for (int q = 0; q < k; q++) {
                    const float *ar = ad + (long)q * r + p0;
                    for (int p = 0; p < rc; p++) dxr[q] += ds[p] * ar[p];
                }
            }
            if (dad) {                                      /* dA_d[:, chunk] += x_iᵀ·dS_i */
                for (int q = 0; q < k; q++) {
                    const float xq = xr[q];
                    float *dar = dad + (long)q * r + p0;
                    for (int p = 0; p < rc; p++) dar[p] += xq * ds[p];
                }
            }
            if (dbd) {                                      /* dB_d[chunk, :] += S_iᵀ·dY_i */
                lora_down(s, xr, ad, k, r, p0, rc, scale);
                for (int p = 0; p < rc; p++) {
                    const float sv = s[p];
                    float *dbr = dbd + (long)(p0 + p) * n;
                    for (int j = 0; j < n; j++) dbr[j] += sv * dyr[j];
                }
            }
        }
    }
}
