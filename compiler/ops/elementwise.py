"""Elementwise ops (numpy broadcasting) and their backward helpers.

Three families share base classes: ``Binary`` (y = f(a, b), broadcasting, one strided C kernel each),
``Unary`` (y = f(x), elementwise, ``fn`` is the numpy forward) and ``UnaryGrad`` (dx from (y or x, dy)). A new
pointwise op is a subclass with its ``fn``, C call and gradient rule."""
from __future__ import annotations

import numpy as np
from scipy.special import erf  # scipy is a scikit-learn dependency; numpy has no erf

from compiler.ir import CompileError
from compiler.ops import _jit
from compiler.ops._grid import _work
from compiler.ops.binding import Site, binary_args, pair_grad_args, unary_args
from compiler.ops.base import Op

SQRT_HALF = float(np.sqrt(0.5))            # Python floats: they keep float32 arrays float32 (NEP 50)
INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))

# GELU in float32 uses the Abramowitz & Stegun 7.1.26 erf, erf(x) = 1 - t(a1 + t(a2 + … + t a5)) e^{-x²},
# t = 1/(1 + p|x|), |error| <= 1.5e-7 (below 1e-6 relative in GELU and its gradient; 4x faster than SciPy's erf),
# compiled in ``_jit.gelu``/``_jit.gelu_grad``; float64 uses SciPy's exact erf. Not used for the Erf op itself,
# whose relative accuracy near 0 must be exact.


def _gelu_exp(x: np.ndarray) -> np.ndarray:
    """exp(-(x·√½)²) for the float32 GELU kernels (``_jit.gelu``): the argument in a compiled loop, the
    exponential by numpy (vectorised), into a reused scratch array."""
    ez = _work("gelu.exp", x.shape, x.dtype)
    _jit.gelu_exp_argument(x, ez)
    return np.exp(ez, out=ez)


TWO_OVER_SQRT_PI = np.float64(2.0 / np.sqrt(np.pi))
GELU_APPROXIMATIONS = {"none": 0, "tanh": 1}


# ---- the families ---------------------------------------------------------------------------------------
class Binary(Op):
    """y = f(a, b) with numpy broadcasting; ``ufunc`` computes it (also straight into the planned output)."""
    inplace = True
    ufunc: np.ufunc

    def forward(self, a, b):
        return self.ufunc(a, b)

    def forward_into(self, outs, a, b):
        self.ufunc(a, b, out=outs[0])

    def c_args(self, site: Site):
        return binary_args(site)


