/* Data-movement kernels (any dtype), reductions, Cast, Shape and Gather. Every N-d walk uses the same
 * odometer: the last axis is the inner loop, the others advance a counter per axis. */
#include <math.h>
#include <string.h>

#include "ef_kernels.h"

static inline void copy_elem(char *dst, const char *src, int esize) {
    switch (esize) {
    case 4: *(uint32_t *)dst = *(const uint32_t *)src; break;
    case 8: *(uint64_t *)dst = *(const uint64_t *)src; break;
    case 2: *(uint16_t *)dst = *(const uint16_t *)src; break;
    case 1: *dst = *src; break;
    default: memcpy(dst, src, (size_t)esize); break;
    }
}

/* dense <-> strided copy: for every N-d index i of `shape`, dense[i] <-> strided[Σ i_d·s_d]
 * (to_dense: gather from the strided side; otherwise scatter into it). */
static void strided_copy(char *dense, char *strided, int esize, int rank, const int *shape, const int *s,
                         int to_dense) {
    int idx[EF_MAX_RANK] = {0};
    const int inner = shape[rank - 1], si = s[rank - 1];
    long outer = 1, off = 0;
    for (int d = 0; d < rank - 1; d++) outer *= shape[d];
    for (long o = 0; o < outer; o++) {
        char *pd = dense + o * inner * esize, *ps = strided + off * esize;
        if (si == 1) {
            if (to_dense) memcpy(pd, ps, (size_t)inner * esize);
            else memcpy(ps, pd, (size_t)inner * esize);
        } else if (to_dense) {
            for (int j = 0; j < inner; j++) copy_elem(pd + (long)j * esize, ps + (long)j * si * esize, esize);
        } else {
            for (int j = 0; j < inner; j++) copy_elem(ps + (long)j * si * esize, pd + (long)j * esize, esize);
        }
        for (int d = rank - 2; d >= 0; d--) {
            off += s[d];
            if (++idx[d] < shape[d]) break;
            off -= (long)s[d] * shape[d];
            idx[d] = 0;
        }
    }
}

void ef_transpose(void *y, const void *x, int esize, int rank, const int *shape, const int *sx) {
    strided_copy((char *)y, (char *)x, esize, rank, shape, sx, 1);
}

void ef_expand(void *y, const void *x, int esize, int rank, const int *shape, const int *sx) {
    strided_copy((char *)y, (char *)x, esize, rank, shape, sx, 1);
}

void ef_slice(void *y, const void *x, int esize, int offset, int rank, const int *shape, const int *sx) {
    strided_copy((char *)y, (char *)x + (long)offset * esize, esize, rank, shape, sx, 1);
}

void ef_slice_grad(void *dx, const void *dy, int esize, int n_dx, int offset, int rank, const int *shape,
                   const int *sdx) {
    memset(dx, 0, (size_t)n_dx * esize);
    strided_copy((char *)dy, (char *)dx + (long)offset * esize, esize, rank, shape, sdx, 0);
}

void ef_concat(void *y, void *const *xs, int esize, int n_inputs, int outer, const int *chunk) {
    char *out = (char *)y;
    for (int o = 0; o < outer; o++) {
        for (int i = 0; i < n_inputs; i++) {
            const size_t bytes = (size_t)chunk[i] * esize;
            memcpy(out, (const char *)xs[i] + (size_t)o * bytes, bytes);
            out += bytes;
        }
    }
}

void ef_split(void *const *ys, const void *x, int esize, int n_outputs, int outer, const int *chunk) {
    const char *in = (const char *)x;
    for (int o = 0; o < outer; o++) {
        for (int i = 0; i < n_outputs; i++) {
            const size_t bytes = (size_t)chunk[i] * esize;
            memcpy((char *)ys[i] + (size_t)o * bytes, in, bytes);
            in += bytes;
        }
    }
}

/* Cast: floats go through double, integers through int64 (each conversion a single C cast, as numpy's). */
void ef_cast(void *y, int y_dtype, const void *x, int x_dtype, int n) {
    for (int i = 0; i < n; i++) {
        int is_float = 1;
        double f = 0.0;
        int64_t v = 0;
        switch (x_dtype) {
        case EF_F32: f = ((const float *)x)[i]; break;
        case EF_F64: f = ((const double *)x)[i]; break;
        case EF_I64: v = ((const int64_t *)x)[i]; is_float = 0; break;
        case EF_I32: v = ((const int32_t *)x)[i]; is_float = 0; break;
        default: v = ((const uint8_t *)x)[i] != 0; is_float = 0; break;
        }
        switch (y_dtype) {
        case EF_F32:
            if (x_dtype == EF_F32) ((float *)y)[i] = ((const float *)x)[i];
            else ((float *)y)[i] = is_float ? (float)f : (float)v;
            break;
        case EF_F64: ((double *)y)[i] = is_float ? f : (double)v; break;
        case EF_I64: ((int64_t *)y)[i] = is_float ? (int64_t)f : v; break;
        case EF_I32: ((int32_t *)y)[i] = is_float ? (int32_t)f : (int32_t)v; break;
        default: ((uint8_t *)y)[i] = is_float ? (f != 0.0) : (v != 0); break;
        }
    }
}

