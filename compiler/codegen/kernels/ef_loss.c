/* Losses (mean over the batch, as PyTorch's reduction="mean") and their gradients. */
#include <math.h>

#include "ef_kernels.h"

/* softmax of one row into p, returning log Σ exp(z - max) and the max */
static float row_softmax(const float *z, int n, float *p, float *mx_out) {
    float mx = z[0], s = 0.0f;
    for (int j = 1; j < n; j++) mx = z[j] > mx ? z[j] : mx;
    for (int j = 0; j < n; j++) {
        const float e = expf(z[j] - mx);
        if (p) p[j] = e;
        s += e;
    }
    if (p) {
        for (int j = 0; j < n; j++) p[j] /= s;
    }
    *mx_out = mx;
    return logf(s);
}

void ef_softmax_cross_entropy(float *loss, const float *logits, const int64_t *labels, int rows, int classes) {
    float total = 0.0f;
    for (int r = 0; r < rows; r++) {
        const float *z = logits + (long)r * classes;
        float mx;
        const float lse = row_softmax(z, classes, 0, &mx);
        if (labels[r] < 0 || labels[r] >= classes) {
            *loss = NAN; /* a label outside [0, classes): no class to pick */
            return;
        }
        total += (z[labels[r]] - mx) - lse;
    }
    *loss = -(total / (float)rows);
}

void ef_softmax_cross_entropy_grad(float *dlogits, const float *logits, const int64_t *labels, const float *dy,
                                   int rows, int classes) {
    const float share = dy[0] / (float)rows;
    for (int r = 0; r < rows; r++) {
        float *p = dlogits + (long)r * classes;
        float mx;
        row_softmax(logits + (long)r * classes, classes, p, &mx);
        if (labels[r] >= 0 && labels[r] < classes) p[labels[r]] -= 1.0f;
        for (int j = 0; j < classes; j++) p[j] *= share;
    }
}

void ef_mse_loss(float *loss, const float *pred, const float *target, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) {
        const float d = pred[i] - target[i];
        s += d * d;
    }
    *loss = s / (float)n;
}

void ef_mse_loss_grad(float *dpred, const float *pred, const float *target, const float *dy, int n) {
    const float factor = 2.0f * dy[0] / (float)n;
    for (int i = 0; i < n; i++) dpred[i] = (pred[i] - target[i]) * factor;
}
