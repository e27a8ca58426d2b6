"""Depthwise-separable CNN for keyword spotting, after MLPerf Tiny's KWS DS-CNN — 24,908 parameters
(23,756 trainable + 1,152 BatchNorm running statistics).

Input (B, 1, 49, 10): 49 frames × 10 MFCCs. ``conv0``: 10×4 conv, stride 2, TF 'same' padding written
as explicit asymmetric pads (top 4, left 1, bottom 5, right 1) → (B, 64, 25, 5); BN + ReLU. Then 4 blocks
of depthwise 3×3 (group=64, pad 1) + BN + ReLU and pointwise 1×1 + BN + ReLU (``blocks.i.dw``,
``blocks.i.pw``; BN nodes ``<conv>.bn``; ReLUs ``<conv>/Relu``); GlobalAveragePool; Flatten; ``classifier``
Gemm (transB=1) → 12 keywords. Convs carry a bias, as Keras' Conv2D does by default.
"""
from __future__ import annotations

import onnx

from compiler.zoo._graph import INPUT_NAME, OUTPUT_NAME, GraphBuilder

INPUT_SHAPE = (1, 49, 10)
CHANNELS = 64
NUM_BLOCKS = 4
NUM_CLASSES = 12
CONV0_KERNEL = (10, 4)
CONV0_STRIDES = (2, 2)
CONV0_PADS = (4, 1, 5, 1)  # 'same' for 49×10 at stride 2: total 9 rows, 2 columns; the extra row at the end
BN_EPSILON = 1e-3


def ds_cnn(seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder("ds-cnn", seed)
    x = g.conv("conv0", INPUT_NAME, INPUT_SHAPE[0], CHANNELS, CONV0_KERNEL, CONV0_STRIDES, CONV0_PADS)
    x = _bn_relu(g, "conv0", x)
    for i in range(NUM_BLOCKS):
        x = g.conv(f"blocks.{i}.dw", x, CHANNELS, CHANNELS, (3, 3), pads=(1, 1, 1, 1), group=CHANNELS)
        x = _bn_relu(g, f"blocks.{i}.dw", x)
        x = g.conv(f"blocks.{i}.pw", x, CHANNELS, CHANNELS, (1, 1))
        x = _bn_relu(g, f"blocks.{i}.pw", x)
    x = g.node("GlobalAveragePool", [x], "pool/GlobalAveragePool")
    x = g.node("Flatten", [x], "pool/Flatten", axis=1)
    g.gemm("classifier", x, CHANNELS, NUM_CLASSES, output=OUTPUT_NAME)
    return g.finish(INPUT_SHAPE, (NUM_CLASSES,), doc=__doc__.splitlines()[0])


def _bn_relu(g: GraphBuilder, layer: str, x: str) -> str:
    return g.relu(layer, g.batch_norm(f"{layer}.bn", x, CHANNELS, BN_EPSILON))
