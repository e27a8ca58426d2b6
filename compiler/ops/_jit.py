"""Compiled loops (numba) for the executor's sliding-window kernels: one plane (sample, channel) at a time.

A plane's padded input is laid out as ``sh·sw`` contiguous *phases* (``_grid.Grid``): phase (a, b) holds the
padded rows a, a+sh, … and columns b, b+sw, …, each ``hq × wq``. Kernel tap t then reads one phase at a constant
flat offset, so every tap of every output of the plane is one contiguous run of ``ho·wq`` elements (the "wide"
output, whose columns ≥ wo read across the row end and are never stored): the inner loops are long, unit-stride
and vectorised by LLVM. ``taps`` is an int64 array (T, 2): per tap, the phase index a·sw + b and the flat offset.

Compiled with ``fastmath=False``: no reassociation or contraction, so each result is the same sequence of
float operations a reader would write down (sums in the stated order), and close to PyTorch's at float32.
``cache=True`` keeps the machine code on disk (numba's cache: ``__pycache__`` or ``NUMBA_CACHE_DIR``).
"""
from __future__ import annotations

import numba
import numpy as np

jit = numba.njit(cache=True, fastmath=False, nogil=True, error_model="numpy")
U = numba.uint64  # an unsigned index: no wraparound check, so the loop vectorises


@jit
def _span(a, pad, stride):
    """For phase offset a: the first input row (column) it holds, and where that lands in the phase."""
    first = (a - pad) % stride
    return first, (first + pad) // stride


