/* Sliding-window kernels (Conv and its gradients, pools). Direct loops, no im2col buffer: for every kernel
 * tap the range of output rows/columns that read inside the input is computed once, so the inner loops
 * carry no bounds checks. */
#include <math.h>
#include <string.h>

#include "ef_kernels.h"

typedef struct {
    int n, c, h, w, m, oh, ow, kh, kw, sh, sw, dh, dw, pt, pl, pb, pr, g;
} window_t;

static window_t unpack(const int *v) {
    window_t g = {v[EF_WIN_N], v[EF_WIN_C], v[EF_WIN_H], v[EF_WIN_W], v[EF_WIN_M], v[EF_WIN_OH], v[EF_WIN_OW],
                  v[EF_WIN_KH], v[EF_WIN_KW], v[EF_WIN_SH], v[EF_WIN_SW], v[EF_WIN_DH], v[EF_WIN_DW],
                  v[EF_WIN_PT], v[EF_WIN_PL], v[EF_WIN_PB], v[EF_WIN_PR], v[EF_WIN_G]};
    return g;
}

/* outputs o in [*lo, *hi) with 0 <= o·stride + offset < in_len */
static void valid_range(int out_len, int stride, int offset, int in_len, int *lo, int *hi) {
    int a = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
    int last = in_len - 1 - offset;
    int b = last < 0 ? 0 : last / stride + 1;
    if (b > out_len) b = out_len;
    if (a > b) a = b;
    *lo = a;
    *hi = b;
}

void ef_conv(float *y, const float *x, const float *w, const float *bias, const int *win) {
    const window_t g = unpack(win);
    const int cg = g.c / g.g, mg = g.m / g.g, plane = g.oh * g.ow;
    for (int n = 0; n < g.n; n++) {
        for (int m = 0; m < g.m; m++) {
            float *yp = y + ((long)n * g.m + m) * plane;
            const int grp = m / mg;
            memset(yp, 0, sizeof(float) * (size_t)plane);
            for (int c = 0; c < cg; c++) {
                const float *xp = x + ((long)n * g.c + (long)grp * cg + c) * g.h * g.w;
                const float *wp = w + ((long)m * cg + c) * g.kh * g.kw;
                for (int i = 0; i < g.kh; i++) {
                    int oy0, oy1;
                    valid_range(g.oh, g.sh, i * g.dh - g.pt, g.h, &oy0, &oy1);
                    for (int j = 0; j < g.kw; j++) {
                        const float wv = wp[i * g.kw + j];
                        const int offx = j * g.dw - g.pl;
                        int ox0, ox1;
                        valid_range(g.ow, g.sw, offx, g.w, &ox0, &ox1);
                        for (int oy = oy0; oy < oy1; oy++) {
                            const float *xr = xp + (long)(oy * g.sh + i * g.dh - g.pt) * g.w + offx;
                            float *yr = yp + (long)oy * g.ow;
                            for (int ox = ox0; ox < ox1; ox++) yr[ox] += wv * xr[ox * g.sw];
                        }
                    }
                }
            }
            if (bias) {
                for (int p = 0; p < plane; p++) yp[p] += bias[m];
            }
        }
    }
}

void ef_conv_grad_input(float *dx, const float *dy, const float *w, const int *win) {
    const window_t g = unpack(win);
    const int cg = g.c / g.g, mg = g.m / g.g, plane = g.oh * g.ow;
    memset(dx, 0, sizeof(float) * (size_t)g.n * g.c * g.h * g.w);
    for (int n = 0; n < g.n; n++) {
        for (int m = 0; m < g.m; m++) {
            const float *dyp = dy + ((long)n * g.m + m) * plane;
            const int grp = m / mg;
            for (int c = 0; c < cg; c++) {
                float *dxp = dx + ((long)n * g.c + (long)grp * cg + c) * g.h * g.w;
                const float *wp = w + ((long)m * cg + c) * g.kh * g.kw;
                for (int i = 0; i < g.kh; i++) {
                    int oy0, oy1;
                    valid_range(g.oh, g.sh, i * g.dh - g.pt, g.h, &oy0, &oy1);
                    for (int j = 0; j < g.kw; j++) {
                        const float wv = wp[i * g.kw + j];
                        const int offx = j * g.dw - g.pl;
                        int ox0, ox1;
                        valid_range(g.ow, g.sw, offx, g.w, &ox0, &ox1);
                        for (int oy = oy0; oy < oy1; oy++) {
                            float *xr = dxp + (long)(oy * g.sh + i * g.dh - g.pt) * g.w + offx;
                            const float *dyr = dyp + (long)oy * g.ow;
                            for (int ox = ox0; ox < ox1; ox++) xr[ox * g.sw] += wv * dyr[ox];
                        }
                    }
                }
            }
        }
    }
}

