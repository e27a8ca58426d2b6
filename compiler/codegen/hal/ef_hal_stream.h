/* The kernels ef_hal_stream.c runs on the cluster: ef_hal_<op> with the arguments and results of ef_<op>
 * (kernels/ef_kernels.h), streamed through L1 and split over every core. The ops that have one say so in
 * compiler/ops (`cluster = True`); tests/codegen/test_hal_stream.py checks that both lists agree. */
#ifndef EF_HAL_STREAM_H
#define EF_HAL_STREAM_H

#include "ef_kernels.h"

#define EF_HAL_STREAMED(X)                                                                                      \
    X(neg) X(relu) X(sigmoid) X(tanh) X(erf) X(sqrt) X(exp) X(gelu)                                              \
    X(relu_grad) X(sigmoid_grad) X(tanh_grad) X(erf_grad) X(gelu_grad)                                           \
    X(add) X(sub) X(mul) X(div) X(sgd)                                                                           \
    X(softmax) X(softmax_grad) X(layer_normalization) X(layer_norm_grad_input) X(layer_norm_grad_scale)          \
    X(reduce_sum_to) X(transpose) X(max_pool) X(max_pool_grad)

#define EF_HAL_DECLARE_STREAMED(name) extern __typeof__(ef_##name) ef_hal_##name;
EF_HAL_STREAMED(EF_HAL_DECLARE_STREAMED)
#undef EF_HAL_DECLARE_STREAMED

#endif /* EF_HAL_STREAM_H */
