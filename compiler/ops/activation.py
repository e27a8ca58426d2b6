"""Activations beyond ReLU/GELU (the ones edge CNNs and transformers use) and their backward helpers: Clip
(ReLU6), LeakyRelu, HardSigmoid, HardSwish, Elu, Softplus and PRelu (a trainable slope).

Each backward helper reads the forward *input* x and follows PyTorch's derivative at the kinks (Clip passes
the gradient on [min, max] like torch.clamp, HardSwish's is x/3 + 1/2 on [-3, 3], ...). Clip's absent bounds
are ±FLT_MAX, not infinities, so they stay finite C literals."""
from __future__ import annotations

import numpy as np

from compiler.ops.binding import Site, pair_grad_args, unary_args
from compiler.ops.elementwise import Binary, Unary, UnaryGrad

FLT_MAX = float(np.finfo(np.float32).max)
SOFTPLUS_THRESHOLD = 20.0  # PyTorch's: above it softplus(x) = x


class _WithAttrs(Unary):
    """A unary op whose float attributes become C arguments of the same names (after n)."""

    def c_args(self, site: Site):
        return dict(unary_args(site), **{k: float(v) for k, v in site.attrs.items()})


class _GradWithAttrs(UnaryGrad):
    def c_args(self, site: Site):
        return dict(pair_grad_args(site), **{k: float(v) for k, v in site.attrs.items()})


class Clip(_WithAttrs):
    """ONNX Clip (min, max as constant inputs on import); ReLU6 is Clip(0, 6)."""
    name = "Clip"
    c_call = "ef_clip(${y}, ${x}, ${n}, ${min}, ${max})"

    def forward(self, a, *, min=-FLT_MAX, max=FLT_MAX):
        return np.clip(a, min, max).astype(a.dtype, copy=False)

    def gradient(self, g, x, y, dy, *, min=-FLT_MAX, max=FLT_MAX):
        return (g.emit("ClipGrad", [x[0], dy[0]], min=min, max=max),)


class ClipGrad(_GradWithAttrs):
    name = "ClipGrad"
    c_call = "ef_clip_grad(${dx}, ${v}, ${dy}, ${n}, ${min}, ${max})"

    def forward(self, x, dy, *, min=-FLT_MAX, max=FLT_MAX):
        return np.where((x >= min) & (x <= max), dy, 0).astype(dy.dtype, copy=False)


class LeakyRelu(_WithAttrs):
    name = "LeakyRelu"
    c_call = "ef_leaky_relu(${y}, ${x}, ${n}, ${alpha})"

    def forward(self, a, *, alpha=0.01):
        return np.where(a > 0, a, a * alpha).astype(a.dtype, copy=False)

    def gradient(self, g, x, y, dy, *, alpha=0.01):
        return (g.emit("LeakyReluGrad", [x[0], dy[0]], alpha=alpha),)


class LeakyReluGrad(_GradWithAttrs):
    name = "LeakyReluGrad"
    c_call = "ef_leaky_relu_grad(${dx}, ${v}, ${dy}, ${n}, ${alpha})"

    def forward(self, x, dy, *, alpha=0.01):
        return np.where(x > 0, dy, dy * alpha).astype(dy.dtype, copy=False)


class HardSigmoid(_WithAttrs):
    """y = max(0, min(1, alpha·x + beta)); PyTorch's Hardsigmoid exports alpha = 1/6."""
    name = "HardSigmoid"
    flops_per_element = 3
    c_call = "ef_hard_sigmoid(${y}, ${x}, ${n}, ${alpha}, ${beta})"

    def forward(self, a, *, alpha=0.2, beta=0.5):
        return np.clip(a * alpha + beta, 0, 1).astype(a.dtype, copy=False)

    def gradient(self, g, x, y, dy, *, alpha=0.2, beta=0.5):
        return (g.emit("HardSigmoidGrad", [x[0], dy[0]], alpha=alpha, beta=beta),)


class HardSigmoidGrad(_GradWithAttrs):
    name = "HardSigmoidGrad"
    flops_per_element = 3
    c_call = "ef_hard_sigmoid_grad(${dx}, ${v}, ${dy}, ${n}, ${alpha}, ${beta})"

    def forward(self, x, dy, *, alpha=0.2, beta=0.5):
        v = x * alpha + beta
        return np.where((v > 0) & (v < 1), dy * alpha, 0).astype(dy.dtype, copy=False)


