/* SGD as PyTorch (dampening 0, no Nesterov): d = g + wd·p; v = μ·v + d; p -= lr·(v if a velocity else d). */
#include "ef_kernels.h"

void ef_sgd(float *param, const float *grad, const float *lr, float *velocity, int n, float momentum,
            float weight_decay) {
    const float rate = lr[0];
    for (int i = 0; i < n; i++) {
        float d = weight_decay != 0.0f ? grad[i] + param[i] * weight_decay : grad[i];
        if (velocity) {
            velocity[i] = velocity[i] * momentum + d;
            d = velocity[i];
        }
        param[i] = param[i] - d * rate;
    }
}
