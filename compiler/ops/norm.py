"""Softmax and the normalizations (LayerNormalization, inference-form BatchNormalization) with their backward ops."""
from __future__ import annotations

import numpy as np

from compiler.ir import CompileError
from compiler.ops import _jit
from compiler.ops._util import norm_axis, size
from compiler.ops.base import Op
from compiler.ops.binding import Ref, Site
from compiler.ops.layout import split_at


def _softmax_split(site: Site, name: str) -> tuple[int, int, int]:
    shape = site.shape(name)
    return split_at(shape, norm_axis(int(site.attr("axis")), len(shape)))


class Softmax(Op):
    """ONNX opset-13 Softmax: normalized along one axis."""
    name = "Softmax"
    kind = "norm"
    c_call = "ef_softmax(${y}, ${x}, ${outer}, ${n}, ${inner})"
    cluster = True

    def infer(self, x, *, axis=-1):
        norm_axis(axis, len(x))
        return x

    def forward(self, x, *, axis=-1):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    def forward_into(self, outs, x, *, axis=-1):
        y = outs[0]
        np.subtract(x, x.max(axis=axis, keepdims=True), out=y)
        np.exp(y, out=y)
        y /= y.sum(axis=axis, keepdims=True)

    def gradient(self, g, x, y, dy, *, axis=-1):
        return (g.emit("SoftmaxGrad", [y[0], dy[0]], axis=axis),)

    def flops(self, out_shapes, x, **attrs):
        return 5 * size(x)

    def c_args(self, site: Site):
        x, y = site.input(0), site.outputs[0]
        site.require("float32", x, y)
        outer, n, inner = _softmax_split(site, x)
        return dict(y=Ref(y), x=Ref(x), outer=outer, n=n, inner=inner)


class SoftmaxGrad(Op):
    """dx = y · (dy - Σ dy·y) along the axis; reads the Softmax output, not its input."""
    name = "SoftmaxGrad"
    kind = "norm"
    backward_only = True
    c_call = "ef_softmax_grad(${dx}, ${y}, ${dy}, ${outer}, ${n}, ${inner})"
    cluster = True

    def infer(self, y, dy, *, axis=-1):
        return dy

    def forward(self, y, dy, *, axis=-1):
        return y * (dy - (dy * y).sum(axis=axis, keepdims=True))

    def forward_into(self, outs, y, dy, *, axis=-1):
        dx = outs[0]
        np.multiply(dy, y, out=dx)
        total = dx.sum(axis=axis, keepdims=True)
        np.subtract(dy, total, out=dx)
        dx *= y

    def flops(self, out_shapes, y, dy, **attrs):
        return 4 * size(dy)

    def c_args(self, site: Site):
        y, dy, dx = site.input(0), site.input(1), site.outputs[0]
        site.require("float32", y, dy, dx)
        outer, n, inner = _softmax_split(site, dy)
        return dict(dx=Ref(dx), y=Ref(y), dy=Ref(dy), outer=outer, n=n, inner=inner)


def _broadcasts_to(shape, target) -> bool:
    try:
        return tuple(np.broadcast_shapes(tuple(shape), tuple(target))) == tuple(target)
    except ValueError:
        return False


def _rows(site: Site, x: str) -> tuple[int, int, tuple]:
    shape = site.shape(x)
    axis = norm_axis(int(site.attr("axis")), len(shape))
    return size(shape[:axis]), size(shape[axis:]), shape[axis:]


def _repeat(site: Site, name: str, normalized) -> int:
    """Elements of a scale/bias that repeats along a normalized row (its shape, without leading 1s, must be
    a suffix of the normalized shape)."""
    shape = list(site.shape(name))
    while shape and shape[0] == 1:
        shape.pop(0)
    if tuple(shape) != tuple(normalized[len(normalized) - len(shape):]) or len(shape) > len(normalized):
        raise site.error(f"{name!r} of shape {site.shape(name)} broadcasts over the normalized shape "
                         f"{normalized} in a way the C kernel does not support (only trailing axes)")
    return size(shape)


def _normalized_axes(x_shape, axis):
    return tuple(range(norm_axis(axis, len(x_shape)), len(x_shape)))


def _as_rows(x, axis):
    """x as a 2-D (rows, normalized size) view (a copy only if x is not contiguous)."""
    first = norm_axis(axis, x.ndim)
    return x.reshape(size(x.shape[:first]), size(x.shape[first:]))


def _per_column(v, x_shape, axis):
    """scale or bias broadcast to the normalized shape, flattened: (normalized size,)."""
    return np.broadcast_to(v, x_shape[norm_axis(axis, len(x_shape)):]).reshape(-1)