class Unary(Op):
    """y = fn(x) elementwise, ``flops_per_element`` each; the C kernel takes (y, x, n)."""
    inplace = True
    flops_per_element = 1

    def fn(self, a: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def forward(self, a):
        return self.fn(a)

    def flops(self, out_shapes, *in_shapes, **attrs):
        return self.flops_per_element * super().flops(out_shapes)

    def c_args(self, site: Site):
        return unary_args(site)


class UnaryGrad(Op):
    """dx from (v, dy), v the forward op's output or input (same shape as dy); the C kernel takes (dx, v, dy, n)."""
    backward_only = True
    flops_per_element = 1

    def infer(self, v, dy, **attrs):
        return dy

    def flops(self, out_shapes, *in_shapes, **attrs):
        return self.flops_per_element * super().flops(out_shapes)

    def c_args(self, site: Site):
        return pair_grad_args(site)


# ---- binary -------------------------------------------------------------------------------------------------
class Add(Binary):
    name = "Add"
    ufunc = np.add
    c_call = "ef_add(${y}, ${a}, ${b}, ${rank}, ${shape}, ${sa}, ${sb})"
    cluster = True

    def gradient(self, g, x, y, dy):
        return dy[0], dy[0]


class Sub(Binary):
    name = "Sub"
    ufunc = np.subtract
    c_call = "ef_sub(${y}, ${a}, ${b}, ${rank}, ${shape}, ${sa}, ${sb})"
    cluster = True

    def gradient(self, g, x, y, dy):
        return dy[0], (g.emit("Neg", [dy[0]]) if g.needs(x[1]) else None)


class Mul(Binary):
    name = "Mul"
    ufunc = np.multiply
    c_call = "ef_mul(${y}, ${a}, ${b}, ${rank}, ${shape}, ${sa}, ${sb})"
    cluster = True

    def gradient(self, g, x, y, dy):
        da = g.emit("Mul", [dy[0], x[1]]) if g.needs(x[0]) else None
        db = g.emit("Mul", [dy[0], x[0]]) if g.needs(x[1]) else None
        return da, db


class Div(Binary):
    name = "Div"
    ufunc = np.divide
    c_call = "ef_div(${y}, ${a}, ${b}, ${rank}, ${shape}, ${sa}, ${sb})"
    cluster = True

    def gradient(self, g, x, y, dy):
        da = g.emit("Div", [dy[0], x[1]]) if g.needs(x[0]) else None
        db = None
        if g.needs(x[1]):  # d(a/b)/db = -(a/b)/b
            db = g.emit("Neg", [g.emit("Div", [g.emit("Mul", [dy[0], y[0]]), x[1]])])
        return da, db


class Pow(Binary):
    """Pow with a constant exponent (as torch emits for x**2 in hand-written norms)."""
    name = "Pow"
    inplace = False
    c_call = "ef_pow(${y}, ${a}, ${b}, ${rank}, ${shape}, ${sa}, ${sb})"

    def forward(self, a, b):
        return np.power(a, b).astype(a.dtype, copy=False)

    def forward_into(self, outs, a, b):
        Op.forward_into(self, outs, a, b)

    def gradient(self, g, x, y, dy):
        if g.needs(x[1]):
            raise CompileError("Pow: gradient with respect to a trainable exponent is not supported")
        one = g.const(1.0, "one", g.dtype(x[1]))
        power = g.emit("Pow", [x[0], g.emit("Sub", [x[1], one])])
        return g.emit("Mul", [dy[0], g.emit("Mul", [power, x[1]])]), None


# ---- unary --------------------------------------------------------------------------------------------------
class Neg(Unary):
    name = "Neg"
    c_call = "ef_neg(${y}, ${x}, ${n})"
    cluster = True

    def fn(self, a):
        return -a

    def forward_into(self, outs, a):
        np.negative(a, out=outs[0])

    def gradient(self, g, x, y, dy):
        return (g.emit("Neg", [dy[0]]),)


class Relu(Unary):
    name = "Relu"
    c_call = "ef_relu(${y}, ${x}, ${n})"
    cluster = True

    def fn(self, a):
        return np.maximum(a, 0).astype(a.dtype, copy=False)

    def forward_into(self, outs, a):
        x, y = a.reshape(-1), outs[0].reshape(-1)  # one compiled pass (numpy's maximum is 4x slower here)
        if x.__array_interface__["data"][0] == y.__array_interface__["data"][0]:
            _jit.relu_inplace(y)  # the planner put the output on the dying input
        else:
            _jit.relu(x, y)

    def gradient(self, g, x, y, dy):
        return (g.emit("ReluGrad", [y[0], dy[0]]),)


class ReluGrad(UnaryGrad):
    """dx = dy where y > 0 (reads the Relu output, so the input may be freed or overwritten)."""
    name = "ReluGrad"
    c_call = "ef_relu_grad(${dx}, ${v}, ${dy}, ${n})"
    cluster = True

    def forward(self, y, dy):
        return np.multiply(dy, y > 0)  # 8x faster than np.where; the same for finite dy

    def forward_into(self, outs, y, dy):
        _jit.relu_grad(y.reshape(-1), dy.reshape(-1), outs[0].reshape(-1))


class Sigmoid(Unary):
    name = "Sigmoid"
    flops_per_element = 4
    c_call = "ef_sigmoid(${y}, ${x}, ${n})"
    cluster = True

    def fn(self, a):
        return (1.0 / (1.0 + np.exp(-a))).astype(a.dtype, copy=False)

    def gradient(self, g, x, y, dy):
        return (g.emit("SigmoidGrad", [y[0], dy[0]]),)


class SigmoidGrad(UnaryGrad):
    name = "SigmoidGrad"
    flops_per_element = 3
    c_call = "ef_sigmoid_grad(${dx}, ${v}, ${dy}, ${n})"
    cluster = True

    def forward(self, y, dy):
        return dy * y * (1 - y)


class Tanh(Unary):
    name = "Tanh"
    flops_per_element = 4
    c_call = "ef_tanh(${y}, ${x}, ${n})"
    cluster = True

    def fn(self, a):
        return np.tanh(a)

    def gradient(self, g, x, y, dy):
        return (g.emit("TanhGrad", [y[0], dy[0]]),)


class TanhGrad(UnaryGrad):
    name = "TanhGrad"
    flops_per_element = 3
    c_call = "ef_tanh_grad(${dx}, ${v}, ${dy}, ${n})"
    cluster = True

    def forward(self, y, dy):
        return dy * (1 - y * y)


def _approximate(site: Site) -> int:
    value = site.attr("approximate")
    if value not in GELU_APPROXIMATIONS:
        raise site.error(f"approximate={value!r} is not one of {sorted(GELU_APPROXIMATIONS)}")
    return GELU_APPROXIMATIONS[value]


class Gelu(Unary):
    """ONNX Gelu (opset 20); the Erf form that torch emits at older opsets is fused into it on import."""
    name = "Gelu"
    flops_per_element = 8
    c_call = "ef_gelu(${y}, ${x}, ${n}, ${approximate})"
    cluster = True

    def forward(self, a, *, approximate="none"):
        if approximate == "tanh":
            inner = np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)
            return (0.5 * a * (1 + np.tanh(inner))).astype(a.dtype, copy=False)
        if a.dtype == np.float32:
            y = np.empty(a.shape, a.dtype)
            self.forward_into((y,), a, approximate=approximate)
            return y
        return 0.5 * a * (1 + erf(a * SQRT_HALF))

    def forward_into(self, outs, a, *, approximate="none"):
        if approximate != "none" or a.dtype != np.float32:
            return super().forward_into(outs, a, approximate=approximate)
        x = a.reshape(-1)
        _jit.gelu(x, _gelu_exp(x), outs[0].reshape(-1))

    def gradient(self, g, x, y, dy, *, approximate="none"):
        return (g.emit("GeluGrad", [x[0], dy[0]], approximate=approximate),)

    def c_args(self, site: Site):
        return dict(unary_args(site), approximate=_approximate(site))


