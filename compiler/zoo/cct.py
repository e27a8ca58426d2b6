"""Compact Convolutional Transformers (Hassani et al., 2021): a conv tokenizer, pre-norm transformer blocks
and attention (sequence) pooling instead of a class token.

- ``cct-2-3x2``: CCT-2/3x2 for 32×32×3 images (CIFAR-10) — 284,491 parameters.
- ``cct-digits``: the same family for 8×8×1 sklearn digits — 9,771 parameters.

Graph, per block ``blocks.i`` with embedding d, h heads of size d/h and T tokens:
  x + pos → LayerNorm → q, k, v (MatMul+Add each) → Reshape (0,0,h,d/h) → Transpose (q, v: 0,2,1,3;
  k: 0,2,3,1) → MatMul → Mul 1/√(d/h) → Softmax(-1) → MatMul → Transpose → Reshape (0,0,d) → proj → Add;
  → LayerNorm → fc1 → GELU (Div/Erf/Add/Mul/Mul) → fc2 → Add.
Pooling: pool.attention (d→1) → Transpose (0,2,1) → Softmax(-1) over tokens → MatMul with x → Flatten.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from compiler.zoo._graph import INPUT_NAME, OUTPUT_NAME, GraphBuilder, trunc_normal

POS_EMBEDDING_STD = 0.2  # CCT's trunc_normal_(std=0.2)


@dataclass(frozen=True)
class CctConfig:
    image_size: int
    in_channels: int
    conv_channels: tuple[int, ...]  # one 3×3, stride 1, pad 1 conv (+ ReLU + MaxPool) per entry
    pool_kernel: int
    pool_stride: int
    pool_pad: int
    num_blocks: int
    num_heads: int
    mlp_hidden: int
    num_classes: int

    @property
    def embed_dim(self) -> int:
        return self.conv_channels[-1]

    @property
    def num_tokens(self) -> int:
        size = self.image_size
        for _ in self.conv_channels:
            size = (size + 2 * self.pool_pad - self.pool_kernel) // self.pool_stride + 1
        return size * size

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


CCT_2_3X2 = CctConfig(image_size=32, in_channels=3, conv_channels=(64, 128), pool_kernel=3, pool_stride=2,
                      pool_pad=1, num_blocks=2, num_heads=2, mlp_hidden=128, num_classes=10)
CCT_DIGITS = CctConfig(image_size=8, in_channels=1, conv_channels=(32,), pool_kernel=2, pool_stride=2,
                       pool_pad=0, num_blocks=1, num_heads=2, mlp_hidden=64, num_classes=10)


def build_cct(config: CctConfig, seed: int = 0, name: str = "cct") -> onnx.ModelProto:
    g = GraphBuilder(name, seed)
    d, tokens = config.embed_dim, config.num_tokens
    x, c_in = INPUT_NAME, config.in_channels
    for i, c_out in enumerate(config.conv_channels):
        layer = f"tokenizer.conv{i}"
        x = g.conv(layer, x, c_in, c_out, kernel=(3, 3), pads=(1, 1, 1, 1), bias=False)
        x = g.relu(layer, x)
        k, s, p = config.pool_kernel, config.pool_stride, config.pool_pad
        x = g.node("MaxPool", [x], f"{layer}/MaxPool", ceil_mode=0, kernel_shape=[k, k], pads=[p] * 4,
                   strides=[s, s])
        c_in = c_out
    x = g.reshape("tokenizer", x, [0, d, -1])                        # (B, d, T)
    x = g.node("Transpose", [x], "tokenizer/Transpose", perm=[0, 2, 1])  # (B, T, d)
    pos = g.param("pos_embedding.weight", trunc_normal(g.rng, (1, tokens, d), POS_EMBEDDING_STD))
    x = g.node("Add", [x, pos], "pos_embedding")
    for i in range(config.num_blocks):
        x = _block(g, f"blocks.{i}", x, config)
    x = g.layer_norm("norm", x, d)
    x = _sequence_pool(g, x, d)
    g.linear("classifier", x, d, config.num_classes, output=OUTPUT_NAME)
    return g.finish(config.input_shape, (config.num_classes,), doc=f"{name}: {__doc__.splitlines()[0]}")


def cct_2_3x2(seed: int = 0) -> onnx.ModelProto:
    return build_cct(CCT_2_3X2, seed, "cct-2-3x2")


def cct_digits(seed: int = 0) -> onnx.ModelProto:
    return build_cct(CCT_DIGITS, seed, "cct-digits")


def _block(g: GraphBuilder, prefix: str, x: str, config: CctConfig) -> str:
    d = config.embed_dim
    h = g.layer_norm(f"{prefix}.norm1", x, d)
    h = _attention(g, f"{prefix}.attn", h, config)
    x = g.node("Add", [x, h], f"{prefix}/Add")
    h = g.layer_norm(f"{prefix}.norm2", x, d)
    h = g.linear(f"{prefix}.mlp.fc1", h, d, config.mlp_hidden)
    h = g.gelu(f"{prefix}.mlp.gelu", h)
    h = g.linear(f"{prefix}.mlp.fc2", h, config.mlp_hidden, d)
    return g.node("Add", [x, h], f"{prefix}/Add")


def _attention(g: GraphBuilder, prefix: str, x: str, config: CctConfig) -> str:
    d, heads = config.embed_dim, config.num_heads
    head_dim = d // heads

    def project(name: str, perm: list[int]) -> str:
        layer = f"{prefix}.{name}"
        t = g.linear(layer, x, d, d)
        t = g.reshape(layer, t, [0, 0, heads, head_dim])           # (B, T, h, d/h)
        return g.node("Transpose", [t], f"{layer}/Transpose", perm=perm)

    q = project("q", [0, 2, 1, 3])                                  # (B, h, T, d/h)
    k = project("k", [0, 2, 3, 1])                                  # (B, h, d/h, T)
    v = project("v", [0, 2, 1, 3])                                  # (B, h, T, d/h)
    scores = g.node("MatMul", [q, k], f"{prefix}/MatMul")           # (B, h, T, T)
    scores = g.node("Mul", [scores, g.scalar(prefix, 1.0 / math.sqrt(head_dim))], f"{prefix}/Mul")
    weights = g.node("Softmax", [scores], f"{prefix}/Softmax", axis=-1)
    out = g.node("MatMul", [weights, v], f"{prefix}/MatMul")        # (B, h, T, d/h)
    out = g.node("Transpose", [out], f"{prefix}/Transpose", perm=[0, 2, 1, 3])
    out = g.reshape(prefix, out, [0, 0, d])                         # (B, T, d)
    return g.linear(f"{prefix}.proj", out, d, d)


def _sequence_pool(g: GraphBuilder, x: str, d: int) -> str:
    """pooled = softmax_over_tokens(x·w + b)ᵀ · x, shape (B, d)."""
    w = g.linear("pool.attention", x, d, 1)                         # (B, T, 1)
    w = g.node("Transpose", [w], "pool/Transpose", perm=[0, 2, 1])  # (B, 1, T)
    w = g.node("Softmax", [w], "pool/Softmax", axis=-1)
    pooled = g.node("MatMul", [w, x], "pool/MatMul")                # (B, 1, d)
    return g.node("Flatten", [pooled], "pool/Flatten", axis=1)      # (B, d)