void ef_shape(int64_t *y, int n, const int *dims) {
    for (int i = 0; i < n; i++) y[i] = dims[i];
}

void ef_gather(void *y, const void *data, const void *indices, int esize, int idx64, int outer, int axis_len,
               int inner, int nidx) {
    char *out = (char *)y;
    const size_t row = (size_t)inner * esize;
    for (int o = 0; o < outer; o++) {
        for (int t = 0; t < nidx; t++) {
            long i = idx64 ? (long)((const int64_t *)indices)[t] : (long)((const int32_t *)indices)[t];
            if (i < 0) i += axis_len;
            memcpy(out, (const char *)data + ((size_t)o * axis_len + (size_t)i) * row, row);
            out += row;
        }
    }
}

/* y (ny) = Σ over x's N-d index of x[i], accumulated at y[Σ i_d·sy_d]. */
void ef_reduce_sum(float *y, const float *x, int ny, int rank, const int *shape, const int *sy) {
    int idx[EF_MAX_RANK] = {0};
    const int inner = shape[rank - 1], si = sy[rank - 1];
    long outer = 1, off = 0;
    memset(y, 0, sizeof(float) * (size_t)ny);
    for (int d = 0; d < rank - 1; d++) outer *= shape[d];
    for (long o = 0; o < outer; o++) {
        const float *px = x + o * inner;
        float *py = y + off;
        if (si == 0) {
            float s = 0.0f;
            for (int j = 0; j < inner; j++) s += px[j];
            py[0] += s;
        } else {
            for (int j = 0; j < inner; j++) py[(long)j * si] += px[j];
        }
        for (int d = rank - 2; d >= 0; d--) {
            off += sy[d];
            if (++idx[d] < shape[d]) break;
            off -= (long)sy[d] * shape[d];
            idx[d] = 0;
        }
    }
}

void ef_reduce_mean(float *y, const float *x, int ny, int rank, const int *shape, const int *sy, int count) {
    ef_reduce_sum(y, x, ny, rank, shape, sy);
    for (int i = 0; i < ny; i++) y[i] /= (float)count;
}

void ef_reduce_sum_to(float *y, const float *x, int ny, int rank, const int *shape, const int *sy) {
    ef_reduce_sum(y, x, ny, rank, shape, sy);
}

/* Gather's gradient: dx (outer, axis_len, inner) = 0, then each dy row added at the index it was read from. */
void ef_gather_grad(float *dx, const float *dy, const void *indices, int idx64, int outer, int axis_len,
                    int inner, int nidx) {
    memset(dx, 0, sizeof(float) * (size_t)outer * axis_len * inner);
    for (int o = 0; o < outer; o++) {
        for (int t = 0; t < nidx; t++) {
            long i = idx64 ? (long)((const int64_t *)indices)[t] : (long)((const int32_t *)indices)[t];
            if (i < 0) i += axis_len;
            float *row = dx + ((size_t)o * axis_len + (size_t)i) * inner;
            const float *src = dy + ((size_t)o * nidx + (size_t)t) * inner;
            for (int j = 0; j < inner; j++) row[j] += src[j];
        }
    }
}

/* The odometer over x's N-d index with y's offset Σ i_d·sy_d: calls BODY(i, off) for every element. */
#define EF_REDUCE_WALK(BODY)                                                                                \
    do {                                                                                                    \
        int idx_[EF_MAX_RANK] = {0};                                                                        \
        long outer_ = 1, off_ = 0, i_ = 0;                                                                  \
        for (int d = 0; d < rank - 1; d++) outer_ *= shape[d];                                              \
        for (long o = 0; o < outer_; o++) {                                                                 \
            for (int j = 0; j < shape[rank - 1]; j++, i_++) {                                               \
                const long off = off_ + (long)j * sy[rank - 1], i = i_;                                     \
                BODY;                                                                                       \
            }                                                                                               \
            for (int d = rank - 2; d >= 0; d--) {                                                           \
                off_ += sy[d];                                                                              \
                if (++idx_[d] < shape[d]) break;                                                            \
                off_ -= (long)sy[d] * shape[d];                                                             \
                idx_[d] = 0;                                                                                \
            }                                                                                               \
        }                                                                                                   \
    } while (0)

void ef_reduce_max(float *y, const float *x, int ny, int rank, const int *shape, const int *sy) {
    for (int k = 0; k < ny; k++) y[k] = -INFINITY;
    EF_REDUCE_WALK(if (x[i] > y[off]) y[off] = x[i]);
}
