/* ef_hal_conv / ef_hal_conv_grad_weight: the ef_conv / ef_conv_grad_weight ABI as im2col GEMMs on RedMulE, the way
 * the cost model charges a convolution lowered onto RedMulE (compiler/targets/views.py):
 *
 *   Conv            Y[M, P]  = W[M, C k] . col(X)[C k, P] (+ bias per row)      per image, P = OH OW
 *   ConvGradWeight  dW[M, C k] = sum over images of dY[M, P] . col(X)[C k, P]^T
 *
 * W (or the dW accumulator) stays in L1; the pixels are cut into tiles of as many as fit the free L1; for each tile
 * the cores build the col tile in L1 from X (read where it lies), RedMulE computes the product (on the cores where
 * the model has no RedMulE: hal/pulp), the cores add the bias, and the DMA moves the Y tile out (dY tiles in).
 * Ungrouped 2-D and 1-D convolutions only; a grouped one, or one whose tiles do not fit L1, runs the core kernel.
 * Written against ef_hal.h only, so the generic HAL (host, rv32-qemu) runs the very code the pulp HAL runs.
 */
#include <stddef.h>
#include <string.h>

#include "ef_hal.h"
#include "ef_hal_tasks.h"
#include "ef_kernels.h"

#define FLOAT_BYTES 4u
#define REDMULE_MAX_DIM 0xFFFF

typedef struct {
    float *col;                /* transposed: [pixel][ck], else [ck][pixel] */
    const float *x;            /* one image, C x H x W */
    const int *win;
    int p0, np, ck, transposed;
} im2col_t;

/* col rows (ck = (c KH + i) KW + j) split over the team; padding reads as 0 */
static void im2col_task(void *arg) {
    const im2col_t *t = (const im2col_t *)arg;
    const int *g = t->win;
    const int team = ef_hal_team_size(), me = ef_hal_core_id();
    const int lo = (int)((long)t->ck * me / team), hi = (int)((long)t->ck * (me + 1) / team);
    const int kk = g[EF_WIN_KH] * g[EF_WIN_KW];
    for (int ck = lo; ck < hi; ck++) {
        const int c = ck / kk, i = (ck / g[EF_WIN_KW]) % g[EF_WIN_KH], j = ck % g[EF_WIN_KW];
        const float *xc = t->x + (long)c * g[EF_WIN_H] * g[EF_WIN_W];
        for (int q = 0; q < t->np; q++) {
            const int p = t->p0 + q, oy = p / g[EF_WIN_OW], ox = p % g[EF_WIN_OW];
            const int iy = oy * g[EF_WIN_SH] + i * g[EF_WIN_DH] - g[EF_WIN_PT];
            const int ix = ox * g[EF_WIN_SW] + j * g[EF_WIN_DW] - g[EF_WIN_PL];
            const float v = (iy >= 0 && iy < g[EF_WIN_H] && ix >= 0 && ix < g[EF_WIN_W]) ? xc[iy * g[EF_WIN_W] + ix]
                                                                                        : 0.0f;
            if (t->transposed) t->col[(long)q * t->ck + ck] = v;
            else t->col[(long)ck * t->np + q] = v;
        }
    }
}

static void im2col(float *col, const float *x, const int *win, int p0, int np, int ck, int transposed) {
    im2col_t t = {col, x, win, p0, np, ck, transposed};
    ef_hal_fork(0, im2col_task, &t);
}

/* Pixels per tile: the most (up to P) whose per-pixel buffers fit what is left of L1. */
static int pixel_tile(int pixels, uint32_t per_pixel_bytes) {
    const uint32_t free = ef_hal_l1_free_bytes();
    const uint32_t slack = 64u;              /* alignment of the buffers */
    if (free <= slack || per_pixel_bytes == 0) return 0;
    long pt = (long)((free - slack) / per_pixel_bytes);
    if (pt > pixels) pt = pixels;
    if (pt > REDMULE_MAX_DIM) pt = REDMULE_MAX_DIM;
    return (int)pt;
}

static int supported(const int *win, int ck) {
    return win[EF_WIN_G] == 1 && win[EF_WIN_M] <= REDMULE_MAX_DIM && ck <= REDMULE_MAX_DIM;
}

