"""Sliding-window kernels for the numpy executor: convolution (im2col + GEMM, depthwise direct) and max pooling,
forward and backward. The loops are compiled (``_jit``, numba); the GEMMs are numpy's (BLAS).

Direct kernels (depthwise convolution, max pooling) work one plane (sample, channel) at a time over a *phase
grid*: the padded plane is laid out as ``sh·sw`` contiguous phases — phase (a, b) holds the padded rows a, a+sh, …
and columns b, b+sw, … — each ``Hq × Wq``. A kernel tap (i, j) of a window with stride (sh, sw) then reads ONE
phase at a constant flat offset: output (h, w) reads phase element (h + i·dh//sh, w + j·dw//sw). Every tap is one
contiguous run of length ``Ho·Wq`` per plane: the "wide" output, whose columns ≥ Wo are junk (they read across the
row end) and are never stored; gradients enter wide with zeros there, so the junk never reaches a result. A 1-D
op is the same with H = 1, and stride 1 is one phase.

General convolutions unfold the input exactly (im2col, no junk columns) per block of samples that fits the L2
cache, and multiply with one GEMM per sample and group.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np

from compiler.ops import _jit

_WORKSPACE = threading.local()


def _work(tag: str, shape: tuple[int, ...], dtype, fill=None) -> np.ndarray:
    """A scratch array reused across calls (per thread, tag, shape and dtype): a training step calls the same
    kernels on the same shapes every time, and a buffer that stays mapped and cached beats a fresh one. Never
    returned to the caller of a kernel; ``fill`` initialises it."""
    cache = _WORKSPACE.__dict__.setdefault("arrays", {})
    key = (tag, tuple(int(d) for d in shape), np.dtype(dtype).str)
    buf = cache.get(key)
    if buf is None:
        buf = cache[key] = np.empty(key[1], dtype)
    if fill is not None:
        buf.fill(fill)
    return buf


@dataclass(frozen=True, eq=False)
class Grid:
    """The phase layout of one Window (``compiler.ops.conv.Window``)."""
    sh: int
    sw: int
    hq: int
    wq: int
    ho: int
    wo: int
    top: int
    left: int
    taps: np.ndarray  # (T, 2) int64, per kernel tap (row-major): phase index a·sw + b, flat offset in the phase
    reach: np.ndarray  # (T, 2) int64, per kernel tap: its input row and column offset, i·dh - top and j·dw - left

    @classmethod
    @functools.lru_cache(maxsize=1024)
    def of(cls, win) -> "Grid":
        (sh, sw), (dh, dw), (kh, kw) = win.strides, win.dilations, win.kernel
        (ho, wo), (hp, wp) = win.out_hw, win.padded_hw()
        wq = -(-wp // sw)
        hq = max(-(-hp // sh), ho + (kh - 1) * dh // sh) + 1  # one spare row: the last tap's junk columns
        taps = np.array([(((i * dh) % sh) * sw + (j * dw) % sw, ((i * dh) // sh) * wq + (j * dw) // sw)
                         for i in range(kh) for j in range(kw)], np.int64).reshape(-1, 2)
        reach = np.array([(i * dh - win.pads[0], j * dw - win.pads[1]) for i in range(kh) for j in range(kw)],
                         np.int64).reshape(-1, 2)
        taps.flags.writeable = reach.flags.writeable = False
        return cls(sh, sw, hq, wq, ho, wo, win.pads[0], win.pads[1], taps, reach)

    @property
    def spare(self) -> int:
        """Elements past a plane's phases that the last taps' junk columns read."""
        return int(self.taps[:, 1].max())

    def args(self) -> tuple:
        """The geometry arguments of the ``_jit`` plane kernels."""
        return self.taps, self.sh, self.sw, self.hq, self.wq, self.top, self.left, self.spare


def _pointwise(win) -> bool:
    """A 1×1 window, stride 1, no padding: the convolution is a plain matrix product per sample."""
    return win.kernel == (1, 1) and win.strides == (1, 1) and not any(win.pads) and win.padded_hw() == win.in_hw


def _depthwise(group: int, cg: int) -> bool:
    """One input channel per group (depthwise, with any channel multiplier): the direct kernel."""
    return group > 1 and cg == 1


@dataclass(frozen=True, eq=False)
class Flat:
    """The flat form of a stride-1 window whose output is no wider than its input (``_jit.flat_depthwise_*``, and
    ``_jit.flat_im2col`` / ``flat_col2im`` when it is exactly as wide):
    tap t of output p = oh·W + ow reads the plane, placed at ``lead`` in a zero buffer of ``size``, at
    lead + p + off[t]; ``mask[t, ow]`` is 0 where that read would wrap into the neighbouring row."""
    off: np.ndarray   # (T,) int64
    mask: np.ndarray  # (T, W) uint8: 1 where the read stays in its row
    lead: int
    size: int

    @classmethod
    @functools.lru_cache(maxsize=1024)
    def of(cls, win) -> "Flat | None":
        (h, w), (ho, wo) = win.in_hw, win.out_hw
        if win.strides != (1, 1) or wo > w:
            return None
        (kh, kw), (dh, dw), (top, left) = win.kernel, win.dilations, win.pads[:2]
        off = np.array([(i * dh - top) * w + (j * dw - left) for i in range(kh) for j in range(kw)], np.int64)
        cols = np.arange(w)
        mask = np.array([(cols + j * dw - left >= 0) & (cols + j * dw - left < w)
                         for _ in range(kh) for j in range(kw)], np.uint8)
        lead = max(0, -int(off.min()))
        size = max(lead + h * w, lead + int(off.max()) + ho * w)
        off.flags.writeable = mask.flags.writeable = False
        return cls(off, mask, lead, size)

    def args(self) -> tuple:
        return self.off, self.mask, self.lead, self.size


def _flat_planes(a4: np.ndarray, written: bool = False) -> np.ndarray:
    """(N, C, H, W) -> (N, C, H·W); an output must be contiguous (the executor's tensors and ``forward``'s are)."""
    if written and not a4.flags.c_contiguous:
        raise ValueError("the flat kernels write into contiguous arrays only")
    return np.ascontiguousarray(a4).reshape(*a4.shape[:2], -1)


def _window_args(win) -> tuple:
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = win.kernel, win.strides, win.dilations, win.out_hw
    return kh, kw, sh, sw, dh, dw, win.pads[0], win.pads[1], ho, wo


COLUMN_BLOCK_ELEMENTS = 1 << 18  # im2col per block of samples: about this many elements (1 MiB), so it stays in L2


def _sample_blocks(n: int, per_sample: int):
    step = max(1, COLUMN_BLOCK_ELEMENTS // max(1, per_sample))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _flat_columns(win) -> "Flat | None":
    """The flat form for im2col / col2im: stride 1 and an output exactly as wide as the input (a "same" window),
    so the columns have no junk and each tap's row is one contiguous run."""
    flat = Flat.of(win)
    return flat if flat is not None and win.out_hw[1] == win.in_hw[1] else None