@jit
def _row_groups(w, sw, left):
    """How a row of w columns splits into column phases: its columns [lo, hi) form whole groups of sw (padded
    column lo + left a multiple of sw), whose first lands at position q0 of each phase; the at most sw - 1
    columns on either side are single."""
    lo = (sw - left % sw) % sw
    hi = lo + ((w - lo) // sw) * sw if w > lo else lo
    return lo, max(hi, lo), (lo + left) // sw


@jit
def _single(pc, sw, step):
    """Where padded column pc lies from its row's start in phase (·, 0): its phase's start + its position."""
    if sw == 2:
        return U(pc & 1) * step + U(pc >> 1)
    return U(pc % sw) * step + U(pc // sw)


@jit
def _fill_phases(src, ph, sh, sw, hq, wq, top, left, fill):
    """ph (sh·sw·hq·wq + spare,) = the 2-D plane ``src`` padded (value ``fill``) and split into phases: input
    element (r, c) goes to phase ((r + top) % sh, (c + left) % sw), row (r + top) // sh, column (c + left) // sw.
    A row is read in whole groups of sw columns, one element to each column phase (``_row_groups``), so a stride-2
    row is one pass of interleaved loads. Indices are unsigned (``U``) here and below: numba then drops its
    negative-index wraparound, which would otherwise keep LLVM from vectorising the loops."""
    ph[:] = fill
    h, w = src.shape
    step = U(hq * wq)  # phase (a, b) → (a, b + 1)
    lo, hi, q0 = _row_groups(w, sw, left)
    groups = U((hi - lo) // sw)
    for a in range(sh):
        h0, r0 = _span(a, top, sh)
        base = U((a * sw * hq + r0) * wq)  # phase (a, 0), the row that input row h0 lands in
        for r in range(h0, h, sh):
            row = src[r]
            for c in range(lo):
                ph[base + _single(c + left, sw, step)] = row[c]
            for c in range(hi, w):
                ph[base + _single(c + left, sw, step)] = row[c]
            first, at = U(lo), base + U(q0)
            if sw == 1:
                for q in range(groups):
                    ph[at + q] = row[first + q]
            elif sw == 2:
                for q in range(groups):
                    ph[at + q] = row[first + U(2) * q]
                    ph[at + step + q] = row[first + U(2) * q + U(1)]
            else:
                for b in range(U(sw)):
                    for q in range(groups):
                        ph[at + b * step + q] = row[first + b + U(sw) * q]
            base += U(wq)


@jit
def _gather_phases(ph, dst, sh, sw, hq, wq, top, left):
    """The inverse of ``_fill_phases`` on the input region: dst (h, w) = the phases' input elements."""
    h, w = dst.shape
    step = U(hq * wq)
    lo, hi, q0 = _row_groups(w, sw, left)
    groups = U((hi - lo) // sw)
    for a in range(sh):
        h0, r0 = _span(a, top, sh)
        base = U((a * sw * hq + r0) * wq)
        for r in range(h0, h, sh):
            row = dst[r]
            for c in range(lo):
                row[c] = ph[base + _single(c + left, sw, step)]
            for c in range(hi, w):
                row[c] = ph[base + _single(c + left, sw, step)]
            first, at = U(lo), base + U(q0)
            if sw == 1:
                for q in range(groups):
                    row[first + q] = ph[at + q]
            elif sw == 2:
                for q in range(groups):
                    row[first + U(2) * q] = ph[at + q]
                    row[first + U(2) * q + U(1)] = ph[at + step + q]
            else:
                for b in range(U(sw)):
                    for q in range(groups):
                        row[first + b + U(sw) * q] = ph[at + b * step + q]
            base += U(wq)


@jit
def _widen(src, wide, wq):
    """wide (ho·wq,) = the plane src (ho, wo) with zeros in the junk columns."""
    ho, wo = src.shape
    wide[:] = 0.0
    for r in range(ho):
        dst = wide[r * wq:r * wq + wo]
        row = src[r]
        for c in range(wo):
            dst[c] = row[c]


@jit
def _crop(wide, dst, wq):
    """dst (ho, wo) = the valid columns of the wide plane."""
    ho, wo = dst.shape
    for r in range(ho):
        src = wide[r * wq:r * wq + wo]
        row = dst[r]
        for c in range(wo):
            row[c] = src[c]


@jit
def _tap(ph, taps, t, hq, wq, length):
    """The run of ``length`` phase elements tap t reads (a view; writable)."""
    base = taps[t, 0] * hq * wq + taps[t, 1]
    return ph[base:base + length]


# ---- depthwise convolution (group = C, M = C·multiplier) ---------------------------------------------------
@jit
def depthwise_forward(x, w, y, taps, sh, sw, hq, wq, top, left, spare):
    """y (N, M, ho, wo) = the depthwise convolution of x (N, C, H, W) with w (M, T) (M = C·mult), no bias:
    per output, the taps' products summed in tap order."""
    n_, c_ = x.shape[0], x.shape[1]
    m_, t_ = w.shape
    ho = y.shape[2]
    mult = m_ // c_
    length = ho * wq
    ph = np.empty(sh * sw * hq * wq + spare, x.dtype)
    wide = np.empty(length, x.dtype)
    for n in range(n_):
        for c in range(c_):
            _fill_phases(x[n, c], ph, sh, sw, hq, wq, top, left, 0.0)
            for k in range(mult):
                m = c * mult + k
                src = _tap(ph, taps, 0, hq, wq, length)
                wt = w[m, 0]
                for p in range(length):
                    wide[p] = wt * src[p]
                for t in range(1, t_):
                    src = _tap(ph, taps, t, hq, wq, length)
                    wt = w[m, t]
                    for p in range(length):
                        wide[p] += wt * src[p]
                _crop(wide, y[n, m], wq)


@jit
def depthwise_grad_input(dy, w, dx, taps, sh, sw, hq, wq, top, left, spare):
    """dx (N, C, H, W) = the transposed depthwise convolution of dy (N, M, ho, wo) with w (M, T)."""
    n_, c_ = dx.shape[0], dx.shape[1]
    m_, t_ = w.shape
    ho = dy.shape[2]
    mult = m_ // c_
    length = ho * wq
    dph = np.empty(sh * sw * hq * wq + spare, dx.dtype)
    dyw = np.empty(length, dx.dtype)
    for n in range(n_):
        for c in range(c_):
            dph[:] = 0.0
            for k in range(mult):
                m = c * mult + k
                _widen(dy[n, m], dyw, wq)
                for t in range(t_):
                    dst = _tap(dph, taps, t, hq, wq, length)
                    wt = w[m, t]
                    for p in range(length):
                        dst[p] += wt * dyw[p]
            _gather_phases(dph, dx[n, c], sh, sw, hq, wq, top, left)


@jit
def depthwise_grad_weight(x, dy, dw, taps, sh, sw, hq, wq, top, left, spare):
    """dw (M, T) = Σ over samples and outputs of dy · the input tap t read. Per tap, the products are summed
    over samples position by position, then over positions in float64."""
    n_, c_ = x.shape[0], x.shape[1]
    m_, t_ = dw.shape
    ho = dy.shape[2]
    mult = m_ // c_
    length = ho * wq
    ph = np.empty(sh * sw * hq * wq + spare, x.dtype)
    dyw = np.empty(length, x.dtype)
    part = np.empty((mult, t_, length), x.dtype)
    for c in range(c_):
        part[:] = 0.0
        for n in range(n_):
            _fill_phases(x[n, c], ph, sh, sw, hq, wq, top, left, 0.0)
            for k in range(mult):
                _widen(dy[n, c * mult + k], dyw, wq)
                for t in range(t_):
                    src = _tap(ph, taps, t, hq, wq, length)
                    acc = part[k, t]
                    for p in range(length):
                        acc[p] += dyw[p] * src[p]
        for k in range(mult):
            for t in range(t_):
                acc = part[k, t]
                total = 0.0
                for p in range(length):
                    total += np.float64(acc[p])
                dw[c * mult + k, t] = total


# ---- max pooling -----------------------------------------------------------------------------------------
@jit
def max_pool(x, y, taps, sh, sw, hq, wq, top, left, spare):
    """y = the maximum over each window (padding is -inf); NaN propagates as in np.maximum."""
    n_, c_ = x.shape[0], x.shape[1]
    ho = y.shape[2]
    t_ = taps.shape[0]
    length = ho * wq
    ph = np.empty(sh * sw * hq * wq + spare, x.dtype)
    best = np.empty(length, x.dtype)
    for n in range(n_):
        for c in range(c_):
            _fill_phases(x[n, c], ph, sh, sw, hq, wq, top, left, -np.inf)
            src = _tap(ph, taps, 0, hq, wq, length)
            for p in range(length):
                best[p] = src[p]
            for t in range(1, t_):
                src = _tap(ph, taps, t, hq, wq, length)
                for p in range(length):
                    v = src[p]
                    b = best[p]
                    best[p] = v if (v > b or v != v) else b
            _crop(best, y[n, c], wq)


@jit
def max_pool_grad(x, dy, dx, taps, sh, sw, hq, wq, top, left, spare, reach):
    """Each dy goes to the first maximum of its window (PyTorch's tie rule), added into dx output by output in
    row-major order, as PyTorch's backward does: the window's argmax over the taps runs on the phase grid, then
    one scalar pass adds dy at the input position the winning tap read (``reach`` (T, 2): its row and column
    offset from the window's corner, i·dh - top and j·dw - left); a winner in the padding is dropped."""
    n_, c_ = x.shape[0], x.shape[1]
    h, w = x.shape[2], x.shape[3]
    ho, wo = dy.shape[2], dy.shape[3]
    t_ = taps.shape[0]
    length = ho * wq
    ph = np.empty(sh * sw * hq * wq + spare, x.dtype)
    best = np.empty(length, x.dtype)
    arg = np.empty(length, np.int64)
    for n in range(n_):
        for c in range(c_):
            _fill_phases(x[n, c], ph, sh, sw, hq, wq, top, left, -np.inf)
            src = _tap(ph, taps, 0, hq, wq, length)
            for p in range(length):
                best[p] = src[p]
                arg[p] = 0
            for t in range(1, t_):
                src = _tap(ph, taps, t, hq, wq, length)
                for p in range(length):
                    v = src[p]
                    better = v > best[p]
                    best[p] = v if better else best[p]
                    arg[p] = t if better else arg[p]
            plane, g = dx[n, c], dy[n, c]
            plane[:] = 0.0
            for oh in range(ho):
                for ow in range(wo):
                    t = arg[oh * wq + ow]
                    r, q = oh * sh + reach[t, 0], ow * sw + reach[t, 1]
                    if r >= 0 and r < h and q >= 0 and q < w:
                        plane[r, q] += g[oh, ow]


# ---- im2col / col2im for the GEMM convolutions -------------------------------------------------------------
@jit
def im2col(x, cols, c0, kh, kw, sh, sw, dh, dw, top, left, ho, wo):
    """cols (B, Cb·kh·kw, ho·wo) = the windows of x[:, c0:c0 + Cb] (B, C, H, W), channel-major then tap (the
    weight's order), zeros where a window reads padding. No junk columns."""
    b_, rows = cols.shape[0], cols.shape[1]
    h, w = x.shape[2], x.shape[3]
    cb = rows // (kh * kw)
    for n in range(b_):
        for ci in range(cb):
            for i in range(kh):
                for j in range(kw):
                    row = (ci * kh + i) * kw + j
                    r0, q0 = i * dh - top, j * dw - left
                    lo, hi = _valid(q0, sw, w, wo)
                    first, count = U(q0 + lo * sw) if hi > lo else U(0), U(max(hi - lo, 0))
                    for oh in range(ho):
                        r = r0 + oh * sh
                        out = U(oh * wo)
                        if r < 0 or r >= h:
                            for q in range(U(wo)):
                                cols[n, row, out + q] = 0.0
                            continue
                        for q in range(U(lo)):
                            cols[n, row, out + q] = 0.0
                        dst, ru, c = out + U(lo), U(r), c0 + ci
                        if sw == 1:
                            for q in range(count):
                                cols[n, row, dst + q] = x[n, c, ru, first + q]
                        elif sw == 2:
                            for q in range(count):
                                cols[n, row, dst + q] = x[n, c, ru, first + U(2) * q]
                        else:
                            for q in range(count):
                                cols[n, row, dst + q] = x[n, c, ru, first + U(sw) * q]
                        for q in range(U(max(lo, hi)), U(wo)):
                            cols[n, row, out + q] = 0.0


@jit
def col2im(cols, dx, c0, kh, kw, sh, sw, dh, dw, top, left, ho, wo):
    """The adjoint of ``im2col``: dx[:, c0:c0 + Cb] (B, C, H, W) = the column gradients added up where windows
    overlap (taps in order); padding positions are dropped."""
    b_, rows = cols.shape[0], cols.shape[1]
    h, w = dx.shape[2], dx.shape[3]
    cb = rows // (kh * kw)
    for n in range(b_):
        for ci in range(cb):
            c = c0 + ci
            dx[n, c] = 0.0
            for i in range(kh):
                for j in range(kw):
                    row = (ci * kh + i) * kw + j
                    r0, q0 = i * dh - top, j * dw - left
                    lo, hi = _valid(q0, sw, w, wo)
                    if hi <= lo:
                        continue
                    first, count = U(q0 + lo * sw), U(hi - lo)
                    for oh in range(ho):
                        r = r0 + oh * sh
                        if r < 0 or r >= h:
                            continue
                        src, ru = U(oh * wo + lo), U(r)
                        if sw == 1:
                            for q in range(count):
                                dx[n, c, ru, first + q] += cols[n, row, src + q]
                        elif sw == 2:
                            for q in range(count):
                                dx[n, c, ru, first + U(2) * q] += cols[n, row, src + q]
                        else:
                            for q in range(count):
                                dx[n, c, ru, first + U(sw) * q] += cols[n, row, src + q]


@jit
def _valid(q0, sw, w, wo):
    """[lo, hi): the outputs q whose column q0 + q·sw lies in [0, w)."""
    lo = 0 if q0 >= 0 else (-q0 + sw - 1) // sw
    hi = (w - 1 - q0) // sw + 1 if w - 1 - q0 >= 0 else 0
    return min(lo, wo), min(hi, wo)


# ---- LayerNormalization over rows (R, D) -------------------------------------------------------------------
# Sums run in the input's dtype, in eight interleaved partial sums (j mod 8) added pairwise at the end, as
# numpy's own SIMD reductions do; the reciprocal square root is taken in float64.
@jit
def _sum8(v, zero):
    """Σ v: eight running sums over j ≡ 0..7 (mod 8), added pairwise, then the tail in order."""
    d = v.shape[0]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
    j = 0
    while j + 8 <= d:
        a0 += v[j]
        a1 += v[j + 1]
        a2 += v[j + 2]
        a3 += v[j + 3]
        a4 += v[j + 4]
        a5 += v[j + 5]
        a6 += v[j + 6]
        a7 += v[j + 7]
        j += 8
    total = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    while j < d:
        total += v[j]
        j += 1
    return total


@jit
def _dot8(u, v, zero):
    """Σ u·v, summed like ``_sum8``."""
    d = u.shape[0]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
    j = 0
    while j + 8 <= d:
        a0 += u[j] * v[j]
        a1 += u[j + 1] * v[j + 1]
        a2 += u[j + 2] * v[j + 2]
        a3 += u[j + 3] * v[j + 3]
        a4 += u[j + 4] * v[j + 4]
        a5 += u[j + 5] * v[j + 5]
        a6 += u[j + 6] * v[j + 6]
        a7 += u[j + 7] * v[j + 7]
        j += 8
    total = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    while j < d:
        total += u[j] * v[j]
        j += 1
    return total


@jit
def _standardize(row, xh, epsilon, zero, stat):
    """xh = row - mean; returns 1/sqrt(var + epsilon) (square root in float64), both in xh's dtype (the
    one-element ``stat`` array casts: numba would otherwise promote float32 / int to float64)."""
    d = row.shape[0]
    stat[0] = _sum8(row, zero) / d
    mean = stat[0]
    for j in range(d):
        xh[j] = row[j] - mean
    stat[0] = 1.0 / np.sqrt(np.float64(_dot8(xh, xh, zero)) / d + epsilon)
    return stat[0]


@jit
def layer_norm(x2, scale, bias, y2, epsilon, zero):
    """y2 = (x2 - mean) · rstd · scale + bias per row; scale and bias (D,)."""
    xh = np.empty(x2.shape[1], y2.dtype)
    stat = np.empty(1, y2.dtype)
    for i in range(x2.shape[0]):
        out = y2[i]
        rstd = _standardize(x2[i], xh, epsilon, zero, stat)
        for j in range(xh.shape[0]):
            out[j] = xh[j] * rstd * scale[j] + bias[j]


@jit
def layer_norm_grad_input(x2, scale, dy2, dx2, epsilon, zero):
    """dx = rstd · (ĝ - mean(ĝ) - x̂ · mean(ĝ · x̂)) with ĝ = dy · scale, x̂ = (x - mean) · rstd, per row."""
    d = x2.shape[1]
    xh = np.empty(d, dx2.dtype)
    gh = np.empty(d, dx2.dtype)
    stat = np.empty(3, dx2.dtype)
    for i in range(x2.shape[0]):
        g, out = dy2[i], dx2[i]
        rstd = _standardize(x2[i], xh, epsilon, zero, stat)
        for j in range(d):
            xh[j] *= rstd
            gh[j] = g[j] * scale[j]
        stat[1] = _sum8(gh, zero) / d
        stat[2] = _dot8(gh, xh, zero) / d
        mg, mgx = stat[1], stat[2]
        for j in range(d):
            out[j] = (gh[j] - mg - xh[j] * mgx) * rstd


@jit
def layer_norm_grad_scale(x2, dy2, ds, epsilon, zero):
    """ds (D,) = Σ over rows of dy · x̂, accumulated per column in float64."""
    d = x2.shape[1]
    acc = np.zeros(d, np.float64)
    xh = np.empty(d, ds.dtype)
    stat = np.empty(1, ds.dtype)
    for i in range(x2.shape[0]):
        g = dy2[i]
        rstd = _standardize(x2[i], xh, epsilon, zero, stat)
        for j in range(d):
            acc[j] += g[j] * (xh[j] * rstd)
    for j in range(d):
        ds[j] = acc[j]


# ---- depthwise convolution, stride 1, output no wider than the input: the "flat" form ---------------------
# A plane is used as one flat run of H·W elements at offset ``lead`` in a zero buffer; output p = oh·W + ow (row
# width W, the input's) reads the buffer at lead + p + off[t], off[t] = (i·dh - top)·W + (j·dw - left). Rows
# outside the input read the zeros around the plane; a column outside it would wrap into the neighbouring row, so
# there tap t's weight counts as w·0 (``keep[t, p]`` false: mask[t, ow] = 0). Forward and input gradient stack a
# block of samples' planes ``stride`` apart (zeros between them) and run each tap as ONE contiguous multiply-add
# over the whole block: long unit-stride loops instead of one short loop per plane. Every output is the same sum,
# in the same order, as one plane at a time.
SAMPLE_BLOCK = 8  # planes stacked per run: 8 of ds-cnn's 25×5 planes keep the buffers in L1


@jit
def _stack_keep(mask, ho, stride, block):
    """keep (T, block·stride): mask[t, ow] at p = oh·W + ow of each stacked plane, False in the gaps."""
    t_, width = mask.shape
    keep = np.zeros((t_, block * stride), np.bool_)
    for t in range(t_):
        for b in range(block):
            for r in range(ho):
                at = b * stride + r * width
                _copy(mask[t], keep[t, at:at + width])
    return keep


@jit
def _stride(lead, size, hw):
    """Plane spacing in a stack: room for the reads before (lead) and after the plane (``size`` - lead)."""
    return max(size - lead, hw + lead)


@jit
def _copy(src, dst):
    for q in range(src.shape[0]):
        dst[q] = src[q]


@jit
def _load_wide(src, wide, width, wo):
    """wide (ho·width,) = the flat plane src (ho·wo,) with zeros in columns ≥ wo."""
    if wo == width:
        _copy(src, wide)
        return
    for r in range(src.shape[0] // wo):
        _copy(src[r * wo:(r + 1) * wo], wide[r * width:r * width + wo])
        wide[r * width + wo:(r + 1) * width] = 0.0


@jit
def _store_wide(wide, dst, width, wo):
    """The flat plane dst (ho·wo,) = the columns < wo of wide."""
    if wo == width:
        _copy(wide[:dst.shape[0]], dst)
        return
    for r in range(dst.shape[0] // wo):
        _copy(wide[r * width:r * width + wo], dst[r * wo:(r + 1) * wo])


@jit
def flat_depthwise_forward(x, w, bias, y, width, wo, off, mask, lead, size):
    """x (N, C, H·W), y (N, M, Ho·Wo) flat planes; see above. The bias (M,) is added after the taps."""
    n_, c_, hw = x.shape
    m_, t_ = w.shape
    mult = m_ // c_
    ho = y.shape[2] // wo
    length = ho * width
    stride = _stride(lead, size, hw)
    block = min(SAMPLE_BLOCK, n_)
    keep = _stack_keep(mask, ho, stride, block)
    buf = np.zeros(lead + (block + 1) * stride, x.dtype)
    acc = np.empty(block * stride, x.dtype)
    zero = acc[:0].sum()
    for c in range(c_):
        for n0 in range(0, n_, block):
            nb = min(block, n_ - n0)
            run = nb * stride
            for b in range(nb):
                _copy(x[n0 + b, c], buf[lead + b * stride:lead + b * stride + hw])
            for k in range(mult):
                m = c * mult + k
                for t in range(t_):
                    src = buf[lead + off[t]:lead + off[t] + run]
                    wt = w[m, t]
                    wz = wt * zero
                    kt = keep[t]
                    if t == 0:
                        for p in range(run):
                            acc[p] = (wt if kt[p] else wz) * src[p]
                    else:
                        for p in range(run):
                            acc[p] += (wt if kt[p] else wz) * src[p]
                bm = bias[m]
                for p in range(run):
                    acc[p] += bm
                for b in range(nb):
                    _store_wide(acc[b * stride:b * stride + length], y[n0 + b, m], width, wo)


@jit
def flat_depthwise_grad_input(dy, w, dx, width, wo, off, mask, lead, size):
    """dy (N, M, Ho·Wo), dx (N, C, H·W) flat planes."""
    n_, c_, hw = dx.shape
    m_, t_ = w.shape
    mult = m_ // c_
    ho = dy.shape[2] // wo
    length = ho * width
    stride = _stride(lead, size, hw)
    block = min(SAMPLE_BLOCK, n_)
    keep = _stack_keep(mask, ho, stride, block)
    buf = np.empty(lead + (block + 1) * stride, dx.dtype)
    dyw = np.zeros(block * stride, dx.dtype)  # the gaps stay zero
    zero = dyw[:0].sum()
    for c in range(c_):
        for n0 in range(0, n_, block):
            nb = min(block, n_ - n0)
            run = nb * stride
            buf[:] = 0.0
            for k in range(mult):
                m = c * mult + k
                for b in range(nb):
                    _load_wide(dy[n0 + b, m], dyw[b * stride:b * stride + length], width, wo)
                for t in range(t_):
                    dst = buf[lead + off[t]:lead + off[t] + run]
                    wt = w[m, t]
                    wz = wt * zero
                    kt = keep[t]
                    for p in range(run):
                        dst[p] += (wt if kt[p] else wz) * dyw[p]
            for b in range(nb):
                _copy(buf[lead + b * stride:lead + b * stride + hw], dx[n0 + b, c])


@jit
def flat_depthwise_grad_weight(x, dy, dw, width, wo, off, mask, lead, size):
    """Per tap, the products dy · input summed over samples position by position, then the positions inside
    the input (mask) summed in float64. x (N, C, H·W), dy (N, M, Ho·Wo) flat planes."""
    n_, c_, hw = x.shape
    m_, t_ = dw.shape
    mult = m_ // c_
    ho = dy.shape[2] // wo
    length = ho * width
    buf = np.zeros(size, x.dtype)
    dyw = np.empty(length, x.dtype)
    part = np.empty((mult, t_, length), x.dtype)
    for c in range(c_):
        part[:] = 0.0
        for n in range(n_):
            _copy(x[n, c], buf[lead:lead + hw])
            for k in range(mult):
                _load_wide(dy[n, c * mult + k], dyw, width, wo)
                for t in range(t_):
                    src = buf[lead + off[t]:lead + off[t] + length]
                    acc = part[k, t]
                    for p in range(length):
                        acc[p] += dyw[p] * src[p]
        for k in range(mult):
            for t in range(t_):
                acc = part[k, t]
                mk = mask[t]
                total = 0.0
                for r in range(ho):
                    for q in range(width):
                        if mk[q]:
                            total += np.float64(acc[r * width + q])
                dw[c * mult + k, t] = total


# ---- im2col / col2im in the flat form: stride 1, output exactly as wide as the input ------------------------
# Tap t's column row is the plane (at ``lead`` in a zero buffer) read at lead + off[t] + p, one contiguous run of
# H·W, with zeros where ``mask`` says the read wrapped into the neighbouring row: no loop per output row.
@jit
def flat_im2col(x, cols, c0, off, mask, lead, size):
    """cols (B, Cb·T, Ho·W) = ``im2col``'s columns of x[:, c0:c0 + Cb], x (B, C, H·W) flat planes."""
    b_, rows, length = cols.shape
    t_, width = mask.shape
    hw = x.shape[2]
    keep = _stack_keep(mask, length // width, length, 1)
    buf = np.zeros(size, x.dtype)
    zero = buf[:0].sum()
    for n in range(b_):
        for ci in range(rows // t_):
            _copy(x[n, c0 + ci], buf[lead:lead + hw])
            for t in range(t_):
                src = buf[lead + off[t]:lead + off[t] + length]
                dst = cols[n, ci * t_ + t]
                k = keep[t]
                for p in range(length):
                    dst[p] = src[p] if k[p] else zero


@jit
def flat_col2im(cols, dx, c0, off, mask, lead, size):
    """The adjoint of ``flat_im2col``, added up per element in tap order from zero as ``col2im`` does:
    dx[:, c0:c0 + Cb] (B, C, H·W) flat planes."""
    b_, rows, length = cols.shape
    t_, width = mask.shape
    hw = dx.shape[2]
    keep = _stack_keep(mask, length // width, length, 1)
    buf = np.empty(size, dx.dtype)
    for n in range(b_):
        for ci in range(rows // t_):
            buf[:] = 0.0
            for t in range(t_):
                dst = buf[lead + off[t]:lead + off[t] + length]
                src = cols[n, ci * t_ + t]
                k = keep[t]
                for p in range(length):
                    dst[p] = dst[p] + src[p] if k[p] else dst[p]
            _copy(buf[lead:lead + hw], dx[n, c0 + ci])


# ---- GELU in float32: the Abramowitz–Stegun erf (compiler/ops/elementwise.py), float32 operations ----------
# The exponential is numpy's (vectorised); these loops compute its argument and everything after it in one pass
# each. x, e, y are flat float32 arrays.
_AS_P = np.float32(0.3275911)
_AS_A1, _AS_A2, _AS_A3, _AS_A4, _AS_A5 = (np.float32(v) for v in (0.254829592, -0.284496736, 1.421413741,
                                                                    -1.453152027, 1.061405429))
_SQRT_HALF = np.float32(np.sqrt(0.5))
_INV_SQRT_2PI = np.float32(1.0 / np.sqrt(2.0 * np.pi))


@jit
def gelu_exp_argument(x, e):
    """e = -|z|² with z = x·√½ (the exponent of erf's tail term)."""
    for i in range(x.shape[0]):
        az = np.abs(x[i] * _SQRT_HALF)
        e[i] = -(az * az)


@jit
def _erf_as(z, ez):
    """erf(z) by A&S 7.1.26 given ez = exp(-z²)."""
    one = np.float32(1.0)
    t = one / (one + _AS_P * np.abs(z))
    poly = (((_AS_A5 * t + _AS_A4) * t + _AS_A3) * t + _AS_A2) * t + _AS_A1
    r = one - poly * t * ez
    return r if z >= 0 else -r


@jit
def gelu(x, ez, y):
    """y = 0.5·x·(1 + erf(x·√½)), ez = exp(-(x·√½)²)."""
    for i in range(x.shape[0]):
        v = x[i]
        y[i] = np.float32(0.5) * v * (np.float32(1.0) + _erf_as(v * _SQRT_HALF, ez[i]))


@jit
def gelu_grad(x, dy, ez, dx):
    """dx = dy · (0.5·(1 + erf(x·√½)) + x·φ(x)), φ(x) = exp(-x²/2)/√(2π) = ez/√(2π)."""
    for i in range(x.shape[0]):
        v = x[i]
        d = np.float32(0.5) * (np.float32(1.0) + _erf_as(v * _SQRT_HALF, ez[i])) + v * _INV_SQRT_2PI * ez[i]
        dx[i] = dy[i] * d


# ---- a frozen BatchNorm (Mul by a per-channel scale, Add a per-channel shift), optionally with its ReLU ----------
@jit
def scale_shift(x, s, t, y, relu):
    """y (N, C, L) = x · s[c] + t[c], then max(·, 0) (as ``relu``: NaN stays) when ``relu``: what the separate
    Mul, Add and Relu compute, element by element with the same roundings (no contraction), in one pass."""
    n_, c_, l_ = x.shape
    for n in range(n_):
        for c in range(c_):
            src, dst = x[n, c], y[n, c]
            scale, shift = s[c], t[c]
            if relu:
                for q in range(l_):
                    v = src[q] * scale + shift
                    dst[q] = v if not v < 0 else v * 0
            else:
                for q in range(l_):
                    dst[q] = src[q] * scale + shift


# ---- ReLU and its gradient (flat arrays; one pass each) ----------------------------------------------------
@jit
def relu(x, y):
    """y = max(x, 0); NaN stays NaN (as np.maximum)."""
    for i in range(x.shape[0]):
        v = x[i]
        y[i] = v if not v < 0 else v * 0


@jit
def relu_grad(y, dy, dx):
    """dx = dy where y > 0, else dy · 0 (as np.multiply(dy, y > 0))."""
    for i in range(y.shape[0]):
        g = dy[i]
        dx[i] = g if y[i] > 0 else g * 0


@jit
def relu_inplace(x):
    """x = max(x, 0) in place (one array: LLVM's overlap check would keep the two-array loop scalar)."""
    for i in range(x.shape[0]):
        v = x[i]
        x[i] = v if not v < 0 else v * 0