void ef_hal_conv(float *y, const float *x, const float *w, const float *bias, const int *win) {
    const int m = win[EF_WIN_M], ck = win[EF_WIN_C] * win[EF_WIN_KH] * win[EF_WIN_KW];
    const int pixels = win[EF_WIN_OH] * win[EF_WIN_OW];
    const uint32_t mark = ef_hal_l1_mark();
    float *wl = supported(win, ck) ? (float *)ef_hal_l1_alloc(FLOAT_BYTES * (uint32_t)m * (uint32_t)ck) : NULL;
    const int pt = wl ? pixel_tile(pixels, FLOAT_BYTES * (uint32_t)(ck + m)) : 0;
    if (pt < 1) {
        ef_hal_l1_release(mark);
        ef_conv(y, x, w, bias, win);
        return;
    }
    float *col = (float *)ef_hal_l1_alloc(FLOAT_BYTES * (uint32_t)ck * (uint32_t)pt);
    float *z = (float *)ef_hal_l1_alloc(FLOAT_BYTES * (uint32_t)m * (uint32_t)pt);
    ef_hal_dma_wait(ef_hal_dma_in(wl, w, FLOAT_BYTES * (uint32_t)m * (uint32_t)ck));
    const long image = (long)win[EF_WIN_C] * win[EF_WIN_H] * win[EF_WIN_W];
    for (int n = 0; n < win[EF_WIN_N]; n++) {
        for (int p0 = 0; p0 < pixels; p0 += pt) {
            const int np = pixels - p0 < pt ? pixels - p0 : pt;
            im2col(col, x + n * image, win, p0, np, ck, 0);
            const ef_hal_redmule_job_t job = {z, wl, col, NULL, (uint16_t)m, (uint16_t)ck, (uint16_t)np};
            ef_hal_redmule_start(&job);
            ef_hal_redmule_wait();
            if (bias) {
                ef_hal_epilogue_t e = {z, m, np, np, bias, 1, 0, 1.0f, 1.0f};
                ef_hal_fork(0, ef_hal_epilogue_task, &e);
            }
            float *out = y + ((long)n * m) * pixels + p0;
            ef_hal_dma_wait(ef_hal_dma_out_2d(out, z, FLOAT_BYTES * (uint32_t)np, (uint32_t)m,
                                              FLOAT_BYTES * (uint32_t)pixels));
        }
    }
    ef_hal_l1_release(mark);
}

void ef_hal_conv_grad_weight(float *dw, const float *x, const float *dy, const int *win) {
    const int m = win[EF_WIN_M], ck = win[EF_WIN_C] * win[EF_WIN_KH] * win[EF_WIN_KW];
    const int pixels = win[EF_WIN_OH] * win[EF_WIN_OW];
    const uint32_t mark = ef_hal_l1_mark();
    float *z = supported(win, ck) ? (float *)ef_hal_l1_alloc(FLOAT_BYTES * (uint32_t)m * (uint32_t)ck) : NULL;
    const int pt = z ? pixel_tile(pixels, FLOAT_BYTES * (uint32_t)(ck + m)) : 0;
    if (pt < 1) {
        ef_hal_l1_release(mark);
        ef_conv_grad_weight(dw, x, dy, win);
        return;
    }
    float *colt = (float *)ef_hal_l1_alloc(FLOAT_BYTES * (uint32_t)ck * (uint32_t)pt);
    float *dyt = (float *)ef_hal_l1_alloc(FLOAT_BYTES * (uint32_t)m * (uint32_t)pt);
    const long image = (long)win[EF_WIN_C] * win[EF_WIN_H] * win[EF_WIN_W];
    int first = 1;
    for (int n = 0; n < win[EF_WIN_N]; n++) {
        for (int p0 = 0; p0 < pixels; p0 += pt) {
            const int np = pixels - p0 < pt ? pixels - p0 : pt;
            const ef_hal_dma_t in = ef_hal_dma_in_2d(dyt, dy + ((long)n * m) * pixels + p0, FLOAT_BYTES * (uint32_t)np,
                                                     (uint32_t)m, FLOAT_BYTES * (uint32_t)pixels);
            im2col(colt, x + n * image, win, p0, np, ck, 1);
            ef_hal_dma_wait(in);
            const ef_hal_redmule_job_t job = {z, dyt, colt, first ? NULL : z, (uint16_t)m, (uint16_t)np, (uint16_t)ck};
            ef_hal_redmule_start(&job);
            ef_hal_redmule_wait();
            first = 0;
        }
    }
    if (first) memset(z, 0, FLOAT_BYTES * (size_t)m * (size_t)ck);
    ef_hal_dma_wait(ef_hal_dma_out(dw, z, FLOAT_BYTES * (uint32_t)m * (uint32_t)ck));
    ef_hal_l1_release(mark);
}
