"""Elementwise ops (numpy broadcasting) and their backward helpers."""
from __future__ import annotations

import numpy as np
from scipy.special import erf  # scipy is a scikit-learn dependency; numpy has no erf

from compiler.ops.base import Op

SQRT_HALF = float(np.sqrt(0.5))            # Python floats: they keep float32 arrays float32 (NEP 50)
INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))

# Abramowitz & Stegun 7.1.26: erf(x) = 1 - t(a1 + t(a2 + … + t a5)) e^{-x²}, t = 1/(1 + p|x|), |error| <= 1.5e-7.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def gelu_erf(z: np.ndarray) -> np.ndarray:
    """erf for GELU's Φ: exact (SciPy) in float64; in float32 the A&S polynomial (4x faster than SciPy's erf,
    |error| <= 1.5e-7 before float32 rounding, below 1e-6 relative in GELU and its gradient). Not used for the
    Erf op itself, whose relative accuracy near 0 must be exact."""
    if z.dtype != np.float32:
        return erf(z)
    az = np.abs(z)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(_AS_P) * az)
    poly = np.float32(_AS_A[4])
    for coefficient in reversed(_AS_A[:4]):
        poly = poly * t + np.float32(coefficient)
    return np.copysign(np.float32(1.0) - poly * t * np.exp(-az * az), z)
TWO_OVER_SQRT_PI = np.float64(2.0 / np.sqrt(np.pi))


class Add(Op):
    name = "Add"
    inplace = True

    def forward(self, a, b):
        return a + b

    def forward_into(self, outs, a, b):
        np.add(a, b, out=outs[0])

    def gradient(self, g, x, y, dy):
        return dy[0], dy[0]


class Sub(Op):
    name = "Sub"
    inplace = True

    def forward(self, a, b):
        return a - b

    def forward_into(self, outs, a, b):
        np.subtract(a, b, out=outs[0])

    def gradient(self, g, x, y, dy):
        return dy[0], (g.emit("Neg", [dy[0]]) if g.needs(x[1]) else None)


class Mul(Op):
    name = "Mul"
    inplace = True

    def forward(self, a, b):
        return a * b

    def forward_into(self, outs, a, b):
        np.multiply(a, b, out=outs[0])

    def gradient(self, g, x, y, dy):
        da = g.emit("Mul", [dy[0], x[1]]) if g.needs(x[0]) else None
        db = g.emit("Mul", [dy[0], x[0]]) if g.needs(x[1]) else None
        return da, db


class Div(Op):
    name = "Div"
    inplace = True

    def forward(self, a, b):
        return a / b

    def forward_into(self, outs, a, b):
        np.divide(a, b, out=outs[0])

    def gradient(self, g, x, y, dy):
        da = g.emit("Div", [dy[0], x[1]]) if g.needs(x[0]) else None
        db = None
        if g.needs(x[1]):  # d(a/b)/db = -(a/b)/b
            db = g.emit("Neg", [g.emit("Div", [g.emit("Mul", [dy[0], y[0]]), x[1]])])
        return da, db


class Neg(Op):
    name = "Neg"
    inplace = True

    def forward(self, a):
        return -a

    def forward_into(self, outs, a):
        np.negative(a, out=outs[0])

    def gradient(self, g, x, y, dy):
        return (g.emit("Neg", [dy[0]]),)


class Relu(Op):
    name = "Relu"
    inplace = True

    def forward(self, a):
        return np.maximum(a, 0).astype(a.dtype, copy=False)

    def forward_into(self, outs, a):
        np.maximum(a, 0, out=outs[0])

    def gradient(self, g, x, y, dy):
        return (g.emit("ReluGrad", [y[0], dy[0]]),)


class ReluGrad(Op):
    """dx = dy where y > 0 (reads the Relu output, so the input may be freed or overwritten)."""
    name = "ReluGrad"
    backward_only = True
    inplace = False

    def infer(self, y, dy):
        return dy

    def forward(self, y, dy):
        return np.where(y > 0, dy, 0).astype(dy.dtype, copy=False)


class Sigmoid(Op):
    name = "Sigmoid"
    inplace = True

    def forward(self, a):
        return (1.0 / (1.0 + np.exp(-a))).astype(a.dtype, copy=False)

    def gradient(self, g, x, y, dy):
        return (g.emit("SigmoidGrad", [y[0], dy[0]]),)

    def flops(self, out_shapes, *in_shapes):
        return 4 * super().flops(out_shapes)


