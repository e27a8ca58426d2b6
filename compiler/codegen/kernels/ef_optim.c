/* SGD as PyTorch (dampening 0, no Nesterov): d = g + wd·p; v = μ·v + d; p -= lr·(v if a velocity else d).
   The param is rows blocks of cols updated elements, ld apart (a sparse update's first channels of each row
   block); grad and velocity are the dense rows x cols. A whole-tensor update is rows = 1, cols = ld = n. */
#include <math.h>

#include "ef_kernels.h"

void ef_sgd(float *param, const float *grad, const float *lr, float *velocity, int rows, int cols, int ld,
            float momentum, float weight_decay) {
    const float rate = lr[0];
    for (int r = 0; r < rows; r++) {
        float *p = param + (long)r * ld;
        const float *g = grad + (long)r * cols;
        float *v = velocity ? velocity + (long)r * cols : 0;
        for (int i = 0; i < cols; i++) {
            float d = weight_decay != 0.0f ? g[i] + p[i] * weight_decay : g[i];
            if (v) {
                v[i] = v[i] * momentum + d;
                d = v[i];
            }
            p[i] = p[i] - d * rate;
        }
    }
}

/* Adam as PyTorch (L2 weight decay, no AMSGrad), in torch's order of operations:
   d = g + wd·p; m = m + (1−β1)·(d − m) (torch's lerp); v = β2·v + (1−β2)·d²; p -= (lr/c1)·m / (√v/√c2 + ε), where
   c = (c1, c2) are the bias corrections 1 − βᵗ, kept as state from 0 and stepped as c ← 1 − β·(1 − c).
   Layout as ef_sgd: the param is rows blocks of cols updated elements, ld apart; grad, m and v are dense. */
void ef_adam(float *param, const float *grad, const float *lr, float *m, float *v, float *corrections, int rows,
             int cols, int ld, float beta1, float beta2, float eps, float weight_decay) {
    corrections[0] = 1.0f - beta1 * (1.0f - corrections[0]);
    corrections[1] = 1.0f - beta2 * (1.0f - corrections[1]);
    const float step = lr[0] / corrections[0], root_c2 = sqrtf(corrections[1]);
    const float keep1 = 1.0f - beta1, keep2 = 1.0f - beta2;
    for (int r = 0; r < rows; r++) {
        float *p = param + (long)r * ld;
        const long base = (long)r * cols;
        for (int i = 0; i < cols; i++) {
            const float d = weight_decay != 0.0f ? grad[base + i] + p[i] * weight_decay : grad[base + i];
            const float mi = m[base + i] + keep1 * (d - m[base + i]);
            const float vi = v[base + i] * beta2 + d * d * keep2;
            m[base + i] = mi;
            v[base + i] = vi;
            p[i] = p[i] - step * (mi / (sqrtf(vi) / root_c2 + eps));
        }
    }
}
