"""Fast sliding-window kernels for the numpy executor: convolution (im2col + GEMM, depthwise direct) and
max pooling, forward and backward, over a *phase grid*.

numpy is slow on strided views whose innermost run is short (a 5-wide feature map costs a loop iteration every
5 elements). So the padded input is laid out once as ``sh·sw`` contiguous phases — phase (a, b) holds the padded
rows a, a+sh, … and columns b, b+sw, … — each ``Hq × Wq``. A kernel tap (i, j) of a window with stride (sh, sw)
then reads ONE phase at a constant flat offset: output (h, w) reads phase element (h + i·dh//sh, w + j·dw//sw).
Every tap becomes a contiguous slice of length ``Ho·Wq`` per (sample, channel): the "wide" output, whose
columns ≥ Wo are junk (they read across the row end) and are cropped at the end; gradients enter wide with
zeros there, so the junk never reaches a result. A 1-D op is the same with H = 1, and stride 1 is one phase.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

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


@dataclass(frozen=True)
class Grid:
    """The phase layout of one Window (``compiler.ops.conv.Window``)."""
    sh: int
    sw: int
    hq: int
    wq: int
    ho: int
    wo: int
    taps: tuple[tuple[int, int, int], ...]  # per kernel tap (row-major): phase row a, phase column b, flat offset

    @classmethod
    def of(cls, win) -> "Grid":
        (sh, sw), (dh, dw), (kh, kw) = win.strides, win.dilations, win.kernel
        (ho, wo), (hp, wp) = win.out_hw, win.padded_hw()
        wq = -(-wp // sw)
        hq = max(-(-hp // sh), ho + (kh - 1) * dh // sh) + 1  # one spare row: the last tap's junk columns
        taps = tuple(((i * dh) % sh, (j * dw) % sw, ((i * dh) // sh) * wq + (j * dw) // sw)
                     for i in range(kh) for j in range(kw))
        return cls(sh, sw, hq, wq, ho, wo, taps)

    @property
    def length(self) -> int:
        """Wide output elements per (sample, channel): Ho rows of Wq."""
        return self.ho * self.wq

    # ---- layout --------------------------------------------------------------------------------------------
    def _spans(self, win, a: int, b: int):
        """For phase (a, b): the first input row/column it holds, and where that lands in the phase."""
        top, left = win.pads[:2]
        h0, w0 = (a - top) % self.sh, (b - left) % self.sw
        return h0, w0, (h0 + top) // self.sh, (w0 + left) // self.sw

    def phases(self, win, x4: np.ndarray, value: float = 0.0) -> np.ndarray:
        """(sh, sw, N, C, Hq·Wq): the padded input (pad value ``value``) as contiguous phases."""
        n, c, h, w = x4.shape
        ph = _work("phases", (self.sh, self.sw, n, c, self.hq, self.wq), x4.dtype, fill=value)
        for a in range(self.sh):
            for b in range(self.sw):
                h0, w0, r0, c0 = self._spans(win, a, b)
                src = x4[:, :, h0::self.sh, w0::self.sw]
                ph[a, b, :, :, r0:r0 + src.shape[2], c0:c0 + src.shape[3]] = src
        return ph.reshape(self.sh, self.sw, n, c, self.hq * self.wq)

    def gather(self, win, ph: np.ndarray, out4: np.ndarray) -> None:
        """The inverse of ``phases`` on the input region: out4 (N, C, H, W) = the phases' input elements."""
        n, c = out4.shape[:2]
        grid = ph.reshape(self.sh, self.sw, n, c, self.hq, self.wq)
        for a in range(self.sh):
            for b in range(self.sw):
                h0, w0, r0, c0 = self._spans(win, a, b)
                dst = out4[:, :, h0::self.sh, w0::self.sw]
                dst[...] = grid[a, b, :, :, r0:r0 + dst.shape[2], c0:c0 + dst.shape[3]]

    def tap(self, ph: np.ndarray, t: int) -> np.ndarray:
        """(N, C, Ho·Wq): the wide view tap t reads (writable: gradients add into it)."""
        a, b, off = self.taps[t]
        return ph[a, b, :, :, off:off + self.length]

    def widen(self, y4: np.ndarray) -> np.ndarray:
        """(N, C, Ho, Wo) -> (N, C, Ho·Wq) with zeros in the junk columns."""
        if self.wq == self.wo:
            return np.ascontiguousarray(y4).reshape(*y4.shape[:2], self.length)
        wide = _work("widen", (*y4.shape[:2], self.ho, self.wq), y4.dtype, fill=0)
        wide[..., :self.wo] = y4
        return wide.reshape(*y4.shape[:2], self.length)

    def crop(self, wide: np.ndarray) -> np.ndarray:
        """(N, C, Ho·Wq) -> the (N, C, Ho, Wo) view without the junk columns."""
        return wide.reshape(*wide.shape[:2], self.ho, self.wq)[..., :self.wo]

    # ---- channels first, samples end to end: one long row per channel (depthwise kernels) -------------------
    def plane(self) -> int:
        return self.hq * self.wq

    def rows(self, win, x4: np.ndarray) -> np.ndarray:
        """(sh, sw, C, N·Hq·Wq + spare): per phase and channel, the N padded planes end to end, then zeros for
        the last taps' overreach. Tap t of every output of every sample is then one slice of one long row."""
        n, c = x4.shape[:2]
        spare = max(off for _, _, off in self.taps)
        ph = _work("rows", (self.sh, self.sw, c, n * self.plane() + spare), x4.dtype, fill=0)
        grid = ph[..., :n * self.plane()].reshape(self.sh, self.sw, c, n, self.hq, self.wq)
        xc = x4.transpose(1, 0, 2, 3)
        for a in range(self.sh):
            for b in range(self.sw):
                h0, w0, r0, c0 = self._spans(win, a, b)
                src = xc[:, :, h0::self.sh, w0::self.sw]
                grid[a, b, :, :, r0:r0 + src.shape[2], c0:c0 + src.shape[3]] = src
        return ph

    def row_tap(self, ph: np.ndarray, t: int, n: int) -> np.ndarray:
        """(C, N·Hq·Wq): the slice of the long rows tap t reads (writable)."""
        a, b, off = self.taps[t]
        return ph[a, b, :, off:off + n * self.plane()]

    def row_gather(self, win, ph: np.ndarray, out4: np.ndarray) -> None:
        """The inverse of ``rows`` on the input region."""
        n, c = out4.shape[:2]
        grid = ph[..., :n * self.plane()].reshape(self.sh, self.sw, c, n, self.hq, self.wq)
        oc = out4.transpose(1, 0, 2, 3)
        for a in range(self.sh):
            for b in range(self.sw):
                h0, w0, r0, c0 = self._spans(win, a, b)
                dst = oc[:, :, h0::self.sh, w0::self.sw]
                dst[...] = grid[a, b, :, :, r0:r0 + dst.shape[2], c0:c0 + dst.shape[3]]

    def row_outputs(self, wide: np.ndarray, n: int) -> np.ndarray:
        """(C, N·Hq·Wq) long rows of outputs -> the (N, C, Ho, Wo) view of the valid ones."""
        return wide.reshape(-1, n, self.hq, self.wq)[:, :, :self.ho, :self.wo].transpose(1, 0, 2, 3)

    def columns(self, ph: np.ndarray, group: int) -> np.ndarray:
        """im2col, wide: (N, group, C/group·kh·kw, Ho·Wq), channel-major then tap (the weight's order)."""
        n, c = ph.shape[2:4]
        cols = _work("columns", (n, group, c // group, len(self.taps), self.length), ph.dtype)
        for t in range(len(self.taps)):
            cols[:, :, :, t] = self.tap(ph, t).reshape(n, group, c // group, self.length)
        return cols.reshape(n, group, -1, self.length)


def _pointwise(win) -> bool:
    """A 1×1 window, stride 1, no padding: the convolution is a plain matrix product per sample."""
    return win.kernel == (1, 1) and win.strides == (1, 1) and not any(win.pads) and win.padded_hw() == win.in_hw


def _depthwise(group: int, cg: int, mg: int) -> bool:
    return group > 1 and cg == 1 and mg == 1


def conv_forward(win, x4: np.ndarray, w4: np.ndarray, group: int, out4: np.ndarray) -> None:
    """out4 (N, M, Ho, Wo) = conv(x4, w4), no bias."""
    n, m, cg = x4.shape[0], w4.shape[0], w4.shape[1]
    mg = m // group
    if _pointwise(win):
        np.matmul(w4.reshape(group, mg, cg), x4.reshape(n, group, cg, -1), out=out4.reshape(n, group, mg, -1))
        return
    grid = Grid.of(win)
    if _depthwise(group, cg, mg):
        _depthwise_forward(grid, win, x4, w4.reshape(m, -1), out4)
        return
    ph = grid.phases(win, x4)
    wide = _work("conv.wide", (n, group, mg, grid.length), x4.dtype)
    for block in _sample_blocks(grid, n, cg * group):
        np.matmul(w4.reshape(group, mg, -1), grid.columns(ph[:, :, block], group), out=wide[block])
    out4[...] = grid.crop(wide.reshape(n, m, grid.length))


DEPTHWISE_BLOCK_ELEMENTS = 100_000  # channels per block: ~this many elements per row block (three stay in L2)


def _channel_blocks(channels: int, row: int):
    step = max(1, DEPTHWISE_BLOCK_ELEMENTS // max(1, row))
    return (slice(c, min(c + step, channels)) for c in range(0, channels, step))


def _depthwise_forward(grid: Grid, win, x4: np.ndarray, taps: np.ndarray, out4: np.ndarray) -> None:
    """Per tap one multiply-add over (C, N·Hq·Wq): long rows, so numpy's per-row overhead is paid C times, in
    blocks of channels whose rows stay in the L2 cache across the taps (1.8x over whole arrays)."""
    n = x4.shape[0]
    ph = grid.rows(win, x4)
    wide = _work("dw.wide", (x4.shape[1], n * grid.plane()), x4.dtype)
    scratch = _work("dw.scratch", wide.shape, x4.dtype)
    for block in _channel_blocks(wide.shape[0], wide.shape[1]):
        w, s, tb = wide[block], scratch[block], taps[block]
        np.multiply(grid.row_tap(ph, 0, n)[block], tb[:, 0, None], out=w)
        for t in range(1, len(grid.taps)):
            np.multiply(grid.row_tap(ph, t, n)[block], tb[:, t, None], out=s)
            w += s
    out4[...] = grid.row_outputs(wide, n)


def _row_gradient(grid: Grid, dy4: np.ndarray) -> np.ndarray:
    """dY as long rows (C, N·Hq·Wq), zero at the junk positions."""
    n, c = dy4.shape[:2]
    rows = _work("dy.rows", (c, n, grid.hq, grid.wq), dy4.dtype, fill=0)
    rows[:, :, :grid.ho, :grid.wo] = dy4.transpose(1, 0, 2, 3)
    return rows.reshape(c, -1)


def conv_grad_input(win, dy4: np.ndarray, w4: np.ndarray, group: int, dx4: np.ndarray) -> None:
    """dx4 (N, C, H, W) = the transposed convolution of dy4 with w4."""
    n, m, cg = dy4.shape[0], w4.shape[0], w4.shape[1]
    mg = m // group
    wg = w4.reshape(group, mg, -1)
    if _pointwise(win):
        np.matmul(wg.swapaxes(1, 2), dy4.reshape(n, group, mg, -1), out=dx4.reshape(n, group, cg, -1))
        return
    grid = Grid.of(win)
    if _depthwise(group, cg, mg):
        taps = w4.reshape(m, -1)
        dyr = _row_gradient(grid, dy4)
        dph = _work("dx.rows", (grid.sh, grid.sw, m, n * grid.plane() + max(off for _, _, off in grid.taps)),
                    dy4.dtype, fill=0)
        scratch = _work("dw.scratch", dyr.shape, dy4.dtype)
        for block in _channel_blocks(m, dyr.shape[1]):
            d, sc, tb = dyr[block], scratch[block], taps[block]
            for t in range(len(grid.taps)):
                np.multiply(d, tb[:, t, None], out=sc)
                grid.row_tap(dph, t, n)[block] += sc
        grid.row_gather(win, dph, dx4)
        return
    dyw = grid.widen(dy4).reshape(n, group, mg, -1)
    dph = _work("dx.phases", (grid.sh, grid.sw, n, cg * group, grid.hq * grid.wq), dy4.dtype, fill=0)
    for block in _sample_blocks(grid, n, cg * group):
        dcols = np.matmul(wg.swapaxes(1, 2), dyw[block])              # (n, G, Cg·kk, L)
        _scatter_columns(grid, dcols.reshape(len(dcols), group * cg, -1, grid.length), dph[:, :, block])
    grid.gather(win, dph, dx4)


def _scatter_columns(grid: Grid, dcols: np.ndarray, dph: np.ndarray) -> None:
    """col2im, wide: add dcols (N, C, kh·kw, Ho·Wq) into the phases' taps."""
    for t in range(len(grid.taps)):
        grid.tap(dph, t)[...] += dcols[:, :, t]


def conv_grad_weight(win, x4: np.ndarray, dy4: np.ndarray, group: int, dw4: np.ndarray) -> None:
    """dw4 (M, C/group, kh, kw) = Σ over samples and positions of dy · the input each tap read."""
    n, c, m = x4.shape[0], x4.shape[1], dy4.shape[1]
    cg, mg = c // group, m // group
    dwg = dw4.reshape(group, mg, -1)
    if _pointwise(win):
        dyg, xg = dy4.reshape(n, group, mg, -1), x4.reshape(n, group, cg, -1)
        _sum_products(dyg, xg, dwg)
        return
    grid = Grid.of(win)
    if _depthwise(group, cg, mg):
        taps = dw4.reshape(m, -1)
        ph, dyr = grid.rows(win, x4), _row_gradient(grid, dy4)
        for t in range(len(grid.taps)):
            taps[:, t] = np.einsum("cp,cp->c", dyr, grid.row_tap(ph, t, n))
        return
    ph = grid.phases(win, x4)
    dyw = grid.widen(dy4).reshape(n, group, mg, -1)
    for i, block in enumerate(_sample_blocks(grid, n, c)):
        _sum_products(dyw[block], grid.columns(ph[:, :, block], group), dwg, accumulate=i > 0)


def _sum_products(a: np.ndarray, b: np.ndarray, out: np.ndarray, accumulate: bool = False) -> None:
    """out (…, P, Q) (+)= Σ_n a[n] (…, P, L) · b[n]ᵀ (…, L, Q): one GEMM per sample, accumulated."""
    scratch = _work("sum", out.shape, out.dtype) if accumulate or len(a) > 1 else None
    for i in range(len(a)):
        if i == 0 and not accumulate:
            np.matmul(a[0], b[0].swapaxes(-1, -2), out=out)
        else:
            np.matmul(a[i], b[i].swapaxes(-1, -2), out=scratch)
            out += scratch


COLUMN_BLOCK_ELEMENTS = 1 << 18  # im2col per block of samples: about this many elements (1 MiB), so it stays in L2


def _sample_blocks(grid: Grid, n: int, channels: int):
    per_sample = channels * len(grid.taps) * grid.length
    step = max(1, COLUMN_BLOCK_ELEMENTS // max(1, per_sample))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


# ---- LoRA on a convolution (compiler/ops/lora_conv.py) -------------------------------------------------------
def _lora_columns(win, x4: np.ndarray):
    """(grid or None, columns (N, C·kh·kw, L)): im2col once, for the frozen weight and A alike."""
    if _pointwise(win):
        return None, x4.reshape(*x4.shape[:2], -1)
    grid = Grid.of(win)
    return grid, grid.columns(grid.phases(win, x4), 1)[:, 0]


def _by_device(t: np.ndarray, devices: int) -> np.ndarray:
    """(N, ...) -> (D, N/D, ...): device d owns the d-th slice of the samples."""
    return t.reshape(devices, t.shape[0] // devices, *t.shape[1:])


def lora_conv_forward(win, x4, w2, a3, b3, scale: float, out4) -> None:
    """out4 = conv(x4, W) + B ⊛ (scale · A ⊛ x4): W (M, C·k), A (D, r, C·k), B (D, M, r) (a 1×1 conv)."""
    devices = a3.shape[0]
    grid, cols = _lora_columns(win, x4)
    wide = np.matmul(w2, cols)                                        # (N, M, L)
    s = np.matmul(a3[:, None], _by_device(cols, devices))            # (D, N/D, r, L)
    s *= s.dtype.type(scale)
    _by_device(wide, devices)[...] += np.matmul(b3[:, None], s)
    out4[...] = wide.reshape(out4.shape) if grid is None else grid.crop(wide)


def lora_conv_grad(win, grads: str, dy4, x4, w2, a3, b3, scale: float, outs) -> None:
    """The backward of lora_conv_forward; ``grads`` names ``outs`` in the order x, a, b:
    dS = scale·Bᵀ·dY;  dX = col2im(Wᵀ·dY + Aᵀ·dS);  dA = Σ dS·colsᵀ;  dB = Σ dY·Sᵀ with S = scale·A·cols."""
    devices = a3.shape[0]
    got = dict(zip(grads, outs))
    grid, cols = _lora_columns(win, x4)
    n, m = dy4.shape[:2]
    dyw = dy4.reshape(n, m, -1) if grid is None else grid.widen(dy4)
    dyd = _by_device(dyw, devices)
    ds = np.matmul(b3.swapaxes(1, 2)[:, None], dyd)                  # (D, N/D, r, L)
    ds *= ds.dtype.type(scale)
    if "x" in got:
        dcols = np.matmul(w2.T, dyw)                                  # (N, C·k, L)
        _by_device(dcols, devices)[...] += np.matmul(a3.swapaxes(1, 2)[:, None], ds)
        if grid is None:
            got["x"][...] = dcols.reshape(got["x"].shape)
        else:
            dph = _work("dx.phases", (grid.sh, grid.sw, n, x4.shape[1], grid.hq * grid.wq), dy4.dtype, fill=0)
            _scatter_columns(grid, dcols.reshape(n, x4.shape[1], -1, grid.length), dph)
            grid.gather(win, dph, got["x"])
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
    grid = Grid.of(win)
    ph = grid.phases(win, x4, -np.inf)
    wide = grid.tap(ph, 0).copy()
    for t in range(1, len(grid.taps)):
        np.maximum(wide, grid.tap(ph, t), out=wide)
    out4[...] = grid.crop(wide)


def max_pool_grad(win, x4: np.ndarray, dy4: np.ndarray, dx4: np.ndarray) -> None:
    """Each dy goes to the first maximum of its window (PyTorch's tie rule); overlapping windows add up."""
    grid = Grid.of(win)
    ph = grid.phases(win, x4, -np.inf)
    best = grid.tap(ph, 0).copy()
    for t in range(1, len(grid.taps)):
        np.maximum(best, grid.tap(ph, t), out=best)
    dyw = grid.widen(dy4)
    dph = _work("dx.phases", ph.shape, dy4.dtype, fill=0)
    taken = _work("taken", best.shape, bool, fill=False)   # windows whose maximum an earlier tap already claimed
    hit = _work("hit", best.shape, bool)
    scratch = _work("scratch", dyw.shape, dyw.dtype)
    for t in range(len(grid.taps)):
        np.equal(grid.tap(ph, t), best, out=hit)
        if t:
            np.greater(hit, taken, out=hit)   # hit and not taken
        np.logical_or(taken, hit, out=taken)
        np.multiply(dyw, hit, out=scratch)
        grid.tap(dph, t)[...] += scratch
    grid.gather(win, dph, dx4)