void ef_conv_grad_weight(float *dw, const float *x, const float *dy, const int *win) {
    const window_t g = unpack(win);
    const int cg = g.c / g.g, mg = g.m / g.g, plane = g.oh * g.ow;
    for (int m = 0; m < g.m; m++) {
        const int grp = m / mg;
        for (int c = 0; c < cg; c++) {
            for (int i = 0; i < g.kh; i++) {
                int oy0, oy1;
                valid_range(g.oh, g.sh, i * g.dh - g.pt, g.h, &oy0, &oy1);
                for (int j = 0; j < g.kw; j++) {
                    const int offx = j * g.dw - g.pl;
                    int ox0, ox1;
                    valid_range(g.ow, g.sw, offx, g.w, &ox0, &ox1);
                    float s = 0.0f;
                    for (int n = 0; n < g.n; n++) {
                        const float *xp = x + ((long)n * g.c + (long)grp * cg + c) * g.h * g.w;
                        const float *dyp = dy + ((long)n * g.m + m) * plane;
                        for (int oy = oy0; oy < oy1; oy++) {
                            const float *xr = xp + (long)(oy * g.sh + i * g.dh - g.pt) * g.w + offx;
                            const float *dyr = dyp + (long)oy * g.ow;
                            for (int ox = ox0; ox < ox1; ox++) s += dyr[ox] * xr[ox * g.sw];
                        }
                    }
                    dw[(((long)m * cg + c) * g.kh + i) * g.kw + j] = s;
                }
            }
        }
    }
}

/* ---- pools: planes = N·C; a window position is valid when it lies inside the input ------------------- */
static inline int inside(int v, int len) { return v >= 0 && v < len; }

void ef_max_pool(float *y, const float *x, const int *win) {
    const window_t g = unpack(win);
    for (long p = 0; p < (long)g.n * g.c; p++) {
        const float *xp = x + p * g.h * g.w;
        float *yp = y + p * g.oh * g.ow;
        for (int oy = 0; oy < g.oh; oy++) {
            for (int ox = 0; ox < g.ow; ox++) {
                float best = -INFINITY;
                for (int i = 0; i < g.kh; i++) {
                    const int iy = oy * g.sh + i * g.dh - g.pt;
                    if (!inside(iy, g.h)) continue;
                    for (int j = 0; j < g.kw; j++) {
                        const int ix = ox * g.sw + j * g.dw - g.pl;
                        if (inside(ix, g.w) && xp[iy * g.w + ix] > best) best = xp[iy * g.w + ix];
                    }
                }
                yp[oy * g.ow + ox] = best;
            }
        }
    }
}

/* each dy goes to the first maximum of its window (taps in row-major order; padding reads as -inf) */
void ef_max_pool_grad(float *dx, const float *x, const float *dy, const int *win) {
    const window_t g = unpack(win);
    memset(dx, 0, sizeof(float) * (size_t)g.n * g.c * g.h * g.w);
    for (long p = 0; p < (long)g.n * g.c; p++) {
        const float *xp = x + p * g.h * g.w;
        const float *dyp = dy + p * g.oh * g.ow;
        float *dxp = dx + p * g.h * g.w;
        for (int oy = 0; oy < g.oh; oy++) {
            for (int ox = 0; ox < g.ow; ox++) {
                float best = -INFINITY;
                int best_y = oy * g.sh - g.pt, best_x = ox * g.sw - g.pl; /* tap 0 */
                for (int i = 0; i < g.kh; i++) {
                    const int iy = oy * g.sh + i * g.dh - g.pt;
                    if (!inside(iy, g.h)) continue;
                    for (int j = 0; j < g.kw; j++) {
                        const int ix = ox * g.sw + j * g.dw - g.pl;
                        if (inside(ix, g.w) && xp[iy * g.w + ix] > best) {
                            best = xp[iy * g.w + ix];
                            best_y = iy;
                            best_x = ix;
                        }
                    }
                }
                if (inside(best_y, g.h) && inside(best_x, g.w)) dxp[best_y * g.w + best_x] += dyp[oy * g.ow + ox];
            }
        }
    }
}

/* how many positions window (oy, ox) averages over: explicit pads count only with count_include_pad; the
 * room ceil_mode adds past the pads never counts */
static int divisor(const window_t *g, int oy, int ox, int count_include_pad) {
    int lo_y = 0, hi_y = g->h, lo_x = 0, hi_x = g->w, rows = 0, cols = 0;
    if (count_include_pad) {
        lo_y = -g->pt; hi_y = g->h + g->pb; lo_x = -g->pl; hi_x = g->w + g->pr;
    }
    for (int i = 0; i < g->kh; i++) {
        const int iy = oy * g->sh + i * g->dh - g->pt;
        rows += iy >= lo_y && iy < hi_y;
    }
    for (int j = 0; j < g->kw; j++) {
        const int ix = ox * g->sw + j * g->dw - g->pl;
        cols += ix >= lo_x && ix < hi_x;
    }
    return rows * cols;
}

