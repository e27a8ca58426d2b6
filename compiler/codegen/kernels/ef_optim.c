/* SGD as PyTorch (dampening 0, no Nesterov): d = g + wd·p; v = μ·v + d; p -= lr·(v if a velocity else d).
   The param is rows blocks of cols updated elements, ld apart (a sparse update's first channels of each row
   block); grad and velocity are the dense rows x cols. A whole-tensor update is rows = 1, cols = ld = n. */
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
