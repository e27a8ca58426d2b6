"""Conv (ONNX semantics, 1-D and 2-D, grouped and depthwise) and its backward ops.

The window geometry (``Window``) is shared with ``pool``. The numpy kernels live in ``_grid``: the padded
input is laid out as contiguous stride phases so that every kernel tap is one long contiguous slice; general
convolutions are im2col + one GEMM per sample and group, depthwise ones a multiply-add per tap, a 1×1 stride-1
convolution a plain matrix product. Measured against PyTorch eager in ``benchmarks/compiler_step.py``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from compiler.ir import CompileError
from compiler.ops import _grid
from compiler.ops._util import size
from compiler.ops.base import Op
from compiler.ops.binding import Ref, Site

AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


def _per_axis(op, name, value, rank, default):
    value = (default,) * rank if value is None else tuple(int(v) for v in value)
    if len(value) != rank:
        raise CompileError(f"{op}: {name} {value} does not fit {rank} spatial dimension(s)")
    return value


def _out_len(op, n, span, stride, begin, end, ceil):
    room = n + begin + end - span
    if room < 0:
        raise CompileError(f"{op}: window of {span} does not fit input of {n} with pads ({begin}, {end})")
    if not ceil:
        return room // stride + 1
    out = -(-room // stride) + 1
    return out - 1 if (out - 1) * stride >= n + begin else out  # no window may start in the end padding


@dataclass(frozen=True)
class Window:
    """Geometry of a 2-D sliding window over (N, C, H, W); a 1-D op runs as 2-D with H = 1 (``lifted``)."""
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right (the ONNX order)
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    lifted: bool

    @classmethod
    def of(cls, op, x_shape, kernel_shape, strides=None, pads=None, dilations=None, auto_pad="NOTSET",
           ceil_mode=0):
        rank = len(x_shape) - 2
        if rank not in (1, 2):
            raise CompileError(f"{op}: only 1-D and 2-D inputs (N, C, ...) are supported, got {tuple(x_shape)}")
        if auto_pad not in AUTO_PADS:
            raise CompileError(f"{op}: unknown auto_pad {auto_pad!r}")
        kernel = _per_axis(op, "kernel_shape", kernel_shape, rank, 1)
        strides = _per_axis(op, "strides", strides, rank, 1)
        dilations = _per_axis(op, "dilations", dilations, rank, 1)
        spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
        sizes = tuple(int(n) for n in x_shape[2:])
        if auto_pad == "NOTSET":
            pads = _per_axis(op, "pads", pads, 2 * rank, 0)
        elif auto_pad == "VALID":
            pads = (0,) * (2 * rank)
        else:  # SAME_*: output = ceil(input / stride); the odd pad goes at the end (UPPER) or the start
            total = [max(0, (-(-n // s) - 1) * s + span - n) for n, s, span in zip(sizes, strides, spans)]
            small = [t // 2 for t in total]
            big = [t - t // 2 for t in total]
            pads = tuple(small + big) if auto_pad == "SAME_UPPER" else tuple(big + small)
        outs = tuple(_out_len(op, n, span, s, pads[a], pads[a + rank], ceil_mode)
                     for a, (n, span, s) in enumerate(zip(sizes, spans, strides)))
        if rank == 1:
            return cls((1, *kernel), (1, *strides), (1, *dilations), (0, pads[0], 0, pads[1]),
                       (1, *sizes), (1, *outs), True)
        return cls(kernel, strides, dilations, pads, sizes, outs, False)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The spatial output shape in the op's own rank."""
        return self.out_hw[1:] if self.lifted else self.out_hw

    def lift(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(*a.shape[:2], 1, a.shape[2]) if self.lifted else a

    def unlift(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(*a.shape[:2], a.shape[3]) if self.lifted else a

    def taps(self):
        return itertools.product(range(self.kernel[0]), range(self.kernel[1]))

    def padded_hw(self) -> tuple[int, int]:
        """Explicit pads plus whatever ceil_mode's last window needs."""
        padded = []
        for axis in (0, 1):
            explicit = self.in_hw[axis] + self.pads[axis] + self.pads[axis + 2]
            span = self.dilations[axis] * (self.kernel[axis] - 1) + 1
            padded.append(max(explicit, (self.out_hw[axis] - 1) * self.strides[axis] + span))
        return tuple(padded)

    def pad(self, x4: np.ndarray, value: float = 0.0) -> np.ndarray:
        (h, w), (hp, wp) = self.in_hw, self.padded_hw()
        top, left = self.pads[:2]
        if (hp, wp) == (h, w):
            return x4
        out = np.full((*x4.shape[:2], hp, wp), value, x4.dtype)
        out[:, :, top:top + h, left:left + w] = x4
        return out

    def zeros(self, x4_shape, dtype) -> np.ndarray:
        return np.zeros((*x4_shape[:2], *self.padded_hw()), dtype)

    def crop(self, padded: np.ndarray) -> np.ndarray:
        """The input region of a padded array (a view)."""
        (h, w), (top, left) = self.in_hw, self.pads[:2]
        return padded[..., top:top + h, left:left + w]

    def tap(self, padded: np.ndarray, i: int, j: int) -> np.ndarray:
        """The (N, C, Ho, Wo) view that kernel offset (i, j) reads: writable, so gradients can add into it."""
        (ho, wo), (sh, sw), (dh, dw) = self.out_hw, self.strides, self.dilations
        return padded[..., i * dh:i * dh + (ho - 1) * sh + 1:sh, j * dw:j * dw + (wo - 1) * sw + 1:sw]


def window_args(site: Site, x_shape, kernel, out_channels: int, group: int, **attrs) -> tuple:
    """The ``ef_window`` struct of the sliding-window kernels (conv and pooling), as a tuple of ints."""
    win = Window.of(site.op, x_shape, kernel, attrs.get("strides"), attrs.get("pads"), attrs.get("dilations"),
                    attrs.get("auto_pad", "NOTSET"), attrs.get("ceil_mode", 0))
    (h, w), (oh, ow) = win.in_hw, win.out_hw
    return (int(x_shape[0]), int(x_shape[1]), h, w, int(out_channels), oh, ow, *win.kernel, *win.strides,
            *win.dilations, win.pads[0], win.pads[1], win.pads[2], win.pads[3], int(group))


def _conv_attrs(site: Site) -> dict:
    return {k: site.attr(k) for k in ("strides", "pads", "dilations", "auto_pad")}


def _conv_dims(op, x, w, group):
    if len(w) != len(x):
        raise CompileError(f"{op}: weight {tuple(w)} and input {tuple(x)} differ in rank")
    if group < 1 or x[1] != w[1] * group or w[0] % group:
        raise CompileError(f"{op}: input {tuple(x)}, weight {tuple(w)} and group={group} do not fit "
                           "(need C = weight[1]·group and weight[0] divisible by group)")


class Conv(Op):
    """Y = conv(X, W) + B with X (N, C, [H,] W), W (M, C/group, [kH,] kW), B (M,)."""
    name = "Conv"
    kind = "conv"
    c_call = "ef_conv(${y}, ${x}, ${w}, ${b}, ${win})"
    redmule = True   # im2col GEMMs (hal/ef_hal_conv.c); grouped convs run the core kernel

    def infer(self, x, w, b=None, *, strides=None, pads=None, dilations=None, group=1, kernel_shape=None,
              auto_pad="NOTSET"):
        _conv_dims("Conv", x, w, group)
        if kernel_shape is not None and tuple(kernel_shape) != tuple(w[2:]):
            raise CompileError(f"Conv: kernel_shape {tuple(kernel_shape)} differs from the weight's {tuple(w)}")
        if b is not None and tuple(b) != (w[0],):
            raise CompileError(f"Conv: bias {tuple(b)} does not match {w[0]} output channels")
        win = Window.of("Conv", x, w[2:], strides, pads, dilations, auto_pad)
        return (x[0], w[0], *win.out_shape)

    def forward(self, x, w, b=None, *, strides=None, pads=None, dilations=None, group=1, kernel_shape=None,
                auto_pad="NOTSET"):
        win = Window.of("Conv", x.shape, w.shape[2:], strides, pads, dilations, auto_pad)
        y = np.empty((x.shape[0], w.shape[0], *win.out_shape), np.result_type(x, w))
        self.forward_into((y,), x, w, b, strides=strides, pads=pads, dilations=dilations, group=group,
                          auto_pad=auto_pad)
        return y

    def forward_into(self, outs, x, w, b=None, *, strides=None, pads=None, dilations=None, group=1,
                     kernel_shape=None, auto_pad="NOTSET"):
        win = Window.of("Conv", x.shape, w.shape[2:], strides, pads, dilations, auto_pad)
        _grid.conv_forward(win, win.lift(x), win.lift(w), group, win.lift(outs[0]), b)

    def gradient(self, g, x, y, dy, *, strides=None, pads=None, dilations=None, group=1, kernel_shape=None,
                 auto_pad="NOTSET"):
        window = dict(strides=strides, pads=pads, dilations=dilations, group=group, auto_pad=auto_pad)
        dx = dw = db = None
        if g.needs(x[0]):
            dx = g.emit("ConvGradInput", [dy[0], x[1]], shape=g.shape(x[0]), **window)
        if g.needs(x[1]):
            dw = _weight_gradient(g, x[0], x[1], dy[0], window)
        if len(x) > 2 and g.needs(x[2]):
            rank = len(g.shape(dy[0]))
            db = g.emit("ReduceSum", [dy[0]], axes=(0, *range(2, rank)), keepdims=0)
        return (dx, dw) if len(x) == 2 else (dx, dw, db)

    def flops(self, out_shapes, x, w, b=None, **attrs):
        return 2 * size(out_shapes[0]) * size(w[1:]) + (size(out_shapes[0]) if b is not None else 0)

    def c_args(self, site: Site):
        x, w, b, y = site.input(0), site.input(1), site.optional(2), site.outputs[0]
        site.require("float32", x, w, b, y)
        wshape = site.shape(w)
        win = window_args(site, site.shape(x), wshape[2:], wshape[0], site.attr("group"), **_conv_attrs(site))
        return dict(y=Ref(y), x=Ref(x), w=Ref(w), b=Ref(b) if b else None, win=win)


def _weight_gradient(g, x, w, dy, window):
    """dW, or with a sparse update of W's first k output channels, dW[:k] from dY[:, :k] (and, for a grouped
    conv, the input channels of the groups those outputs belong to): nothing is computed for frozen channels."""
    kernel = g.shape(w)[2:]
    restricted = g.train_channels(w)
    if restricted is None:
        return g.emit("ConvGradWeight", [x, dy], kernel_shape=kernel, **window)
    k, group = restricted[1], window["group"]
    m, c = g.shape(w)[0], g.shape(x)[1]
    groups = k // (m // group) if group > 1 else 1  # tuning rounds k up to whole groups
    if groups < group:
        x = g.channel_slice(x, 1, groups * (c // group))
    return g.emit("ConvGradWeight", [x, g.channel_slice(dy, 1, k)], kernel_shape=kernel,
                  **{**window, "group": groups})


class ConvGradInput(Op):
    """dX from (dY, W): the transposed convolution, scattered tap by tap into the padded input."""
    name = "ConvGradInput"
    kind = "conv"
    backward_only = True
    c_call = "ef_conv_grad_input(${dx}, ${dy}, ${w}, ${win})"

    def infer(self, dy, w, *, shape, strides=None, pads=None, dilations=None, group=1, auto_pad="NOTSET"):
        _conv_dims("ConvGradInput", shape, w, group)
        return tuple(shape)

    def forward(self, dy, w, *, shape, strides=None, pads=None, dilations=None, group=1, auto_pad="NOTSET"):
        dx = np.empty(shape, np.result_type(dy, w))
        self.forward_into((dx,), dy, w, shape=shape, strides=strides, pads=pads, dilations=dilations, group=group,
                          auto_pad=auto_pad)
        return dx

    def forward_into(self, outs, dy, w, *, shape, strides=None, pads=None, dilations=None, group=1,
                     auto_pad="NOTSET"):
        win = Window.of("ConvGradInput", shape, w.shape[2:], strides, pads, dilations, auto_pad)
        _grid.conv_grad_input(win, win.lift(dy), win.lift(w), group, win.lift(outs[0]))

    def flops(self, out_shapes, dy, w, **attrs):
        return 2 * size(dy) * size(w[1:])

    def c_args(self, site: Site):
        dy, w, dx = site.input(0), site.input(1), site.outputs[0]
        site.require("float32", dy, w, dx)
        wshape = site.shape(w)
        win = window_args(site, tuple(site.attr("shape")), wshape[2:], wshape[0], site.attr("group"),
                          **_conv_attrs(site))
        return dict(dx=Ref(dx), dy=Ref(dy), w=Ref(w), win=win)


class ConvGradWeight(Op):
    """dW from (X, dY): for each tap, the products of dY with the input view that tap read."""
    name = "ConvGradWeight"
    kind = "conv"
    backward_only = True
    c_call = "ef_conv_grad_weight(${dw}, ${x}, ${dy}, ${win})"
    redmule = True   # im2col GEMMs accumulated over the pixel tiles (hal/ef_hal_conv.c)

    def infer(self, x, dy, *, kernel_shape, strides=None, pads=None, dilations=None, group=1,
              auto_pad="NOTSET"):
        if x[1] % group or dy[1] % group:
            raise CompileError(f"ConvGradWeight: channels of {tuple(x)} and {tuple(dy)} not divisible by "
                               f"group={group}")
        return (dy[1], x[1] // group, *kernel_shape)

    def forward(self, x, dy, *, kernel_shape, strides=None, pads=None, dilations=None, group=1,
                auto_pad="NOTSET"):
        dw = np.empty((dy.shape[1], x.shape[1] // group, *kernel_shape), np.result_type(x, dy))
        self.forward_into((dw,), x, dy, kernel_shape=kernel_shape, strides=strides, pads=pads,
                          dilations=dilations, group=group, auto_pad=auto_pad)
        return dw

    def forward_into(self, outs, x, dy, *, kernel_shape, strides=None, pads=None, dilations=None, group=1,
                     auto_pad="NOTSET"):
        win = Window.of("ConvGradWeight", x.shape, kernel_shape, strides, pads, dilations, auto_pad)
        _grid.conv_grad_weight(win, win.lift(x), win.lift(dy), group, win.lift(outs[0]))

    def flops(self, out_shapes, x, dy, **attrs):
        return 2 * size(dy) * size(out_shapes[0][1:])

    def c_args(self, site: Site):
        x, dy, dw = site.input(0), site.input(1), site.outputs[0]
        site.require("float32", x, dy, dw)
        win = window_args(site, site.shape(x), tuple(site.attr("kernel_shape")), site.shape(dy)[1],
                          site.attr("group"), **_conv_attrs(site))
        return dict(dw=Ref(dw), x=Ref(x), dy=Ref(dy), win=win)