class SigmoidGrad(Op):
    name = "SigmoidGrad"
    backward_only = True

    def infer(self, y, dy):
        return dy

    def forward(self, y, dy):
        return dy * y * (1 - y)

    def flops(self, out_shapes, *in_shapes):
        return 3 * super().flops(out_shapes)


class Tanh(Op):
    name = "Tanh"
    inplace = True

    def forward(self, a):
        return np.tanh(a)

    def gradient(self, g, x, y, dy):
        return (g.emit("TanhGrad", [y[0], dy[0]]),)

    def flops(self, out_shapes, *in_shapes):
        return 4 * super().flops(out_shapes)


class TanhGrad(Op):
    name = "TanhGrad"
    backward_only = True

    def infer(self, y, dy):
        return dy

    def forward(self, y, dy):
        return dy * (1 - y * y)

    def flops(self, out_shapes, *in_shapes):
        return 3 * super().flops(out_shapes)


class Gelu(Op):
    """ONNX Gelu (opset 20); the Erf form that torch emits at older opsets is fused into it on import."""
    name = "Gelu"
    inplace = True

    def forward(self, a, *, approximate="none"):
        if approximate == "tanh":
            inner = np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)
            return (0.5 * a * (1 + np.tanh(inner))).astype(a.dtype, copy=False)
        return (0.5 * a * (1 + gelu_erf(a * SQRT_HALF))).astype(a.dtype, copy=False)

    def gradient(self, g, x, y, dy, *, approximate="none"):
        return (g.emit("GeluGrad", [x[0], dy[0]], approximate=approximate),)

    def flops(self, out_shapes, *in_shapes, approximate="none"):
        return 8 * super().flops(out_shapes)


class GeluGrad(Op):
    name = "GeluGrad"
    backward_only = True

    def infer(self, x, dy, *, approximate="none"):
        return dy

    def forward(self, x, dy, *, approximate="none"):
        if approximate == "tanh":
            c = np.sqrt(2 / np.pi)
            t = np.tanh(c * (x + 0.044715 * x ** 3))
            d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
        else:
            d = 0.5 * (1 + gelu_erf(x * SQRT_HALF)) + x * INV_SQRT_2PI * np.exp(-0.5 * x * x)
        return (dy * d).astype(dy.dtype, copy=False)

    def flops(self, out_shapes, *in_shapes, approximate="none"):
        return 12 * super().flops(out_shapes)


class Erf(Op):
    name = "Erf"
    inplace = True

    def forward(self, a):
        return erf(a).astype(a.dtype, copy=False)

    def gradient(self, g, x, y, dy):
        return (g.emit("ErfGrad", [x[0], dy[0]]),)

    def flops(self, out_shapes, *in_shapes):
        return 8 * super().flops(out_shapes)


class ErfGrad(Op):
    name = "ErfGrad"
    backward_only = True

    def infer(self, x, dy):
        return dy

    def forward(self, x, dy):
        return (dy * TWO_OVER_SQRT_PI * np.exp(-x * x)).astype(dy.dtype, copy=False)


class Sqrt(Op):
    name = "Sqrt"
    inplace = True

    def forward(self, a):
        return np.sqrt(a)

    def gradient(self, g, x, y, dy):  # d sqrt(a) = dy / (2 sqrt(a))
        return (g.emit("Div", [dy[0], g.emit("Mul", [y[0], g.const(2.0, "two", g.dtype(y[0]))])]),)


class Exp(Op):
    name = "Exp"
    inplace = True

    def forward(self, a):
        return np.exp(a)

    def gradient(self, g, x, y, dy):
        return (g.emit("Mul", [dy[0], y[0]]),)


class Pow(Op):
    """Pow with a constant exponent (as torch emits for x**2 in hand-written norms)."""
    name = "Pow"

    def forward(self, a, b):
        return np.power(a, b).astype(a.dtype, copy=False)

    def gradient(self, g, x, y, dy):
        if g.needs(x[1]):
            from compiler.ir import CompileError
            raise CompileError("Pow: gradient with respect to a trainable exponent is not supported")
        one = g.const(1.0, "one", g.dtype(x[1]))
        power = g.emit("Pow", [x[0], g.emit("Sub", [x[1], one])])
        return g.emit("Mul", [dy[0], g.emit("Mul", [power, x[1]])]), None
