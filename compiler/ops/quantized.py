"""The int8 ops of a quantized graph (the Tiny Training Engine's, compiler/quantize.py builds the graph).

Forward in integers: int8 activations with a per-tensor scale and zero point, int8 weights with a per-channel
scale (symmetric), int32 biases in units of s_x·s_w. A layer accumulates Σ (x − z_x)·w + b in int32 and
requantizes: y = clamp(rint(float32(acc) · m) + z_y, −128, 127) with m = s_x·s_w/s_y per output channel
(float32 multiply, round half to even). A ReLU is the clamp at −128 when the output's zero point is −128 (its
calibrated range starts at 0). Backward runs in float32 in the units of the integer tensors (TTE's
quantized_ops_diff): dacc = dy·m masked where y saturated, dW = dacc ⊛ (x − z_x), db = Σ dacc,
dx = dacc ⊛ᵀ w. ``QSGD`` updates an int8 (or int32) parameter in place: p = clamp(p + rint(−lr·g)), or, with
a float32 master copy of the updated channels, master −= lr·g; p = clamp(rint(master)). The gradient it is
given is QAS-scaled by an ordinary Mul (compiler/autodiff.py).
"""
from __future__ import annotations

import numpy as np

from compiler.ir import CompileError
from compiler.ops import _grid
from compiler.ops._util import size
from compiler.ops.base import Op
from compiler.ops.binding import Ref, Site
from compiler.ops.conv import Window, _conv_dims, _weight_gradient, window_args

QMIN, QMAX = -128, 127
INT_LIMITS = {"int8": (QMIN, QMAX), "int32": (-(2 ** 31), 2 ** 31 - 1)}
STEP_LIMIT = 2 ** 30  # |rint(−lr·g)| is clamped to this before it is added to an integer parameter


def requantize(acc: np.ndarray, scale: np.ndarray, zero: int, axis: int = 1) -> np.ndarray:
    """int8 y = clamp(rint(float32(acc)·scale[c]) + zero) with scale per channel along ``axis``."""
    shape = [1] * acc.ndim
    shape[axis] = -1
    v = np.rint(acc.astype(np.float32) * scale.astype(np.float32).reshape(shape))
    return np.clip(v + np.float32(zero), QMIN, QMAX).astype(np.int8)


def _centered(x: np.ndarray, zero: int) -> np.ndarray:
    return x.astype(np.float64) - float(zero)  # exact: float64 holds every int8 sum of products here


class Quantize(Op):
    """int8 y = clamp(rint(x / scale) + zero_point, −128, 127), x float32 (the data entering a quantized graph)."""
    name = "Quantize"
    kind = "elementwise"
    internal = True
    c_call = "ef_quantize(${y}, ${x}, ${n}, ${scale}, ${zero_point})"

    def infer(self, x, *, scale, zero_point=0):
        return tuple(x)

    def out_dtypes(self, dtypes, **attrs):
        return "int8"

    def forward(self, x, *, scale, zero_point=0):
        v = np.rint(x.astype(np.float32) / np.float32(scale))
        return np.clip(v + np.float32(zero_point), QMIN, QMAX).astype(np.int8)

    def c_args(self, site: Site):
        x, y = site.input(0), site.outputs[0]
        site.require("float32", x)
        site.require("int8", y)
        return dict(y=Ref(y), x=Ref(x), n=site.same_size(x, y), scale=float(site.attr("scale")),
                    zero_point=int(site.attr("zero_point")))


class Dequantize(Op):
    """float32 y = (x − zero_point)·scale for an int8 x (scale 1: the centered integers the backward reads)."""
    name = "Dequantize"
    kind = "elementwise"
    internal = True
    c_call = "ef_dequantize(${y}, ${x}, ${n}, ${scale}, ${zero_point})"

    def infer(self, x, *, scale=1.0, zero_point=0):
        return tuple(x)

    def out_dtypes(self, dtypes, **attrs):
        return "float32"

    def forward(self, x, *, scale=1.0, zero_point=0):
        return (x.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)

    def c_args(self, site: Site):
        x, y = site.input(0), site.outputs[0]
        site.require("int8", x)
        site.require("float32", y)
        return dict(y=Ref(y), x=Ref(x), n=site.same_size(x, y), scale=float(site.attr("scale")),
                    zero_point=int(site.attr("zero_point")))


