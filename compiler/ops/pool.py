"""Pooling (ONNX semantics, 1-D and 2-D) and its backward ops; the window walk is ``conv.Window``'s."""
from __future__ import annotations

import numpy as np

from compiler.ir import CompileError
from compiler.ops import _grid
from compiler.ops._util import size
from compiler.ops.base import Op
from compiler.ops.binding import Ref, Site
from compiler.ops.conv import Window, window_args


def _pool_window(op, x_shape, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode):
    if len(kernel_shape) != len(x_shape) - 2:
        raise CompileError(f"{op}: kernel_shape {tuple(kernel_shape)} does not fit input {tuple(x_shape)}")
    return Window.of(op, x_shape, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode)


def _pool_win(site: Site, x_shape) -> tuple:
    kernel = tuple(site.attr("kernel_shape"))
    if len(kernel) != len(x_shape) - 2:
        raise site.error(f"kernel_shape {kernel} does not fit input {x_shape}")
    attrs = {k: site.attr(k) for k in ("strides", "pads", "dilations", "auto_pad", "ceil_mode")}
    return window_args(site, x_shape, kernel, x_shape[1], 1, **attrs)


class MaxPool(Op):
    """The Y output only (the optional Indices output is not supported)."""
    name = "MaxPool"
    kind = "pool"
    c_call = "ef_max_pool(${y}, ${x}, ${win})"
    cluster = True

    def infer(self, x, *, kernel_shape, strides=None, pads=None, dilations=None, ceil_mode=0, auto_pad="NOTSET",
              storage_order=0):
        win = _pool_window("MaxPool", x, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode)
        return (*x[:2], *win.out_shape)

    def forward(self, x, *, kernel_shape, strides=None, pads=None, dilations=None, ceil_mode=0,
                auto_pad="NOTSET", storage_order=0):
        win = _pool_window("MaxPool", x.shape, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode)
        y = np.empty((*x.shape[:2], *win.out_shape), x.dtype)
        _grid.max_pool(win, win.lift(x), win.lift(y))
        return y

    def forward_into(self, outs, x, *, kernel_shape, strides=None, pads=None, dilations=None, ceil_mode=0,
                     auto_pad="NOTSET", storage_order=0):
        win = _pool_window("MaxPool", x.shape, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode)
        _grid.max_pool(win, win.lift(x), win.lift(outs[0]))

    def gradient(self, g, x, y, dy, **attrs):
        return (g.emit("MaxPoolGrad", [x[0], dy[0]], **attrs),)

    def flops(self, out_shapes, x, *, kernel_shape, **attrs):
        return size(out_shapes[0]) * size(kernel_shape)

    def c_args(self, site: Site):
        x, y = site.input(0), site.outputs[0]
        site.require("float32", x, y)
        site.attr("storage_order")  # only matters for the Indices output, which is not supported
        return dict(y=Ref(y), x=Ref(x), win=_pool_win(site, site.shape(x)))


class MaxPoolGrad(Op):
    """dX from (X, dY): each dy goes to the first maximum of its window; overlapping windows add up."""
    name = "MaxPoolGrad"
    kind = "pool"
    backward_only = True
    c_call = "ef_max_pool_grad(${dx}, ${x}, ${dy}, ${win})"
    cluster = True

    def infer(self, x, dy, **attrs):
        return x

    def forward(self, x, dy, *, kernel_shape, strides=None, pads=None, dilations=None, ceil_mode=0,
                auto_pad="NOTSET", storage_order=0):
        win = _pool_window("MaxPoolGrad", x.shape, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode)
        dx = np.empty_like(x, dtype=dy.dtype)
        _grid.max_pool_grad(win, win.lift(x), win.lift(dy), win.lift(dx))
        return dx

    def forward_into(self, outs, x, dy, *, kernel_shape, strides=None, pads=None, dilations=None, ceil_mode=0,
                     auto_pad="NOTSET", storage_order=0):
        win = _pool_window("MaxPoolGrad", x.shape, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode)
        _grid.max_pool_grad(win, win.lift(x), win.lift(dy), win.lift(outs[0]))

    def flops(self, out_shapes, x, dy, *, kernel_shape, **attrs):
        return 2 * size(dy) * size(kernel_shape)

    def c_args(self, site: Site):
        x, dy, dx = site.input(0), site.input(1), site.outputs[0]
        site.require("float32", x, dy, dx)
        return dict(dx=Ref(dx), x=Ref(x), dy=Ref(dy), win=_pool_win(site, site.shape(x)))