void ef_average_pool(float *y, const float *x, const int *win, int count_include_pad) {
    const window_t g = unpack(win);
    for (long p = 0; p < (long)g.n * g.c; p++) {
        const float *xp = x + p * g.h * g.w;
        float *yp = y + p * g.oh * g.ow;
        for (int oy = 0; oy < g.oh; oy++) {
            for (int ox = 0; ox < g.ow; ox++) {
                float s = 0.0f;
                for (int i = 0; i < g.kh; i++) {
                    const int iy = oy * g.sh + i * g.dh - g.pt;
                    if (!inside(iy, g.h)) continue;
                    for (int j = 0; j < g.kw; j++) {
                        const int ix = ox * g.sw + j * g.dw - g.pl;
                        if (inside(ix, g.w)) s += xp[iy * g.w + ix];
                    }
                }
                yp[oy * g.ow + ox] = s / (float)divisor(&g, oy, ox, count_include_pad);
            }
        }
    }
}

void ef_average_pool_grad(float *dx, const float *dy, const int *win, int count_include_pad) {
    const window_t g = unpack(win);
    memset(dx, 0, sizeof(float) * (size_t)g.n * g.c * g.h * g.w);
    for (long p = 0; p < (long)g.n * g.c; p++) {
        const float *dyp = dy + p * g.oh * g.ow;
        float *dxp = dx + p * g.h * g.w;
        for (int oy = 0; oy < g.oh; oy++) {
            for (int ox = 0; ox < g.ow; ox++) {
                const float share = dyp[oy * g.ow + ox] / (float)divisor(&g, oy, ox, count_include_pad);
                for (int i = 0; i < g.kh; i++) {
                    const int iy = oy * g.sh + i * g.dh - g.pt;
                    if (!inside(iy, g.h)) continue;
                    for (int j = 0; j < g.kw; j++) {
                        const int ix = ox * g.sw + j * g.dw - g.pl;
                        if (inside(ix, g.w)) dxp[iy * g.w + ix] += share;
                    }
                }
            }
        }
    }
}

void ef_global_average_pool(float *y, const float *x, int planes, int plane_size) {
    for (int p = 0; p < planes; p++) {
        const float *xp = x + (long)p * plane_size;
        float s = 0.0f;
        for (int i = 0; i < plane_size; i++) s += xp[i];
        y[p] = s / (float)plane_size;
    }
}

/* ---- LoRA on a convolution (LoraConv, group 1): per output pixel, the rank-r vector of that pixel on the stack */
static int lora_chunk(int r, int p0) { return r - p0 < EF_MAX_LORA_RANK ? r - p0 : EF_MAX_LORA_RANK; }

/* s[p] = scale · Σ_{c,i,j} A[p0+p, c, i, j] · x[n, c, oy·sh + i·dh - pt, ox·sw + j·dw - pl] (taps inside x) */
static void lora_conv_down(float *s, const float *xn, const float *a, const window_t *g, int oy, int ox, int p0,
                           int rc, float scale) {
    const int k = g->c * g->kh * g->kw;
    for (int p = 0; p < rc; p++) s[p] = 0.0f;
    for (int c = 0; c < g->c; c++) {
        for (int i = 0; i < g->kh; i++) {
            const int iy = oy * g->sh + i * g->dh - g->pt;
            if (iy < 0 || iy >= g->h) continue;
            for (int j = 0; j < g->kw; j++) {
                const int ix = ox * g->sw + j * g->dw - g->pl;
                if (ix < 0 || ix >= g->w) continue;
                const float xv = xn[((long)c * g->h + iy) * g->w + ix];
                const float *ap = a + (long)p0 * k + ((long)c * g->kh + i) * g->kw + j;
                for (int p = 0; p < rc; p++) s[p] += ap[(long)p * k] * xv;
            }
        }
    }
    for (int p = 0; p < rc; p++) s[p] *= scale;
}