class RequantGrad(Op):
    """The gradient through a requantization: dacc = dy·scale[c] (channel axis 1), 0 where the int8 output y
    saturated (y = −128: the ReLU's zero side; y = 127: clipped). Without y (a float output) no mask."""
    name = "RequantGrad"
    kind = "elementwise"
    internal = True  # emitted by the quantized layers' gradient rules; not backward_only, since the registry's
                     # gradient tests (float inputs) cannot reach it: tests/compiler/test_int8.py does
    c_call = "ef_requant_grad(${dx}, ${dy}, ${scale}, ${y}, ${outer}, ${channels}, ${inner})"

    def infer(self, dy, scale, y=None):
        if len(dy) < 2 or tuple(scale) != (dy[1],) or (y is not None and tuple(y) != tuple(dy)):
            raise CompileError(f"RequantGrad: dy {tuple(dy)}, scale {tuple(scale)} and y {y} do not fit")
        return tuple(dy)

    def out_dtypes(self, dtypes, **attrs):
        return "float32"

    def forward(self, dy, scale, y=None):
        shape = (1, -1) + (1,) * (dy.ndim - 2)
        d = dy.astype(np.float32) * scale.astype(np.float32).reshape(shape)
        if y is None:
            return d
        return np.where((y > QMIN) & (y < QMAX), d, np.float32(0.0)).astype(np.float32)

    def c_args(self, site: Site):
        dy, scale, y, dx = site.input(0), site.input(1), site.optional(2), site.outputs[0]
        site.require("float32", dy, scale, dx)
        if y is not None:
            site.require("int8", y)
        shape = site.shape(dy)
        return dict(dx=Ref(dx), dy=Ref(dy), scale=Ref(scale), y=Ref(y) if y else None, outer=shape[0],
                    channels=shape[1], inner=size(shape[2:]))


def _requant_gradient(g, y: str, dy: str, scale: str, masked: bool) -> str:
    return g.emit("RequantGrad", [dy, scale, y] if masked else [dy, scale], "grad")


class QConv(Op):
    """int8 y = requantize(conv(x − x_zero, w) + b) with x, w int8, b int32 and ``scale`` (M,) float32 the
    per-channel multiplier s_x·s_w/s_y; ONNX Conv's window attributes."""
    name = "QConv"
    kind = "conv"
    internal = True
    cost = "int8"
    c_call = "ef_qconv(${y}, ${x}, ${w}, ${b}, ${scale}, ${win}, ${x_zero}, ${y_zero})"

    def infer(self, x, w, b, scale, *, strides=None, pads=None, dilations=None, group=1, auto_pad="NOTSET",
              x_zero=0, y_zero=0):
        _conv_dims("QConv", x, w, group)
        if tuple(b) != (w[0],) or tuple(scale) != (w[0],):
            raise CompileError(f"QConv: bias {tuple(b)} / scale {tuple(scale)} do not match {w[0]} output channels")
        win = Window.of("QConv", x, w[2:], strides, pads, dilations, auto_pad)
        return (x[0], w[0], *win.out_shape)

    def out_dtypes(self, dtypes, **attrs):
        return "int8"

    def accumulate(self, x, w, b, *, strides=None, pads=None, dilations=None, group=1, auto_pad="NOTSET",
                   x_zero=0) -> np.ndarray:
        """The int64 accumulator conv(x − x_zero, w) + b."""
        win = Window.of("QConv", x.shape, w.shape[2:], strides, pads, dilations, auto_pad)
        out = np.empty((x.shape[0], w.shape[0], *win.out_shape), np.float64)
        _grid.conv_forward(win, win.lift(_centered(x, x_zero)), win.lift(w.astype(np.float64)), group,
                           win.lift(out))
        return np.rint(out).astype(np.int64) + b.astype(np.int64).reshape(1, -1, *(1,) * (x.ndim - 2))

    def forward(self, x, w, b, scale, *, strides=None, pads=None, dilations=None, group=1, auto_pad="NOTSET",
                x_zero=0, y_zero=0):
        acc = self.accumulate(x, w, b, strides=strides, pads=pads, dilations=dilations, group=group,
                              auto_pad=auto_pad, x_zero=x_zero)
        return requantize(acc, scale, y_zero)

    def gradient(self, g, x, y, dy, *, strides=None, pads=None, dilations=None, group=1, auto_pad="NOTSET",
                 x_zero=0, y_zero=0):
        window = dict(strides=strides, pads=pads, dilations=dilations, group=group, auto_pad=auto_pad)
        dacc = _requant_gradient(g, y[0], dy[0], x[3], masked=True)
        dx = dw = db = None
        if g.needs(x[0]):
            w = g.emit("Dequantize", [x[1]], "grad")
            dx = g.emit("ConvGradInput", [dacc, w], shape=g.shape(x[0]), **window)
        if g.needs(x[1]):
            xc = g.emit("Dequantize", [x[0]], "grad", zero_point=int(x_zero))
            dw = _weight_gradient(g, xc, x[1], dacc, window)
        if g.needs(x[2]):
            db = g.emit("ReduceSum", [dacc], axes=(0, *range(2, len(g.shape(dacc)))), keepdims=0)
        return dx, dw, db, None

    def flops(self, out_shapes, x, w, b=None, scale=None, **attrs):
        return 2 * size(out_shapes[0]) * size(w[1:]) + 3 * size(out_shapes[0])

    def c_args(self, site: Site):
        x, w, b, scale, y = site.input(0), site.input(1), site.input(2), site.input(3), site.outputs[0]
        site.require("int8", x, w, y)
        site.require("int32", b)
        site.require("float32", scale)
        wshape = site.shape(w)
        attrs = {k: site.attr(k) for k in ("strides", "pads", "dilations", "auto_pad")}
        win = window_args(site, site.shape(x), wshape[2:], wshape[0], site.attr("group"), **attrs)
        return dict(y=Ref(y), x=Ref(x), w=Ref(w), b=Ref(b), scale=Ref(scale), win=win,
                    x_zero=int(site.attr("x_zero")), y_zero=int(site.attr("y_zero")))