class GeluGrad(UnaryGrad):
    name = "GeluGrad"
    flops_per_element = 12
    c_call = "ef_gelu_grad(${dx}, ${v}, ${dy}, ${n}, ${approximate})"
    cluster = True

    def forward(self, x, dy, *, approximate="none"):
        if approximate == "tanh":
            c = np.sqrt(2 / np.pi)
            t = np.tanh(c * (x + 0.044715 * x ** 3))
            d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
            return (dy * d).astype(dy.dtype, copy=False)
        if x.dtype == np.float32:
            dx = np.empty(dy.shape, dy.dtype)
            self.forward_into((dx,), x, dy, approximate=approximate)
            return dx
        return dy * (0.5 * (1 + erf(x * SQRT_HALF)) + x * INV_SQRT_2PI * np.exp(-0.5 * x * x))

    def forward_into(self, outs, x, dy, *, approximate="none"):
        if approximate != "none" or x.dtype != np.float32:
            return super().forward_into(outs, x, dy, approximate=approximate)
        x1 = x.reshape(-1)
        _jit.gelu_grad(x1, dy.reshape(-1), _gelu_exp(x1), outs[0].reshape(-1))

    def c_args(self, site: Site):
        return dict(pair_grad_args(site), approximate=_approximate(site))


class Erf(Unary):
    name = "Erf"
    flops_per_element = 8
    c_call = "ef_erf(${y}, ${x}, ${n})"
    cluster = True

    def fn(self, a):
        return erf(a).astype(a.dtype, copy=False)

    def gradient(self, g, x, y, dy):
        return (g.emit("ErfGrad", [x[0], dy[0]]),)


class ErfGrad(UnaryGrad):
    name = "ErfGrad"
    c_call = "ef_erf_grad(${dx}, ${v}, ${dy}, ${n})"
    cluster = True

    def forward(self, x, dy):
        return (dy * TWO_OVER_SQRT_PI * np.exp(-x * x)).astype(dy.dtype, copy=False)


class Sqrt(Unary):
    name = "Sqrt"
    c_call = "ef_sqrt(${y}, ${x}, ${n})"
    cluster = True

    def fn(self, a):
        return np.sqrt(a)

    def gradient(self, g, x, y, dy):  # d sqrt(a) = dy / (2 sqrt(a))
        return (g.emit("Div", [dy[0], g.emit("Mul", [y[0], g.const(2.0, "two", g.dtype(y[0]))])]),)


class Exp(Unary):
    name = "Exp"
    c_call = "ef_exp(${y}, ${x}, ${n})"
    cluster = True

    def fn(self, a):
        return np.exp(a)

    def gradient(self, g, x, y, dy):
        return (g.emit("Mul", [dy[0], y[0]]),)