void ef_lora_conv(float *y, const float *x, const float *w, const float *a, const float *b, const float *bias,
                  const int *win, int r, int devices, float scale) {
    const window_t g = unpack(win);
    const int d_count = devices > 1 ? devices : 1, per = g.n / d_count, plane = g.oh * g.ow;
    const long k = (long)g.c * g.kh * g.kw;
    float s[EF_MAX_LORA_RANK];
    ef_conv(y, x, w, bias, win);                                   /* the frozen layer */
    for (int n = 0; n < g.n; n++) {
        const long d = n / per;
        const float *xn = x + (long)n * g.c * g.h * g.w, *ad = a + d * r * k, *bd = b + d * g.m * r;
        float *yn = y + (long)n * g.m * plane;
        for (int oy = 0; oy < g.oh; oy++) {
            for (int ox = 0; ox < g.ow; ox++) {
                for (int p0 = 0; p0 < r; p0 += EF_MAX_LORA_RANK) {
                    const int rc = lora_chunk(r, p0);
                    lora_conv_down(s, xn, ad, &g, oy, ox, p0, rc, scale);
                    for (int m = 0; m < g.m; m++) {                /* y += B_d[:, chunk]·S (a 1×1 conv) */
                        const float *bm = bd + (long)m * r + p0;
                        float acc = 0.0f;
                        for (int p = 0; p < rc; p++) acc += bm[p] * s[p];
                        yn[(long)m * plane + oy * g.ow + ox] += acc;
                    }
                }
            }
        }
    }
}

void ef_lora_conv_grad(float *dx, float *da, float *db, const float *dy, const float *x, const float *w,
                       const float *a, const float *b, const int *win, int r, int devices, float scale) {
    const window_t g = unpack(win);
    const int d_count = devices > 1 ? devices : 1, per = g.n / d_count, plane = g.oh * g.ow;
    const long k = (long)g.c * g.kh * g.kw;
    float s[EF_MAX_LORA_RANK], ds[EF_MAX_LORA_RANK];
    if (dx) ef_conv_grad_input(dx, dy, w, win);                    /* the frozen layer's part (zeroes dx first) */
    if (da) memset(da, 0, sizeof(float) * (size_t)d_count * (size_t)r * (size_t)k);
    if (db) memset(db, 0, sizeof(float) * (size_t)d_count * (size_t)g.m * (size_t)r);
    for (int n = 0; n < g.n; n++) {
        const long d = n / per;
        const float *xn = x + (long)n * g.c * g.h * g.w, *dyn = dy + (long)n * g.m * plane;
        const float *ad = a + d * r * k, *bd = b + d * g.m * r;
        float *dxn = dx ? dx + (long)n * g.c * g.h * g.w : NULL, *dad = da ? da + d * r * k : NULL;
        float *dbd = db ? db + d * g.m * r : NULL;
        for (int oy = 0; oy < g.oh; oy++) {
            for (int ox = 0; ox < g.ow; ox++) {
                const long pix = oy * g.ow + ox;
                for (int p0 = 0; p0 < r; p0 += EF_MAX_LORA_RANK) {
                    const int rc = lora_chunk(r, p0);
                    if (dxn || dad) {                              /* dS = scale·B_dᵀ·dY at this pixel */
                        for (int p = 0; p < rc; p++) ds[p] = 0.0f;
                        for (int m = 0; m < g.m; m++) {
                            const float dv = dyn[(long)m * plane + pix];
                            const float *bm = bd + (long)m * r + p0;
                            for (int p = 0; p < rc; p++) ds[p] += bm[p] * dv;
                        }
                        for (int p = 0; p < rc; p++) ds[p] *= scale;
                        for (int c = 0; c < g.c; c++) {            /* dX += A_dᵀ·dS, dA_d += dS·x (the taps read) */
                            for (int i = 0; i < g.kh; i++) {
                                const int iy = oy * g.sh + i * g.dh - g.pt;
                                if (iy < 0 || iy >= g.h) continue;
                                for (int j = 0; j < g.kw; j++) {
                                    const int ix = ox * g.sw + j * g.dw - g.pl;
                                    if (ix < 0 || ix >= g.w) continue;
                                    const long at = (long)p0 * k + ((long)c * g.kh + i) * g.kw + j;
                                    const long xi = ((long)c * g.h + iy) * g.w + ix;
                                    if (dxn) {
                                        float acc = 0.0f;
                                        for (int p = 0; p < rc; p++) acc += ad[at + (long)p * k] * ds[p];
                                        dxn[xi] += acc;
                                    }
                                    if (dad) {
                                        for (int p = 0; p < rc; p++) dad[at + (long)p * k] += ds[p] * xn[xi];
                                    }
                                }
                            }
                        }
                    }
                    if (dbd) {                                     /* dB_d[:, chunk] += dY·Sᵀ */
                        lora_conv_down(s, xn, ad, &g, oy, ox, p0, rc, scale);
                        for (int m = 0; m < g.m; m++) {
                            const float dv = dyn[(long)m * plane + pix];
                            float *dbm = dbd + (long)m * r + p0;
                            for (int p = 0; p < rc; p++) dbm[p] += dv * s[p];
                        }
                    }
                }
            }
        }
    }
}
