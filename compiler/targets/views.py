"""Every GEMM-like step seen as ``instances`` products Z[M,N] = A[M,K] B[K,N] (+ C) for the tiler.

Tensors are NCHW. A convolution is an im2col GEMM with output channels as rows and pixels (all images)
as columns, one instance per group:

    Conv            Y[Co, P]    = W[Co, Ci*k] . col(X)[Ci*k, P]      (+ bias per row)
    ConvGradInput   dcol[Ci*k, P] = W^T[Ci*k, Co] . dY[Co, P]          (col2im scatter-add into dX)
    ConvGradWeight  dW[Co, Ci*k]  = dY[Co, P] . col(X)^T[P, Ci*k]

(per group: Co, Ci divided by the group count; k = kernel taps; P = N*Ho*Wo). The cores build col(X) in
L1 (im2col) and scatter dcol back (col2im), so those operands carry ``layout_elements``; an operand RedMulE
needs transposed (Gemm transA/transB, W^T) carries transpose work that only the RedMulE path pays, since
the core kernels read with strides. The DMA moves the physical tensor (X, dX), not the col matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from compiler.ops import ops_where
from compiler.ops._util import size
from compiler.ops.conv import Window
from compiler.ops.linear import gemm_dims
from compiler.program import Step, TensorInfo

GEMM_OPS = ops_where(lambda op: op.cost == "gemm")  # MatMul, Gemm, Conv and its gradients


@dataclass(frozen=True)
class Operand:
    name: str
    nbytes: int                 # physical bytes one full pass over the operand moves (all instances)
    level: str                  # "L2" | "L3"
    layout_elements: int = 0    # elements the cores rearrange per full pass (im2col, col2im, transpose)
    layout_for_redmule_only: bool = False  # a transpose: the core GEMM kernels read strided instead


@dataclass(frozen=True)
class Spatial:
    """The im2col operand (or col2im result): how many times its physical bytes move for given tiles."""
    operand: str      # "a", "b" or "z"
    pixel_dim: str    # the GEMM dimension ("m", "n", "k") running over output pixels
    tap_dim: str      # the dimension running over (channel, tap) pairs
    taps: int
    image_pixels: int
    out_w: int
    stride: tuple[int, int]
    span: tuple[int, int]       # dilated kernel extent (h, w)

    def factor(self, tiles: dict[str, int]) -> float:
        """The halo a tile of output pixels drags in (rows of the window above and below it), times the
        re-reads when a tile covers fewer (channel, tap) pairs than one channel's taps: each such tile reads
        the whole window of its channel again."""
        return self.halo(tiles[self.pixel_dim]) * max(1.0, self.taps / tiles[self.tap_dim])

    def halo(self, tile: int) -> float:
        """Input bytes read per output byte when a tile covers ``tile`` consecutive output pixels."""
        if tile >= self.image_pixels:
            return 1.0
        (sh, sw), (span_h, span_w) = self.stride, self.span
        if tile >= self.out_w:
            rows = tile // self.out_w
            return max(1.0, ((rows - 1) * sh + span_h) / (rows * sh))
        return max(1.0, (span_h / sh) * ((tile - 1) * sw + span_w) / (tile * sw))


@dataclass(frozen=True)
class GemmView:
    instances: int
    m: int
    n: int
    k: int
    a: Operand
    b: Operand
    z: Operand
    c: Operand | None = None
    c_axis: str = ""            # "n": a row vector (re-read per row tile), "m": a column, "full": (M, N)
    spatial: Spatial | None = None

    @property
    def macs(self) -> int:
        return self.instances * self.m * self.n * self.k


def _window(op: str, x_shape, w_shape, attrs: Mapping) -> Window:
    return Window.of(op, x_shape, w_shape[2:], attrs.get("strides"), attrs.get("pads"), attrs.get("dilations"),
                     attrs.get("auto_pad", "NOTSET"))


def _needs_im2col(win: Window) -> bool:
    return win.kernel != (1, 1) or win.strides != (1, 1) or any(win.pads)


def gemm_view(step: Step, tensors: Mapping[str, TensorInfo], levels: Mapping[str, str]) -> GemmView:
    info = [tensors[i] for i in step.inputs if i]
    out = tensors[step.outputs[0]]

    def operand(t: TensorInfo, nbytes: int | None = None, layout: int = 0, transpose: bool = False) -> Operand:
        return Operand(t.name, t.nbytes if nbytes is None else nbytes, levels.get(t.name, "L2"), layout, transpose)

    if step.op == "MatMul":
        a, b = info
        k, n = a.shape[-1], b.shape[-1]
        if len(b.shape) == 2:  # a shared weight: fold the batch dimensions into rows
            return GemmView(1, size(a.shape) // k, n, k, operand(a), operand(b), operand(out))
        instances, m = size(out.shape[:-2]), a.shape[-2]
        # a broadcast operand is fetched again for every instance that reads it
        return GemmView(instances, m, n, k, operand(a, instances * m * k * 4), operand(b, instances * k * n * 4),
                        operand(out))
    if step.op == "Gemm":
        a, b = info[:2]
        ta, tb = step.attrs.get("transA", 0), step.attrs.get("transB", 0)
        m, n, k = gemm_dims(a.shape, b.shape, ta, tb)
        view = GemmView(1, m, n, k, operand(a, layout=m * k if ta else 0, transpose=True),
                        operand(b, layout=k * n if tb else 0, transpose=True), operand(out))
        if len(info) > 2:
            c = info[2]
            axis = "full" if size(c.shape) == m * n else ("m" if c.shape and c.shape[-1] == 1 and size(c.shape) == m
                                                           else "n")
            view = GemmView(1, m, n, k, view.a, view.b, view.z, operand(c), axis)
        return view
    groups = int(step.attrs.get("group", 1))
    if step.op == "Conv":
        x, w = info[:2]
        win = _window("Conv", x.shape, w.shape, step.attrs)
    elif step.op == "ConvGradInput":
        dy, w = info
        x = TensorInfo("", tuple(step.attrs["shape"]), out.dtype, out.role)
        win = _window("ConvGradInput", x.shape, w.shape, step.attrs)
    else:  # ConvGradWeight
        x, dy = info
        w = out
        win = _window("ConvGradWeight", x.shape, (0, 0, *step.attrs["kernel_shape"]), step.attrs)
    taps = win.kernel[0] * win.kernel[1]
    pixels = x.shape[0] * win.out_hw[0] * win.out_hw[1]
    c_out, c_in = w.shape[0] // groups, x.shape[1] // groups
    im2col = _needs_im2col(win)
    spans = tuple(d * (k - 1) + 1 for k, d in zip(win.kernel, win.dilations))

    def spatial(which: str, pixel_dim: str, tap_dim: str) -> Spatial | None:
        if not im2col:
            return None
        return Spatial(which, pixel_dim, tap_dim, taps, win.out_hw[0] * win.out_hw[1], win.out_hw[1], win.strides,
                       spans)

    if step.op == "Conv":
        m, n, k = c_out, pixels, c_in * taps
        col = operand(x, layout=groups * k * n if im2col else 0)
        bias = operand(info[2]) if len(info) > 2 else None
        return GemmView(groups, m, n, k, operand(w), col, operand(out), bias, "m" if bias else "",
                        spatial("b", "n", "k"))
    if step.op == "ConvGradInput":
        m, n, k = c_in * taps, pixels, c_out
        return GemmView(groups, m, n, k, operand(w, layout=w.nbytes // 4, transpose=True), operand(dy),
                        operand(out, layout=groups * m * n if im2col else 0), spatial=spatial("z", "n", "m"))
    m, n, k = c_out, c_in * taps, pixels
    return GemmView(groups, m, n, k, operand(dy), operand(x, layout=groups * k * n, transpose=not im2col),
                    operand(out), spatial=spatial("b", "k", "n"))
