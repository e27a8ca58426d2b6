"""LoRA on a convolution, as PEFT adapts ``nn.Conv1d`` / ``nn.Conv2d``, in one fused step each way:

    y = conv(x, W) (+ bias) + scale · B ⊛ (A ⊛ x)        scale = α/r

A is a convolution with the layer's own kernel, strides, pads and dilations down to r channels, (r, C, [kh,] kw);
B a 1×1 convolution back up, (M, r, 1[, 1]). The input is unfolded once (im2col) and feeds both W and A, and
B's product accumulates onto the frozen one: like ``LoraLinear``, nothing activation-sized is added for the
branch, and the rank-r map A ⊛ x stays inside the step (the backward step recomputes it).

Rule: only ungrouped convolutions (group = 1) take adapters. A depthwise or grouped layer is left as it is: its
weight is C/group·k² per output channel (9 for a 3×3 depthwise), so a rank-r factorisation would not be smaller
than the layer, and PEFT's Conv LoRA is defined for the ungrouped case.

With a device axis, A (D, r, C, …) and B (D, M, r, …): device d owns the d-th of D equal slices of the samples.
"""
from __future__ import annotations

import numpy as np

from compiler.ir import CompileError
from compiler.ops import _grid
from compiler.ops._util import size
from compiler.ops.base import Op
from compiler.ops.binding import Ref, Site
from compiler.ops.conv import Window, _conv_dims, window_args


def lora_conv_dims(x, w, a, b):
    """(rank r, devices D) of a LoRA convolution, after checking that A and B fit x and W."""
    _conv_dims("LoraConv", x, w, 1)
    spatial = len(w) - 2
    per_device = len(a) == len(w) + 1
    if len(a) != len(b) or len(a) not in (len(w), len(w) + 1):
        raise CompileError(f"LoraConv: A {tuple(a)} and B {tuple(b)} must both have W's rank {len(w)}, or both one "
                           "more (per device)")
    devices = a[0] if per_device else 1
    a1, b1 = (a[1:], b[1:]) if per_device else (a, b)
    r = a1[0]
    if tuple(a1[1:]) != tuple(w[1:]) or tuple(b1) != (w[0], r) + (1,) * spatial or (per_device and b[0] != devices):
        raise CompileError(f"LoraConv: A {tuple(a)} / B {tuple(b)} do not fit W {tuple(w)} (A: (r, C, kernel), "
                           "B: (M, r, 1…))")
    if x[0] % devices:
        raise CompileError(f"LoraConv: {x[0]} samples do not split over {devices} devices")
    return r, devices


def _c_common(site: Site, x: str, w: str, a: str, b: str) -> dict:
    """The arguments both C kernels share: the window struct (group 1), rank, devices and scale."""
    try:
        r, devices = lora_conv_dims(site.shape(x), site.shape(w), site.shape(a), site.shape(b))
    except CompileError as exc:
        raise site.error(str(exc)) from None
    wshape = site.shape(w)
    attrs = {k: site.attr(k) for k in ("strides", "pads", "dilations", "auto_pad")}
    return dict(x=Ref(x), w=Ref(w), a=Ref(a), b=Ref(b), win=window_args(site, site.shape(x), wshape[2:], wshape[0], 1,
                                                                         **attrs),
                r=r, devices=devices, scale=float(site.attr("scale")))


def _operands(w, a, b):
    """W (M, C·k), A (D, r, C·k), B (D, M, r) as views."""
    r = b.shape[-1 - (w.ndim - 2)]
    devices = a.shape[0] if a.ndim == w.ndim + 1 else 1
    return w.reshape(w.shape[0], -1), a.reshape(devices, r, -1), b.reshape(devices, w.shape[0], r)


