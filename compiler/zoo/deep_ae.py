"""MLPerf Tiny anomaly-detection autoencoder (ToyADMOS): 640-128-128-128-128-8-128-128-128-128-640 —
269,992 parameters (267,928 trainable + 2,064 BatchNorm running statistics).

As in the MLPerf Tiny Keras reference, every Dense but the last is followed by BatchNormalization and
ReLU, the 8-d bottleneck included; the output Dense is linear. Input: 5 frames × 128 log-mel bins.
Dense layers are Gemm (transB=1, weight (out, in)) named ``encoder.0`` … ``encoder.4`` and ``decoder.0``
… ``decoder.4``; BatchNormalization nodes (inference form) ``encoder.0.bn`` …; ReLUs ``encoder.0/Relu`` ….
"""
from __future__ import annotations

import onnx

from compiler.zoo._graph import INPUT_NAME, OUTPUT_NAME, RELU_GAIN, GraphBuilder

INPUT_DIM = 640
ENCODER_DIMS = (INPUT_DIM, 128, 128, 128, 128, 8)
DECODER_DIMS = (8, 128, 128, 128, 128, INPUT_DIM)
BN_EPSILON = 1e-3  # Keras' BatchNormalization default, which the reference uses


def deep_ae(seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder("deep-ae", seed)
    x = INPUT_NAME
    for part, dims in (("encoder", ENCODER_DIMS), ("decoder", DECODER_DIMS)):
        for i, (fan_in, fan_out) in enumerate(zip(dims, dims[1:])):
            layer = f"{part}.{i}"
            if part == "decoder" and i == len(dims) - 2:
                x = g.gemm(layer, x, fan_in, fan_out, output=OUTPUT_NAME)
            else:
                x = g.gemm(layer, x, fan_in, fan_out, gain=RELU_GAIN)
                x = g.batch_norm(f"{layer}.bn", x, fan_out, BN_EPSILON)
                x = g.relu(layer, x)
    return g.finish((INPUT_DIM,), (INPUT_DIM,), doc=__doc__.splitlines()[0])