class LayerNormalization(Op):
    """Y = (X - mean) / sqrt(var + epsilon) · Scale + B over the axes from ``axis`` on (the Y output only).

    ``stash_type`` is accepted and ignored: the statistics are summed in the input's dtype (``_jit.layer_norm``)."""
    name = "LayerNormalization"
    kind = "norm"
    c_call = "ef_layer_normalization(${y}, ${x}, ${scale}, ${bias}, ${rows}, ${n}, ${ns}, ${epsilon})"
    cluster = True

    def infer(self, x, scale, b=None, *, axis=-1, epsilon=1e-5, stash_type=1):
        normalized = tuple(x[a] for a in _normalized_axes(x, axis))
        for name, shape in (("scale", scale), ("bias", b)):
            if shape is not None and not _broadcasts_to(shape, normalized):
                raise CompileError(f"LayerNormalization: {name} {tuple(shape)} does not broadcast to the "
                                   f"normalized shape {normalized}")
        return x

    def forward(self, x, scale, b=None, *, axis=-1, epsilon=1e-5, stash_type=1):
        y = np.empty(x.shape, np.result_type(x, scale))
        self.forward_into((y,), x, scale, b, axis=axis, epsilon=epsilon)
        return y

    def forward_into(self, outs, x, scale, b=None, *, axis=-1, epsilon=1e-5, stash_type=1):
        scale1 = _per_column(scale, x.shape, axis)
        bias1 = np.zeros_like(scale1) if b is None else _per_column(b, x.shape, axis)
        y = outs[0]
        _jit.layer_norm(_as_rows(x, axis), scale1, bias1, _as_rows(y, axis), float(epsilon), y.dtype.type(0))

    def gradient(self, g, x, y, dy, *, axis=-1, epsilon=1e-5, stash_type=1):
        dx = ds = db = None
        if g.needs(x[0]):
            dx = g.emit("LayerNormGradInput", [x[0], x[1], dy[0]], axis=axis, epsilon=epsilon)
        if g.needs(x[1]):
            ds = g.emit("LayerNormGradScale", [x[0], dy[0]], axis=axis, epsilon=epsilon)
        if len(x) > 2 and g.needs(x[2]):
            db = g.sum_to(dy[0], g.shape(x[2]))
        return (dx, ds) if len(x) == 2 else (dx, ds, db)

    def flops(self, out_shapes, x, *rest, **attrs):
        return 8 * size(x)

    def c_args(self, site: Site):
        x, scale, b, y = site.input(0), site.input(1), site.optional(2), site.outputs[0]
        site.require("float32", x, scale, b, y)
        rows, n, normalized = _rows(site, x)
        ns = _repeat(site, scale, normalized)
        if b is not None and _repeat(site, b, normalized) != ns:
            raise site.error(f"scale {site.shape(scale)} and bias {site.shape(b)} repeat differently")
        site.attr("stash_type")  # the C kernel keeps its statistics in float32
        return dict(y=Ref(y), x=Ref(x), scale=Ref(scale), bias=Ref(b) if b else None, rows=rows, n=n, ns=ns,
                    epsilon=float(site.attr("epsilon")))


class LayerNormGradInput(Op):
    """dx = rstd · (ĝ - mean(ĝ) - x̂ · mean(ĝ · x̂)) with ĝ = dy · scale; mean and rstd are recomputed."""
    name = "LayerNormGradInput"
    kind = "norm"
    backward_only = True
    c_call = "ef_layer_norm_grad_input(${dx}, ${x}, ${scale}, ${dy}, ${rows}, ${n}, ${ns}, ${epsilon})"
    cluster = True

    def infer(self, x, scale, dy, *, axis=-1, epsilon=1e-5):
        return x

    def forward(self, x, scale, dy, *, axis=-1, epsilon=1e-5):
        dx = np.empty(x.shape, np.result_type(x, dy))
        self.forward_into((dx,), x, scale, dy, axis=axis, epsilon=epsilon)
        return dx

    def forward_into(self, outs, x, scale, dy, *, axis=-1, epsilon=1e-5):
        dx = outs[0]
        _jit.layer_norm_grad_input(_as_rows(x, axis), _per_column(scale, x.shape, axis), _as_rows(dy, axis),
                                   _as_rows(dx, axis), float(epsilon), dx.dtype.type(0))

    def flops(self, out_shapes, x, *rest, **attrs):
        return 14 * size(x)

    def c_args(self, site: Site):
        x, scale, dy, dx = site.input(0), site.input(1), site.input(2), site.outputs[0]
        site.require("float32", x, scale, dy, dx)
        rows, n, normalized = _rows(site, x)
        return dict(dx=Ref(dx), x=Ref(x), scale=Ref(scale), dy=Ref(dy), rows=rows, n=n,
                    ns=_repeat(site, scale, normalized), epsilon=float(site.attr("epsilon")))