def _columns(win, x4: np.ndarray, block: slice, c0: int, channels: int) -> np.ndarray:
    """im2col of x4[block, c0:c0 + channels]: (B, channels·kh·kw, Ho·Wo), in a reused scratch array."""
    rows = channels * win.kernel[0] * win.kernel[1]
    n = block.stop - block.start
    cols = _work("columns", (n, rows, win.out_hw[0] * win.out_hw[1]), x4.dtype)
    flat = _flat_columns(win)
    if flat is not None:
        _jit.flat_im2col(_flat_planes(x4[block]), cols, c0, *flat.args())
    else:
        _jit.im2col(x4[block], cols, c0, *_window_args(win))
    return cols


def _col2im(win, dcols: np.ndarray, dx4: np.ndarray, c0: int) -> None:
    """dx4[:, c0:c0 + Cb] = the adjoint of ``_columns`` applied to dcols (B, Cb·kh·kw, Ho·Wo)."""
    flat = _flat_columns(win)
    if flat is not None:
        _jit.flat_col2im(dcols, _flat_planes(dx4, True), c0, *flat.args())
    else:
        _jit.col2im(dcols, dx4, c0, *_window_args(win))


def conv_forward(win, x4: np.ndarray, w4: np.ndarray, group: int, out4: np.ndarray, bias=None) -> None:
    """out4 (N, M, Ho, Wo) = conv(x4, w4) (+ bias (M,), added after the products)."""
    n, m, cg = x4.shape[0], w4.shape[0], w4.shape[1]
    mg = m // group
    if _depthwise(group, cg) and Flat.of(win) is not None:  # the bias inside the kernel's pass
        b = np.zeros(m, out4.dtype) if bias is None else bias.reshape(m).astype(out4.dtype, copy=False)
        _jit.flat_depthwise_forward(_flat_planes(x4), w4.reshape(m, -1), b, _flat_planes(out4, True), x4.shape[3],
                                    out4.shape[3], *Flat.of(win).args())
        return
    if _pointwise(win):
        np.matmul(w4.reshape(group, mg, cg), x4.reshape(n, group, cg, -1), out=out4.reshape(n, group, mg, -1))
    elif _depthwise(group, cg):
        _jit.depthwise_forward(x4, w4.reshape(m, -1), out4, *Grid.of(win).args())
    else:
        wg = w4.reshape(group, mg, -1)
        y3 = out4.reshape(n, m, -1)
        for block in _sample_blocks(n, cg * w4.shape[2] * w4.shape[3] * y3.shape[2]):
            for g in range(group):
                np.matmul(wg[g], _columns(win, x4, block, g * cg, cg), out=y3[block, g * mg:(g + 1) * mg])
    if bias is not None:
        out4 += bias.reshape(1, -1, 1, 1)