class QLinear(Op):
    """y = requantize((x − x_zero)·wᵀ + b) with x (N, K) and w (M, K) int8, b (M,) int32, scale (M,); with
    ``output = "float32"`` the logits in real units instead: y = float32(acc)·scale (scale = s_x·s_w)."""
    name = "QLinear"
    kind = "gemm"
    internal = True
    cost = "int8"
    c_call = "ef_qlinear(${y}, ${x}, ${w}, ${b}, ${scale}, ${n}, ${m}, ${k}, ${x_zero}, ${y_zero}, ${out_float})"

    def infer(self, x, w, b, scale, *, x_zero=0, y_zero=0, output="int8"):
        if len(x) != 2 or len(w) != 2 or x[1] != w[1] or tuple(b) != (w[0],) or tuple(scale) != (w[0],):
            raise CompileError(f"QLinear: x {tuple(x)}, w {tuple(w)}, b {tuple(b)}, scale {tuple(scale)} do not fit")
        if output not in ("int8", "float32"):
            raise CompileError(f"QLinear: output must be int8 or float32, got {output!r}")
        return (x[0], w[0])

    def out_dtypes(self, dtypes, *, output="int8", **attrs):
        return output

    def forward(self, x, w, b, scale, *, x_zero=0, y_zero=0, output="int8"):
        acc = np.rint(_centered(x, x_zero) @ w.astype(np.float64).T).astype(np.int64) + b.astype(np.int64)
        if output == "float32":
            return acc.astype(np.float32) * scale.astype(np.float32)
        return requantize(acc, scale, y_zero)

    def gradient(self, g, x, y, dy, *, x_zero=0, y_zero=0, output="int8"):
        dacc = _requant_gradient(g, y[0], dy[0], x[3], masked=output == "int8")
        dx = dw = db = None
        if g.needs(x[0]):
            dx = g.emit("Gemm", [dacc, g.emit("Dequantize", [x[1]], "grad")])
        if g.needs(x[1]):
            restricted = g.train_channels(x[1])
            dk = g.channel_slice(dacc, 1, restricted[1]) if restricted else dacc
            xc = g.emit("Dequantize", [x[0]], "grad", zero_point=int(x_zero))
            dw = g.emit("Gemm", [dk, xc], transA=1)
        if g.needs(x[2]):
            db = g.emit("ReduceSum", [dacc], axes=(0,), keepdims=0)
        return dx, dw, db, None

    def flops(self, out_shapes, x, w, b=None, scale=None, **attrs):
        return 2 * x[0] * w[0] * w[1] + 3 * x[0] * w[0]

    def c_args(self, site: Site):
        x, w, b, scale, y = site.input(0), site.input(1), site.input(2), site.input(3), site.outputs[0]
        site.require("int8", x, w)
        site.require("int32", b)
        site.require("float32", scale)
        out_float = site.attr("output") == "float32"
        site.require("float32" if out_float else "int8", y)
        (n, k), m = site.shape(x), site.shape(w)[0]
        return dict(y=Ref(y), x=Ref(x), w=Ref(w), b=Ref(b), scale=Ref(scale), n=n, m=m, k=k,
                    x_zero=int(site.attr("x_zero")), y_zero=int(site.attr("y_zero")), out_float=int(out_float))