class HardSwish(Unary):
    """y = x · max(0, min(1, x/6 + 1/2))."""
    name = "HardSwish"
    flops_per_element = 4
    c_call = "ef_hard_swish(${y}, ${x}, ${n})"

    def fn(self, a):
        return (a * np.clip(a / 6 + 0.5, 0, 1)).astype(a.dtype, copy=False)

    def gradient(self, g, x, y, dy):
        return (g.emit("HardSwishGrad", [x[0], dy[0]]),)


class HardSwishGrad(UnaryGrad):
    name = "HardSwishGrad"
    flops_per_element = 3
    c_call = "ef_hard_swish_grad(${dx}, ${v}, ${dy}, ${n})"

    def forward(self, x, dy):
        return np.where(x < -3, 0, np.where(x <= 3, dy * (x / 3 + 0.5), dy)).astype(dy.dtype, copy=False)


class Elu(_WithAttrs):
    name = "Elu"
    flops_per_element = 4
    c_call = "ef_elu(${y}, ${x}, ${n}, ${alpha})"

    def forward(self, a, *, alpha=1.0):
        return np.where(a > 0, a, alpha * np.expm1(np.minimum(a, 0))).astype(a.dtype, copy=False)

    def gradient(self, g, x, y, dy, *, alpha=1.0):
        return (g.emit("EluGrad", [x[0], dy[0]], alpha=alpha),)


class EluGrad(_GradWithAttrs):
    name = "EluGrad"
    flops_per_element = 4
    c_call = "ef_elu_grad(${dx}, ${v}, ${dy}, ${n}, ${alpha})"

    def forward(self, x, dy, *, alpha=1.0):
        return np.where(x > 0, dy, dy * alpha * np.exp(np.minimum(x, 0))).astype(dy.dtype, copy=False)


class Softplus(Unary):
    """y = log(1 + e^x) (x itself above PyTorch's threshold of 20)."""
    name = "Softplus"
    flops_per_element = 4
    c_call = "ef_softplus(${y}, ${x}, ${n})"

    def fn(self, a):
        soft = np.log1p(np.exp(np.minimum(a, SOFTPLUS_THRESHOLD)))
        return np.where(a > SOFTPLUS_THRESHOLD, a, soft).astype(a.dtype, copy=False)

    def gradient(self, g, x, y, dy):
        return (g.emit("SoftplusGrad", [x[0], dy[0]]),)


class SoftplusGrad(UnaryGrad):
    name = "SoftplusGrad"
    flops_per_element = 4
    c_call = "ef_softplus_grad(${dx}, ${v}, ${dy}, ${n})"

    def forward(self, x, dy):
        z = np.exp(np.minimum(x, SOFTPLUS_THRESHOLD))
        return np.where(x > SOFTPLUS_THRESHOLD, dy, dy * z / (z + 1)).astype(dy.dtype, copy=False)


class PRelu(Binary):
    """y = x where x > 0, else slope·x; the slope broadcasts (a trainable per-channel parameter)."""
    name = "PRelu"
    c_call = "ef_prelu(${y}, ${a}, ${b}, ${rank}, ${shape}, ${sa}, ${sb})"

    def forward(self, a, b):
        return np.where(a > 0, a, a * b).astype(np.result_type(a, b), copy=False)

    def forward_into(self, outs, a, b):
        np.copyto(outs[0], self.forward(a, b))

    def gradient(self, g, x, y, dy):
        """dx = dy where x > 0, slope·dy elsewhere; dslope = Σ x·dy where x <= 0 (all with other ops)."""
        if g.shape(x[0]) != g.shape(dy[0]):
            from compiler.ir import CompileError
            raise CompileError(f"PRelu: a slope {g.shape(x[1])} larger than the input {g.shape(x[0])} is not "
                               "supported")
        positive = g.emit("ReluGrad", [x[0], dy[0]])
        negative = g.emit("Sub", [dy[0], positive])
        dx = g.emit("Add", [positive, g.emit("Mul", [negative, x[1]])]) if g.needs(x[0]) else None
        dslope = g.emit("Mul", [negative, x[0]]) if g.needs(x[1]) else None
        return dx, dslope


class EqualMask(Binary):
    """1.0 where a == b (broadcasting), else 0.0: the positions of a maximum in ReduceMax's gradient."""
    name = "EqualMask"
    backward_only = True
    c_call = "ef_equal_mask(${y}, ${a}, ${b}, ${rank}, ${shape}, ${sa}, ${sb})"

    def forward(self, a, b):
        return (a == b).astype(np.result_type(a, b))

    def forward_into(self, outs, a, b):
        np.copyto(outs[0], self.forward(a, b))