class LoraConv(Op):
    """Conv (group 1) with a LoRA adapter: inputs X, W, A, B[, bias]; the Conv attributes plus ``scale``."""
    name = "LoraConv"
    kind = "conv"
    internal = True      # made by the LoRA rewrite, not imported from ONNX
    cost = "composite"   # compiler/targets/fused_conv.py: the conv GEMMs it runs
    c_call = "ef_lora_conv(${y}, ${x}, ${w}, ${a}, ${b}, ${bias}, ${win}, ${r}, ${devices}, ${scale})"

    def infer(self, x, w, a, b, bias=None, *, scale, strides=None, pads=None, dilations=None, auto_pad="NOTSET"):
        lora_conv_dims(x, w, a, b)
        if bias is not None and tuple(bias) != (w[0],):
            raise CompileError(f"LoraConv: bias {tuple(bias)} does not match {w[0]} output channels")
        win = Window.of("LoraConv", x, w[2:], strides, pads, dilations, auto_pad)
        return (x[0], w[0], *win.out_shape)

    def forward(self, x, w, a, b, bias=None, *, scale, strides=None, pads=None, dilations=None, auto_pad="NOTSET"):
        win = Window.of("LoraConv", x.shape, w.shape[2:], strides, pads, dilations, auto_pad)
        y = np.empty((x.shape[0], w.shape[0], *win.out_shape), np.result_type(x, w))
        self.forward_into((y,), x, w, a, b, bias, scale=scale, strides=strides, pads=pads, dilations=dilations,
                          auto_pad=auto_pad)
        return y

    def forward_into(self, outs, x, w, a, b, bias=None, *, scale, strides=None, pads=None, dilations=None,
                     auto_pad="NOTSET"):
        win = Window.of("LoraConv", x.shape, w.shape[2:], strides, pads, dilations, auto_pad)
        y4 = win.lift(outs[0])
        _grid.lora_conv_forward(win, win.lift(x), *_operands(w, a, b), scale, y4)
        if bias is not None:
            y4 += bias.reshape(1, -1, 1, 1)

    def gradient(self, g, x, y, dy, *, scale, strides=None, pads=None, dilations=None, auto_pad="NOTSET"):
        xs, w, a, b = x[:4]
        window = dict(strides=strides, pads=pads, dilations=dilations, auto_pad=auto_pad)
        grads = "".join(letter for letter, name in zip("xab", (xs, a, b)) if g.needs(name))
        found = dict(zip(grads, g.emit_n("LoraConvGrad", [dy[0], xs, w, a, b], grads=grads, scale=scale,
                                         **window))) if grads else {}
        dw = dbias = None
        if g.needs(w):  # the frozen weight trained as well
            dw = g.emit("ConvGradWeight", [xs, dy[0]], kernel_shape=g.shape(w)[2:], group=1, **window)
        if len(x) > 4 and g.needs(x[4]):
            dbias = g.emit("ReduceSum", [dy[0]], axes=(0, *range(2, len(g.shape(dy[0])))), keepdims=0)
        out = (found.get("x"), dw, found.get("a"), found.get("b"))
        return out if len(x) == 4 else out + (dbias,)

    def flops(self, out_shapes, x, w, a, b, bias=None, **attrs):
        r, _ = lora_conv_dims(x, w, a, b)
        positions = size(out_shapes[0]) // w[0]           # N·Ho·Wo
        k = size(w[1:])                                     # C·kh·kw
        return (2 * positions * k * (w[0] + r) + positions * r + 2 * positions * r * w[0]
                + (size(out_shapes[0]) if bias is not None else 0))

    def c_args(self, site: Site):
        (x, w, a, b), bias, y = (site.input(i) for i in range(4)), site.optional(4), site.outputs[0]
        site.require("float32", x, w, a, b, bias, y)
        return dict(_c_common(site, x, w, a, b), y=Ref(y), bias=Ref(bias) if bias else None)


class LoraConvGrad(Op):
    """The backward of LoraConv in one step; ``grads`` names the outputs, in this order:

           S  = scale·A ⊛ X,  dS = scale·Bᵀ·dY     (rank-r, never leave the step; S is recomputed from X)
        x  dX = convᵀ(dY, W) + convᵀ(dS, A)
        a  dA = Σ dS · im2col(X)ᵀ
        b  dB = Σ dY · Sᵀ
    per device when A and B carry a device axis. X is unfolded once for all of them."""
    name = "LoraConvGrad"
    kind = "conv"
    cost = "composite"
    c_call = ("ef_lora_conv_grad(${dx}, ${da}, ${db}, ${dy}, ${x}, ${w}, ${a}, ${b}, ${win}, ${r}, ${devices}, "
              "${scale})")
    num_outputs = -1
    backward_only = True

    def infer(self, dy, x, w, a, b, *, grads, scale, strides=None, pads=None, dilations=None, auto_pad="NOTSET"):
        lora_conv_dims(x, w, a, b)
        win = Window.of("LoraConvGrad", x, w[2:], strides, pads, dilations, auto_pad)
        if tuple(dy) != (x[0], w[0], *win.out_shape):
            raise CompileError(f"LoraConvGrad: dY {tuple(dy)} does not fit x {tuple(x)} and W {tuple(w)}")
        if not grads or grads != "".join(c for c in "xab" if c in grads):
            raise CompileError(f"LoraConvGrad: grads must be a non-empty ordered subset of 'xab', got {grads!r}")
        return tuple({"x": x, "a": a, "b": b}[c] for c in grads)

    def forward(self, dy, x, w, a, b, *, grads, scale, strides=None, pads=None, dilations=None, auto_pad="NOTSET"):
        outs = tuple(np.empty(t.shape, x.dtype) for t, c in zip((x, a, b), "xab") if c in grads)
        self.forward_into(outs, dy, x, w, a, b, grads=grads, scale=scale, strides=strides, pads=pads,
                          dilations=dilations, auto_pad=auto_pad)
        return outs

    def forward_into(self, outs, dy, x, w, a, b, *, grads, scale, strides=None, pads=None, dilations=None,
                     auto_pad="NOTSET"):
        win = Window.of("LoraConvGrad", x.shape, w.shape[2:], strides, pads, dilations, auto_pad)
        lifted = [win.lift(o) if c == "x" else o for o, c in zip(outs, grads)]
        _grid.lora_conv_grad(win, grads, win.lift(dy), win.lift(x), *_operands(w, a, b), scale, lifted)

    def flops(self, out_shapes, dy, x, w, a, b, *, grads, **attrs):
        r, _ = lora_conv_dims(x, w, a, b)
        positions = size(dy) // w[0]
        k = size(w[1:])
        per = {"x": 2 * positions * k * (w[0] + r), "a": 2 * positions * k * r,
               "b": 2 * positions * k * r + positions * r + 2 * positions * r * w[0]}
        return 2 * positions * w[0] * r + positions * r + sum(per[c] for c in grads)

    def c_args(self, site: Site):
        dy, x, w, a, b = (site.input(i) for i in range(5))
        grads = site.attr("grads")
        if len(grads) != len(site.outputs):
            raise site.error(f"grads={grads!r} names {len(grads)} outputs, the step has {len(site.outputs)}")
        outs = dict(zip(grads, site.outputs))
        site.require("float32", dy, x, w, a, b, *site.outputs)
        return dict(_c_common(site, x, w, a, b), dy=Ref(dy), **{f"d{g}": Ref(outs[g]) if g in outs else None
                                                                  for g in "xab"})