class QGlobalAveragePool(Op):
    """int8 y = rint(float32(Σ x) / plane size) over the spatial axes (same scale and zero point as x)."""
    name = "QGlobalAveragePool"
    kind = "pool"
    internal = True
    c_call = "ef_qglobal_average_pool(${y}, ${x}, ${planes}, ${plane_size})"

    def infer(self, x):
        if len(x) < 3:
            raise CompileError(f"QGlobalAveragePool: input {tuple(x)} has no spatial axes")
        return (*x[:2], *(1 for _ in x[2:]))

    def forward(self, x):
        axes = tuple(range(2, x.ndim))
        total = x.astype(np.int64).sum(axis=axes, keepdims=True).astype(np.float32)
        return np.clip(np.rint(total / np.float32(size(x.shape[2:]))), QMIN, QMAX).astype(np.int8)

    def gradient(self, g, x, y, dy):
        shape = g.shape(x[0])
        spread = g.emit("Expand", [dy[0]], shape=shape)
        return (g.emit("Mul", [spread, g.const(1.0 / size(shape[2:]), "inv_count")]),)

    def flops(self, out_shapes, x):
        return size(x)

    def c_args(self, site: Site):
        x, y = site.input(0), site.outputs[0]
        site.require("int8", x, y)
        shape = site.shape(x)
        return dict(y=Ref(y), x=Ref(x), planes=size(shape[:2]), plane_size=size(shape[2:]))


class QSGD(Op):
    """SGD on an integer parameter, in place. Inputs: param (int8 or int32), grad (float32, the updated
    sub-tensor's shape), lr [, master]. Without a master: p = clamp(p + rint(−(g·lr))). With a float32 master
    copy of the updated channels: master = master − g·lr; p = clamp(rint(master)). ``channels`` k > 0: only the
    first k entries along ``axis`` are updated (a sparse update)."""
    name = "QSGD"
    kind = "optimizer"
    internal = True
    num_outputs = -1
    updates = (0, 3)
    foldable = False
    c_call = "ef_qsgd(${param}, ${int32}, ${grad}, ${lr}, ${master}, ${rows}, ${cols}, ${ld})"

    def infer(self, param, grad, lr, master=None, *, axis=0, channels=0):
        want = self.update_shape(param, axis=axis, channels=channels)
        if tuple(grad) != want or (master is not None and tuple(master) != want):
            raise CompileError(f"QSGD: grad {tuple(grad)} / master {master} do not fit param {tuple(param)} "
                               f"(axis {axis}, channels {channels})")
        return ()

    def update_shape(self, param, index=0, *, axis=0, channels=0, **attrs):
        param = tuple(param)
        return param if not channels else param[:axis] + (channels,) + param[axis + 1:]

    def forward(self, param, grad, lr, master=None, *, axis=0, channels=0):
        lo, hi = INT_LIMITS[str(param.dtype)]
        index = (slice(None),) * axis + (slice(0, channels or None),)
        step = grad.astype(np.float32) * lr.astype(np.float32)
        new = param.copy()
        if master is None:
            delta = np.clip(np.rint(-step), -STEP_LIMIT, STEP_LIMIT).astype(np.int64)
            new[index] = np.clip(param[index].astype(np.int64) + delta, lo, hi)
            return (new,)
        master = (master - step).astype(master.dtype, copy=False)
        new[index] = np.clip(np.rint(master), lo, hi)
        return new, master

    def flops(self, out_shapes, param, grad, *rest, **attrs):
        return 3 * size(grad)

    def c_args(self, site: Site):
        param, grad, lr, master = site.input(0), site.input(1), site.input(2), site.optional(3)
        site.require("float32", grad, lr, master)
        if site.dtype(param) not in INT_LIMITS:
            raise site.error(f"QSGD updates int8 or int32 parameters; {param!r} is {site.dtype(param)}")
        n = site.same_size(grad, *(x for x in (master,) if x))
        shape, axis, channels = site.shape(param), int(site.attr("axis")), int(site.attr("channels"))
        rows, ld = (1, n) if not channels else (size(shape[:axis]), size(shape[axis:]))
        return dict(param=Ref(param), int32=int(site.dtype(param) == "int32"), grad=Ref(grad), lr=Ref(lr),
                    master=Ref(master) if master else None, rows=rows, cols=n // rows, ld=ld)
