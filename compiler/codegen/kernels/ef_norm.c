/* Softmax and the normalizations with their backward kernels. Statistics are float32, as in the numpy
 * reference (mean first, then the variance of the centred values). */
#include <math.h>
#include <string.h>

#include "ef_kernels.h"

void ef_softmax(float *y, const float *x, int outer, int n, int inner) {
    for (int o = 0; o < outer; o++) {
        for (int k = 0; k < inner; k++) {
            const float *xp = x + (long)o * n * inner + k;
            float *yp = y + (long)o * n * inner + k;
            float mx = xp[0], s = 0.0f;
            for (int i = 1; i < n; i++) mx = xp[(long)i * inner] > mx ? xp[(long)i * inner] : mx;
            for (int i = 0; i < n; i++) {
                const float e = expf(xp[(long)i * inner] - mx);
                yp[(long)i * inner] = e;
                s += e;
            }
            for (int i = 0; i < n; i++) yp[(long)i * inner] /= s;
        }
    }
}

void ef_softmax_grad(float *dx, const float *y, const float *dy, int outer, int n, int inner) {
    for (int o = 0; o < outer; o++) {
        for (int k = 0; k < inner; k++) {
            const long base = (long)o * n * inner + k;
            float s = 0.0f;
            for (int i = 0; i < n; i++) s += dy[base + (long)i * inner] * y[base + (long)i * inner];
            for (int i = 0; i < n; i++) {
                const long t = base + (long)i * inner;
                dx[t] = y[t] * (dy[t] - s);
            }
        }
    }
}

/* mean and rstd = 1 / sqrt(var + epsilon) of one row */
static void row_stats(const float *x, int n, float epsilon, float *mean, float *rstd) {
    float s = 0.0f, v = 0.0f;
    for (int j = 0; j < n; j++) s += x[j];
    const float mu = s / (float)n;
    for (int j = 0; j < n; j++) {
        const float d = x[j] - mu;
        v += d * d;
    }
    *mean = mu;
    *rstd = 1.0f / sqrtf(v / (float)n + epsilon);
}

void ef_layer_normalization(float *y, const float *x, const float *scale, const float *bias, int rows, int n,
                            int ns, float epsilon) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (long)r * n;
        float *yr = y + (long)r * n;
        float mu, rstd;
        row_stats(xr, n, epsilon, &mu, &rstd);
        for (int j0 = 0; j0 < n; j0 += ns) {
            for (int k = 0; k < ns; k++) {
                const float v = (xr[j0 + k] - mu) * rstd * scale[k];
                yr[j0 + k] = bias ? v + bias[k] : v;
            }
        }
    }
}

void ef_layer_norm_grad_input(float *dx, const float *x, const float *scale, const float *dy, int rows, int n,
                              int ns, float epsilon) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (long)r * n, *dyr = dy + (long)r * n;
        float *dxr = dx + (long)r * n;
        float mu, rstd, sg = 0.0f, sgx = 0.0f;
        row_stats(xr, n, epsilon, &mu, &rstd);
        for (int j0 = 0; j0 < n; j0 += ns) {
            for (int k = 0; k < ns; k++) {
                const float gh = dyr[j0 + k] * scale[k];
                sg += gh;
                sgx += gh * ((xr[j0 + k] - mu) * rstd);
            }
        }
        const float mg = sg / (float)n, mgx = sgx / (float)n;
        for (int j0 = 0; j0 < n; j0 += ns) {
            for (int k = 0; k < ns; k++) {
                const float gh = dyr[j0 + k] * scale[k];
                const float xh = (xr[j0 + k] - mu) * rstd;
                dxr[j0 + k] = rstd * (gh - mg - xh * mgx);
            }
        }
    }
}

void ef_layer_norm_grad_scale(float *dscale, const float *x, const float *dy, int rows, int n, float epsilon) {
    memset(dscale, 0, sizeof(float) * (size_t)n);
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (long)r * n, *dyr = dy + (long)r * n;
        float mu, rstd;
        row_stats(xr, n, epsilon, &mu, &rstd);
        for (int j = 0; j < n; j++) dscale[j] += dyr[j] * ((xr[j] - mu) * rstd);
    }
}

void ef_batch_normalization(float *y, const float *x, const float *scale, const float *bias, const float *mean,
                            const float *var, int batch, int channels, int inner, float epsilon) {
    for (int c = 0; c < channels; c++) {
        const float factor = scale[c] / sqrtf(var[c] + epsilon), mu = mean[c], b = bias[c];
        for (int n = 0; n < batch; n++) {
            const long base = ((long)n * channels + c) * inner;
            for (int i = 0; i < inner; i++) y[base + i] = (x[base + i] - mu) * factor + b;
        }
    }
}