def conv_grad_input(win, dy4: np.ndarray, w4: np.ndarray, group: int, dx4: np.ndarray) -> None:
    """dx4 (N, C, H, W) = the transposed convolution of dy4 with w4."""
    n, m, cg = dy4.shape[0], w4.shape[0], w4.shape[1]
    mg = m // group
    wg = w4.reshape(group, mg, -1)
    if _pointwise(win):
        np.matmul(wg.swapaxes(1, 2), dy4.reshape(n, group, mg, -1), out=dx4.reshape(n, group, cg, -1))
        return
    if _depthwise(group, cg):
        flat = Flat.of(win)
        if flat is not None:
            _jit.flat_depthwise_grad_input(_flat_planes(dy4), w4.reshape(m, -1), _flat_planes(dx4, True),
                                           dx4.shape[3], dy4.shape[3], *flat.args())
        else:
            _jit.depthwise_grad_input(dy4, w4.reshape(m, -1), dx4, *Grid.of(win).args())
        return
    dy3 = dy4.reshape(n, m, -1)
    for block in _sample_blocks(n, cg * w4.shape[2] * w4.shape[3] * dy3.shape[2]):
        for g in range(group):
            dcols = _work("dcols", (block.stop - block.start, wg.shape[2], dy3.shape[2]), dy4.dtype)
            np.matmul(wg[g].T, dy3[block, g * mg:(g + 1) * mg], out=dcols)
            _col2im(win, dcols, dx4[block], g * cg)


def conv_grad_weight(win, x4: np.ndarray, dy4: np.ndarray, group: int, dw4: np.ndarray) -> None:
    """dw4 (M, C/group, kh, kw) = Σ over samples and positions of dy · the input each tap read."""
    n, c, m = x4.shape[0], x4.shape[1], dy4.shape[1]
    cg, mg = c // group, m // group
    dwg = dw4.reshape(group, mg, -1)
    if _pointwise(win):
        _sum_products(dy4.reshape(n, group, mg, -1), x4.reshape(n, group, cg, -1), dwg)
        return
    if _depthwise(group, cg):
        flat = Flat.of(win)
        if flat is not None:
            _jit.flat_depthwise_grad_weight(_flat_planes(x4), _flat_planes(dy4), dw4.reshape(m, -1), x4.shape[3],
                                            dy4.shape[3], *flat.args())
        else:
            _jit.depthwise_grad_weight(x4, dy4, dw4.reshape(m, -1), *Grid.of(win).args())
        return
    dy3 = dy4.reshape(n, m, -1)
    for i, block in enumerate(_sample_blocks(n, cg * dw4.shape[2] * dw4.shape[3] * dy3.shape[2])):
        for g in range(group):
            _sum_products(dy3[block, g * mg:(g + 1) * mg], _columns(win, x4, block, g * cg, cg), dwg[g],
                          accumulate=i > 0)


def _sum_products(a: np.ndarray, b: np.ndarray, out: np.ndarray, accumulate: bool = False) -> None:
    """out (…, P, Q) (+)= Σ_n a[n] (…, P, L) · b[n]ᵀ (…, L, Q): one GEMM per sample (in one numpy call), the
    products added up in sample order."""
    products = _work("products", (len(a), *out.shape), out.dtype)
    np.matmul(a, b.swapaxes(-1, -2), out=products)
    if accumulate:
        for product in products:
            out += product
    else:
        np.add.reduce(products, axis=0, out=out)


# ---- LoRA on a convolution (compiler/ops/lora_conv.py) -------------------------------------------------------
def _lora_columns(win, x4: np.ndarray) -> np.ndarray:
    """columns (N, C·kh·kw, Ho·Wo): im2col once, for the frozen weight and A alike."""
    if _pointwise(win):
        return x4.reshape(*x4.shape[:2], -1)
    return _columns(win, x4, slice(0, x4.shape[0]), 0, x4.shape[1])