def _divisors(win: Window, count_include_pad: int) -> np.ndarray:
    """(Ho, Wo): how many positions each window averages over. Explicit pads count only with
    count_include_pad; the extra room ceil_mode adds past the pads never counts."""
    (h, w), (top, left, bottom, right) = win.in_hw, win.pads
    mask = np.zeros(win.padded_hw())
    if count_include_pad:
        mask[:h + top + bottom, :w + left + right] = 1
    else:
        mask[top:top + h, left:left + w] = 1
    return sum(win.tap(mask, i, j) for i, j in win.taps())


class AveragePool(Op):
    name = "AveragePool"
    kind = "pool"
    c_call = "ef_average_pool(${y}, ${x}, ${win}, ${count_include_pad})"

    def infer(self, x, *, kernel_shape, strides=None, pads=None, dilations=None, ceil_mode=0,
              count_include_pad=0, auto_pad="NOTSET"):
        win = _pool_window("AveragePool", x, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode)
        return (*x[:2], *win.out_shape)

    def forward(self, x, *, kernel_shape, strides=None, pads=None, dilations=None, ceil_mode=0,
                count_include_pad=0, auto_pad="NOTSET"):
        win = _pool_window("AveragePool", x.shape, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode)
        xp = win.pad(win.lift(x))
        total = sum(win.tap(xp, i, j) for i, j in win.taps())
        return win.unlift((total / _divisors(win, count_include_pad)).astype(x.dtype, copy=False))

    def gradient(self, g, x, y, dy, **attrs):
        return (g.emit("AveragePoolGrad", [dy[0]], shape=g.shape(x[0]), **attrs),)

    def flops(self, out_shapes, x, *, kernel_shape, **attrs):
        return size(out_shapes[0]) * (size(kernel_shape) + 1)

    def c_args(self, site: Site):
        x, y = site.input(0), site.outputs[0]
        site.require("float32", x, y)
        return dict(y=Ref(y), x=Ref(x), win=_pool_win(site, site.shape(x)),
                    count_include_pad=int(site.attr("count_include_pad")))


class AveragePoolGrad(Op):
    """dX from dY: each dy / divisor is spread over the positions its window read."""
    name = "AveragePoolGrad"
    kind = "pool"
    backward_only = True
    c_call = "ef_average_pool_grad(${dx}, ${dy}, ${win}, ${count_include_pad})"

    def infer(self, dy, *, shape, **attrs):
        return tuple(shape)

    def forward(self, dy, *, shape, kernel_shape, strides=None, pads=None, dilations=None, ceil_mode=0,
                count_include_pad=0, auto_pad="NOTSET"):
        win = _pool_window("AveragePoolGrad", shape, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode)
        share = (win.lift(dy) / _divisors(win, count_include_pad)).astype(dy.dtype, copy=False)
        dxp = win.zeros(share.shape, dy.dtype)
        for i, j in win.taps():
            win.tap(dxp, i, j)[...] += share
        return win.unlift(np.ascontiguousarray(win.crop(dxp)))

    def flops(self, out_shapes, dy, *, kernel_shape, **attrs):
        return size(dy) * (size(kernel_shape) + 1)

    def c_args(self, site: Site):
        dy, dx = site.input(0), site.outputs[0]
        site.require("float32", dy, dx)
        return dict(dx=Ref(dx), dy=Ref(dy), win=_pool_win(site, tuple(site.attr("shape"))),
                    count_include_pad=int(site.attr("count_include_pad")))


class GlobalAveragePool(Op):
    """Mean over every spatial axis, kept as size-1 axes: (N, C, ...) -> (N, C, 1, ...)."""
    name = "GlobalAveragePool"
    kind = "pool"
    c_call = "ef_global_average_pool(${y}, ${x}, ${planes}, ${plane_size})"

    def infer(self, x):
        if len(x) < 3:
            raise CompileError(f"GlobalAveragePool: input {tuple(x)} has no spatial axes")
        return (*x[:2], *(1 for _ in x[2:]))

    def forward(self, x):
        return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True).astype(x.dtype, copy=False)

    def gradient(self, g, x, y, dy):
        shape = g.shape(x[0])
        spread = g.emit("Expand", [dy[0]], shape=shape)
        return (g.emit("Mul", [spread, g.const(1.0 / size(shape[2:]), "inv_count", g.dtype(dy[0]))]),)

    def flops(self, out_shapes, x):
        return size(x)

    def c_args(self, site: Site):
        x, y = site.input(0), site.outputs[0]
        site.require("float32", x, y)
        shape = site.shape(x)
        return dict(y=Ref(y), x=Ref(x), planes=size(shape[:2]), plane_size=size(shape[2:]))