class LayerNormGradScale(Op):
    """dscale = Σ dy · x̂ over the leading (not normalized) axes; shape x.shape[axis:]."""
    name = "LayerNormGradScale"
    kind = "norm"
    backward_only = True
    c_call = "ef_layer_norm_grad_scale(${ds}, ${x}, ${dy}, ${rows}, ${n}, ${epsilon})"
    cluster = True

    def infer(self, x, dy, *, axis=-1, epsilon=1e-5):
        return tuple(x[norm_axis(axis, len(x)):])

    def forward(self, x, dy, *, axis=-1, epsilon=1e-5):
        ds = np.empty(x.shape[norm_axis(axis, x.ndim):], np.result_type(x, dy))
        self.forward_into((ds,), x, dy, axis=axis, epsilon=epsilon)
        return ds

    def forward_into(self, outs, x, dy, *, axis=-1, epsilon=1e-5):
        ds = outs[0]
        _jit.layer_norm_grad_scale(_as_rows(x, axis), _as_rows(dy, axis), ds.reshape(-1), float(epsilon),
                                   ds.dtype.type(0))

    def flops(self, out_shapes, x, *rest, **attrs):
        return 10 * size(x)

    def c_args(self, site: Site):
        x, dy, ds = site.input(0), site.input(1), site.outputs[0]
        site.require("float32", x, dy, ds)
        rows, n, _ = _rows(site, x)
        return dict(ds=Ref(ds), x=Ref(x), dy=Ref(dy), rows=rows, n=n, epsilon=float(site.attr("epsilon")))


BATCH_NORM_INPUTS = ("X", "scale", "B", "input_mean", "input_var")


class BatchNormalization(Op):
    """Inference form: Y = (X - mean) / sqrt(var + epsilon) · scale + B per channel (axis 1).

    The running statistics are constants, so training through it needs only dX = dY · scale / sqrt(var + eps),
    built from ordinary ops. ``momentum`` only matters in training mode, which is not supported."""
    name = "BatchNormalization"
    kind = "norm"
    c_call = ("ef_batch_normalization(${y}, ${x}, ${scale}, ${b}, ${mean}, ${var}, ${batch}, ${channels}, "
              "${inner}, ${epsilon})")

    def infer(self, x, scale, b, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0):
        if training_mode:
            raise CompileError("BatchNormalization: training_mode=1 is not supported (export the model in "
                               "eval mode: the running statistics stay fixed)")
        if len(x) < 2:
            raise CompileError(f"BatchNormalization: input {tuple(x)} has no channel axis")
        for name, shape in zip(BATCH_NORM_INPUTS[1:], (scale, b, mean, var)):
            if tuple(shape) != (x[1],):
                raise CompileError(f"BatchNormalization: {name} {tuple(shape)} does not match {x[1]} channels")
        return x

    def forward(self, x, scale, b, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0):
        self.infer(x.shape, scale.shape, b.shape, mean.shape, var.shape, training_mode=training_mode)
        channel = (1, -1) + (1,) * (x.ndim - 2)
        factor = scale / np.sqrt(var + epsilon)
        y = (x - mean.reshape(channel)) * factor.reshape(channel) + b.reshape(channel)
        return y.astype(x.dtype, copy=False)

    def gradient(self, g, x, y, dy, *, epsilon=1e-5, momentum=0.9, training_mode=0):
        for role, name in zip(BATCH_NORM_INPUTS[1:], x[1:]):
            if g.needs(name):
                raise CompileError(f"BatchNormalization: cannot train {role} {name!r}: only the inference form "
                                   "is supported, whose gradient flows to X alone")
        shape = g.shape(x[0])
        std = g.emit("Sqrt", [g.emit("Add", [x[4], g.const(epsilon, "epsilon", g.dtype(x[4]))])])
        factor = g.reshape(g.emit("Div", [x[1], std]), (shape[1],) + (1,) * (len(shape) - 2))
        return (g.emit("Mul", [dy[0], factor]), None, None, None, None)

    def flops(self, out_shapes, x, *rest, **attrs):
        return 2 * size(x)

    def c_args(self, site: Site):
        x, scale, b, mean, var = (site.input(i) for i in range(5))
        y = site.outputs[0]
        site.require("float32", x, scale, b, mean, var, y)
        if int(site.attr("training_mode")):
            raise site.error("training_mode=1 is not supported")
        site.attr("momentum")  # only matters in training mode
        shape = site.shape(x)
        return dict(y=Ref(y), x=Ref(x), scale=Ref(scale), b=Ref(b), mean=Ref(mean), var=Ref(var), batch=shape[0],
                    channels=shape[1], inner=size(shape[2:]), epsilon=float(site.attr("epsilon")))