def _by_device(t: np.ndarray, devices: int) -> np.ndarray:
    """(N, ...) -> (D, N/D, ...): device d owns the d-th slice of the samples."""
    return t.reshape(devices, t.shape[0] // devices, *t.shape[1:])


def _lora_merges(cols: np.ndarray, devices: int) -> bool:
    """Whether to fold the adapter into the weight, W_eff = W + scale·B·A (M, C·k) per device: it costs
    M·r·C·k, less than the rank-r maps whenever a device has at least C·k output positions; the layer is then one
    GEMM each way, as a plain convolution."""
    n, ck, length = cols.shape
    return (n // devices) * length >= ck


def _merged_weight(w2, a3, b3, scale: float) -> np.ndarray:
    """(D, M, C·k): W + scale·B·A per device."""
    weff = np.matmul(b3, a3)
    weff *= weff.dtype.type(scale)
    weff += w2
    return weff


def _by_device_matmul(weights: np.ndarray, t: np.ndarray, out: np.ndarray) -> None:
    """out (N, P, L) = weights[d] (P, Q) · t (N, Q, L) for device d's samples; weights (D, P, Q)."""
    devices = weights.shape[0]
    if devices == 1:
        np.matmul(weights[0], t, out=out)
    else:
        np.matmul(weights[:, None], _by_device(t, devices), out=_by_device(out, devices))


def lora_conv_forward(win, x4, w2, a3, b3, scale: float, out4) -> None:
    """out4 = conv(x4, W) + B ⊛ (scale · A ⊛ x4): W (M, C·k), A (D, r, C·k), B (D, M, r) (a 1×1 conv)."""
    devices = a3.shape[0]
    cols = _lora_columns(win, x4)
    y3 = out4.reshape(*out4.shape[:2], -1)
    if _lora_merges(cols, devices):
        _by_device_matmul(_merged_weight(w2, a3, b3, scale), cols, y3)
        return
    np.matmul(w2, cols, out=y3)                                       # (N, M, L)
    s = np.matmul(a3[:, None], _by_device(cols, devices))            # (D, N/D, r, L)
    s *= s.dtype.type(scale)
    _by_device(y3, devices)[...] += np.matmul(b3[:, None], s)


def lora_conv_grad(win, grads: str, dy4, x4, w2, a3, b3, scale: float, outs) -> None:
    """The backward of lora_conv_forward; ``grads`` names ``outs`` in the order x, a, b:
    dS = scale·Bᵀ·dY;  dX = col2im(Wᵀ·dY + Aᵀ·dS) (= col2im(W_effᵀ·dY) when merged);  dA = Σ dS·colsᵀ;
    dB = Σ dY·Sᵀ with S = scale·A·cols."""
    devices = a3.shape[0]
    got = dict(zip(grads, outs))
    cols = _lora_columns(win, x4)
    n, m = dy4.shape[:2]
    dy3 = dy4.reshape(n, m, -1)
    dyd = _by_device(dy3, devices)
    merged = _lora_merges(cols, devices)
    if "a" in got or ("x" in got and not merged):
        ds = np.matmul(b3.swapaxes(1, 2)[:, None], dyd)              # (D, N/D, r, L)
        ds *= ds.dtype.type(scale)
    if "x" in got:
        pointwise = _pointwise(win)
        dcols = got["x"].reshape(cols.shape) if pointwise else \
            _work("dcols", cols.shape, dy4.dtype)                      # (N, C·k, L)
        if merged:
            _by_device_matmul(_merged_weight(w2, a3, b3, scale).swapaxes(1, 2), dy3, dcols)
        else:
            np.matmul(w2.T, dy3, out=dcols)
            _by_device(dcols, devices)[...] += np.matmul(a3.swapaxes(1, 2)[:, None], ds)
        if not pointwise:
            _col2im(win, dcols, got["x"], 0)
    colsd = _by_device(cols, devices)
    if "a" in got:
        da = got["a"].reshape(a3.shape)
        for d in range(devices):
            _sum_products(ds[d], colsd[d], da[d])
    if "b" in got:
        s = np.matmul(a3[:, None], colsd)
        s *= s.dtype.type(scale)
        db = got["b"].reshape(b3.shape)
        for d in range(devices):
            _sum_products(dyd[d], s[d], db[d])


# ---- max pooling -------------------------------------------------------------------------------------------
def max_pool(win, x4: np.ndarray, out4: np.ndarray) -> None:
    _jit.max_pool(x4, out4, *Grid.of(win).args())


def max_pool_grad(win, x4: np.ndarray, dy4: np.ndarray, dx4: np.ndarray) -> None:
    """Each dy goes to the first maximum of its window (PyTorch's tie rule); overlapping windows add up, in
    PyTorch's order."""
    grid = Grid.of(win)
    _jit.max_pool_grad(x4, dy4, dx4, *grid.args(), grid.reach)
