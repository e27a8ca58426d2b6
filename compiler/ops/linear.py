"""MatMul, Gemm and the fused LoRA layer: the ops a GEMM accelerator runs."""
from __future__ import annotations

import math

import numpy as np

from compiler.ir import CompileError
from compiler.ops._util import size
from compiler.ops.base import Op
from compiler.ops.binding import Ref, Site, c_strides
from compiler.ops.layout import broadcast_strides, coalesce, contiguous_strides


def gemm_dims(a_shape, b_shape, trans_a=0, trans_b=0):
    """(M, N, K) of a 2-D product A'·B'."""
    m, k = (a_shape[1], a_shape[0]) if trans_a else a_shape
    k2, n = (b_shape[1], b_shape[0]) if trans_b else b_shape
    if k != k2:
        raise CompileError(f"Gemm: inner dimensions differ ({a_shape} x {b_shape}, transA={trans_a}, "
                           f"transB={trans_b})")
    return m, n, k


class MatMul(Op):
    """numpy matmul semantics for inputs of rank >= 2 (batch dimensions broadcast)."""
    name = "MatMul"
    kind = "gemm"
    redmule = True
    c_call = "ef_mat_mul(${y}, ${a}, ${b}, ${m}, ${n}, ${k}, ${brank}, ${bshape}, ${sa}, ${sb})"

    def infer(self, a, b):
        if len(a) < 2 or len(b) < 2:
            raise CompileError(f"MatMul: rank-1 operands are not supported ({a} x {b})")
        if a[-1] != b[-2]:
            raise CompileError(f"MatMul: inner dimensions differ ({a} x {b})")
        batch = np.broadcast_shapes(a[:-2], b[:-2])
        return (*batch, a[-2], b[-1])

    def forward(self, a, b):
        return np.matmul(a, b)

    def forward_into(self, outs, a, b):
        np.matmul(a, b, out=outs[0])

    def gradient(self, g, x, y, dy):
        (a, b), d = x, dy[0]
        a_shape, b_shape, d_shape = g.shape(a), g.shape(b), g.shape(d)
        da = db = None
        if len(b_shape) == 2:
            # fold the batch dimensions into rows: two plain GEMMs
            k, n = b_shape
            d2 = g.reshape(d, (size(d_shape) // n, n))
            if g.needs(a):
                da = g.reshape(g.emit("Gemm", [d2, b], transB=1), a_shape)
            if g.needs(b):
                a2 = g.reshape(a, (size(a_shape) // k, k))
                restricted = g.train_channels(b)  # sparse update: the first c output columns of W only
                db = g.emit("Gemm", [a2, g.channel_slice(d2, 1, restricted[1]) if restricted else d2], transA=1)
            return da, db
        if g.needs(a):
            da = g.emit("MatMul", [d, g.transpose(b)])
        if g.needs(b):
            db = g.emit("MatMul", [g.transpose(a), d])
        return da, db

    def flops(self, out_shapes, a, b):
        return 2 * size(out_shapes[0]) * a[-1]

    def c_args(self, site: Site):
        a, b, y = site.input(0), site.input(1), site.outputs[0]
        site.require("float32", a, b, y)
        sa_, sb_, out = site.shape(a), site.shape(b), site.shape(y)
        m, k, n = sa_[-2], sa_[-1], sb_[-1]
        batch = out[:-2]
        strides_a = tuple(s * m * k for s in broadcast_strides(sa_[:-2], batch))
        strides_b = tuple(s * k * n for s in broadcast_strides(sb_[:-2], batch))
        bshape, _, sa, sb = coalesce(batch, contiguous_strides(batch), strides_a, strides_b)
        if len(bshape) == 1 and sb == (0,) and sa == (m * k,):  # one shared right operand: a single taller GEMM
            m, bshape, sa, sb = m * bshape[0], (1,), (0,), (0,)
        return dict(y=Ref(y), a=Ref(a), b=Ref(b), m=m, n=n, k=k, brank=len(bshape), bshape=bshape, sa=sa, sb=sb)


class Gemm(Op):
    """Y = alpha·A'·B' + beta·C with A' = Aᵀ if transA, B' = Bᵀ if transB; C broadcasts to (M, N)."""
    name = "Gemm"
    kind = "gemm"
    redmule = True
    c_call = ("ef_gemm(${y}, ${a}, ${b}, ${c}, ${m}, ${n}, ${k}, ${trans_a}, ${trans_b}, ${alpha}, ${beta}, "
              "${c_rs}, ${c_cs})")

    def infer(self, a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
        if len(a) != 2 or len(b) != 2:
            raise CompileError(f"Gemm: operands must be 2-D ({a} x {b})")
        m, n, _ = gemm_dims(a, b, transA, transB)
        if c is not None:
            np.broadcast_shapes(c, (m, n))
        return (m, n)

    def forward(self, a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
        y = (a.T if transA else a) @ (b.T if transB else b)
        if alpha != 1.0:
            y *= y.dtype.type(alpha)
        if c is not None:
            y += c if beta == 1.0 else c * c.dtype.type(beta)
        return y

    def forward_into(self, outs, a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
        y = np.matmul(a.T if transA else a, b.T if transB else b, out=outs[0])
        if alpha != 1.0:
            y *= y.dtype.type(alpha)
        if c is not None:
            y += c if beta == 1.0 else c * c.dtype.type(beta)

    def gradient(self, g, x, y, dy, *, alpha=1.0, beta=1.0, transA=0, transB=0):
        a, b = x[0], x[1]
        d = dy[0]
        da = db = dc = None
        if g.needs(a):
            if transA:
                da = g.emit("Gemm", [b, d], alpha=alpha, transA=transB, transB=1)
            else:
                da = g.emit("Gemm", [d, b], alpha=alpha, transB=1 - transB)
        if g.needs(b):
            restricted = g.train_channels(b)  # sparse update: dW of the first c output channels only
            dk = g.channel_slice(d, 1, restricted[1]) if restricted else d
            if transB:
                db = g.emit("Gemm", [dk, a], alpha=alpha, transA=1, transB=transA)
            else:
                db = g.emit("Gemm", [a, dk], alpha=alpha, transA=1 - transA)
        if len(x) > 2 and g.needs(x[2]):
            dc = g.sum_to(d, g.shape(x[2]))
            if beta != 1.0:
                dc = g.emit("Mul", [dc, g.const(beta, "beta")])
        return (da, db) if len(x) == 2 else (da, db, dc)

    def flops(self, out_shapes, a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
        m, n, k = gemm_dims(a, b, transA, transB)
        return 2 * m * n * k + (m * n if c is not None else 0)

    def c_args(self, site: Site):
        a, b, c, y = site.input(0), site.input(1), site.optional(2), site.outputs[0]
        site.require("float32", a, b, c, y)
        ta, tb = int(site.attr("transA")), int(site.attr("transB"))
        m, n, k = gemm_dims(site.shape(a), site.shape(b), ta, tb)
        c_rs, c_cs = c_strides(site, c, m, n)
        return dict(y=Ref(y), a=Ref(a), b=Ref(b), c=Ref(c) if c else None, m=m, n=n, k=k, trans_a=ta, trans_b=tb,
                    alpha=float(site.attr("alpha")), beta=float(site.attr("beta")), c_rs=c_rs, c_cs=c_cs)


# ---- LoRA: the adapted layer as one fused GEMM step, forward and backward ------------------------------------
def lora_dims(x, w, a, b, trans_b):
    """(M, N, K, r, D) of a LoRA layer: x (..., K) folded into M rows, W (K, N) or (N, K) with transB, A (K, r)
    or per device (D, K, r), B (r, N) or (D, r, N); device d owns rows [d·M/D, (d+1)·M/D)."""
    if len(x) < 2 or len(w) != 2:
        raise CompileError(f"LoraLinear: x must have rank >= 2 and W rank 2 ({x}, {w})")
    k = x[-1]
    n, k2 = w if trans_b else w[::-1]
    if k2 != k:
        raise CompileError(f"LoraLinear: inner dimensions differ (x {x}, W {w}, transB={trans_b})")
    if len(a) != len(b) or len(a) not in (2, 3):
        raise CompileError(f"LoraLinear: A {a} and B {b} must both be 2-D, or both 3-D (per device)")
    devices = a[0] if len(a) == 3 else 1
    r = a[-1]
    if a[-2] != k or tuple(b[-2:]) != (r, n) or (len(b) == 3 and b[0] != devices):
        raise CompileError(f"LoraLinear: A {a} / B {b} do not fit x {x} and W {w}")
    m = math.prod(x[:-1])  # not numpy's prod: this runs on every executor step
    if m % devices:
        raise CompileError(f"LoraLinear: {m} rows do not split over {devices} devices")
    return m, n, k, r, devices


def _lora_common(site: Site, x: str, w: str, a: str, b: str) -> dict:
    """The shape and attribute arguments both LoRA kernels share."""
    trans_b = int(site.attr("transB"))
    try:
        m, n, k, r, devices = lora_dims(site.shape(x), site.shape(w), site.shape(a), site.shape(b), trans_b)
    except CompileError as exc:
        raise site.error(str(exc)) from None
    return dict(x=Ref(x), w=Ref(w), a=Ref(a), b=Ref(b), m=m, n=n, k=k, r=r, devices=devices, trans_b=trans_b,
                alpha=float(site.attr("alpha")), scale=float(site.attr("scale")))


def _merges(m: int, k: int, devices: int) -> bool:
    """Whether the numpy kernels fold the adapter into the weight: W_eff = alpha·W' + scale·A·B costs K·r·N per
    device, less than the rank-r products over the rows whenever a device has at least K rows; then the layer
    is one GEMM each way (X·W_eff and dY·W_effᵀ) instead of a GEMM plus two skinny ones and an extra pass."""
    return m // devices >= k


def _merged_weight(w, a, b, k, n, devices, trans_b, alpha, scale):
    """W_eff = alpha·W' + scale·A·B: (K, N), or (D, K, N) per device."""
    wt = w.T if trans_b else w
    if devices == 1:
        weff = a.reshape(k, -1) @ b.reshape(-1, n)
    else:
        weff = np.matmul(a.reshape(devices, k, -1), b.reshape(devices, -1, n))
    weff *= weff.dtype.type(scale)
    weff += wt if alpha == 1.0 else wt * wt.dtype.type(alpha)
    return weff


def _per_device(t, devices):
    """A row-folded (M, c) operand as (D, M/D, c) (a view)."""
    return t.reshape(devices, t.shape[0] // devices, t.shape[1])


class LoraLinear(Op):
    """A layer with a LoRA adapter in one step (PEFT's LoRA Linear, as one kernel):

        y = alpha·x·W' (+ beta·C) + (scale·x·A)·B          W' = Wᵀ if transB, scale = α/r

    x (..., K) is folded into M rows. One pass over x feeds both products, and B's product accumulates onto the
    frozen one (RedMulE's Z = X·W + Y): the adapter adds no activation-sized traffic. The rank-r intermediate
    x·A stays inside the step; the backward step recomputes it from x, which it reads for dA anyway.
    A and B may carry a leading device axis (D, ·, ·): then device d's rows are the d-th of D equal slices."""
    name = "LoraLinear"
    kind = "gemm"
    cost = "fused"
    redmule = True
    internal = True
    c_call = ("ef_lora_linear(${y}, ${x}, ${w}, ${a}, ${b}, ${c}, ${m}, ${n}, ${k}, ${r}, ${devices}, ${trans_b}, "
              "${alpha}, ${beta}, ${c_rs}, ${c_cs}, ${scale})")

    def infer(self, x, w, a, b, c=None, *, scale, transB=0, alpha=1.0, beta=1.0):
        m, n, _, _, _ = lora_dims(x, w, a, b, transB)
        if c is not None:
            if len(x) != 2:
                raise CompileError(f"LoraLinear: a C input needs 2-D x (got {x})")
            np.broadcast_shapes(c, (m, n))
        return (*x[:-1], n)

    def forward(self, x, w, a, b, c=None, *, scale, transB=0, alpha=1.0, beta=1.0):
        m, n, _, _, _ = lora_dims(x.shape, w.shape, a.shape, b.shape, transB)
        y = np.empty((*x.shape[:-1], n), x.dtype)
        self.forward_into((y,), x, w, a, b, c, scale=scale, transB=transB, alpha=alpha, beta=beta)
        return y

    def forward_into(self, outs, x, w, a, b, c=None, *, scale, transB=0, alpha=1.0, beta=1.0):
        m, n, k, _, devices = lora_dims(x.shape, w.shape, a.shape, b.shape, transB)
        x2, y = x.reshape(m, k), outs[0].reshape(m, n)
        if _merges(m, k, devices):
            weff = _merged_weight(w, a, b, k, n, devices, transB, alpha, scale)
            if devices == 1:
                np.matmul(x2, weff, out=y)
            else:
                np.matmul(_per_device(x2, devices), weff, out=_per_device(y, devices))
            if c is not None:
                y += c if beta == 1.0 else c * c.dtype.type(beta)
            return
        np.matmul(x2, w.T if transB else w, out=y)
        if alpha != 1.0:
            y *= y.dtype.type(alpha)
        if c is not None:
            y += c if beta == 1.0 else c * c.dtype.type(beta)
        if devices == 1:  # plain 2-D products: numpy's batched matmul costs more on small shapes
            s = np.matmul(x2, a.reshape(k, -1))
            s *= s.dtype.type(scale)
            y += s @ b.reshape(-1, n)
            return
        s = np.matmul(_per_device(x2, devices), a)
        s *= s.dtype.type(scale)
        _per_device(y, devices)[...] += s @ b

    def gradient(self, g, x, y, dy, *, scale, transB=0, alpha=1.0, beta=1.0):
        xs, w, a, b = x[:4]
        d = dy[0]
        grads = "".join(letter for letter, name in zip("xab", (xs, a, b)) if g.needs(name))
        found = dict(zip(grads, g.emit_n("LoraLinearGrad", [d, xs, w, a, b], grads=grads, scale=scale,
                                         transB=transB, alpha=alpha))) if grads else {}
        dw = dc = None
        if g.needs(w):  # the frozen weight trained as well (LoRA on a fully trained layer)
            k, n = g.shape(xs)[-1], g.shape(d)[-1]
            x2, d2 = g.reshape(xs, (size(g.shape(xs)) // k, k)), g.reshape(d, (size(g.shape(d)) // n, n))
            dw = g.emit("Gemm", [d2, x2], transA=1, alpha=alpha) if transB else \
                g.emit("Gemm", [x2, d2], transA=1, alpha=alpha)
        if len(x) > 4 and g.needs(x[4]):
            dc = g.sum_to(d, g.shape(x[4]))
            if beta != 1.0:
                dc = g.emit("Mul", [dc, g.const(beta, "beta")])
        out = (found.get("x"), dw, found.get("a"), found.get("b"))
        return out if len(x) == 4 else out + (dc,)

    def flops(self, out_shapes, x, w, a, b, c=None, *, scale, transB=0, alpha=1.0, beta=1.0):
        m, n, k, r, _ = lora_dims(x, w, a, b, transB)
        return 2 * m * n * k + 2 * m * k * r + m * r + 2 * m * r * n + (m * n if c is not None else 0)

    def c_args(self, site: Site):
        (x, w, a, b), c, y = (site.input(i) for i in range(4)), site.optional(4), site.outputs[0]
        site.require("float32", x, w, a, b, c, y)
        args = _lora_common(site, x, w, a, b)
        rs, cs = c_strides(site, c, args["m"], args["n"])
        return dict(args, y=Ref(y), c=Ref(c) if c else None, beta=float(site.attr("beta")), c_rs=rs, c_cs=cs)


class LoraLinearGrad(Op):
    """The backward pass of LoraLinear in one step; ``grads`` names the outputs, in this order:

           S  = scale·X·A,  dS = scale·dY·Bᵀ      (rank-r, never leave the step; S is recomputed from X)
        x  dX = alpha·dY·W'ᵀ + dS·Aᵀ
        a  dA = Xᵀ·dS
        b  dB = Sᵀ·dY
    per device when A and B carry a device axis. One pass over the rows of dY and X feeds all of them."""
    name = "LoraLinearGrad"
    kind = "gemm"
    cost = "fused"
    redmule = True
    c_call = ("ef_lora_linear_grad(${dx}, ${da}, ${db}, ${dy}, ${x}, ${w}, ${a}, ${b}, ${m}, ${n}, ${k}, ${r}, "
              "${devices}, ${trans_b}, ${alpha}, ${scale})")
    num_outputs = -1
    backward_only = True

    def infer(self, dy, x, w, a, b, *, grads, scale, transB=0, alpha=1.0):
        m, n, _, _, _ = lora_dims(x, w, a, b, transB)
        if size(dy) != m * n:
            raise CompileError(f"LoraLinearGrad: dY {dy} does not fit x {x}")
        if not grads or grads != "".join(c for c in "xab" if c in grads):
            raise CompileError(f"LoraLinearGrad: grads must be a non-empty ordered subset of 'xab', got {grads!r}")
        return tuple({"x": x, "a": a, "b": b}[c] for c in grads)

    def forward(self, dy, x, w, a, b, *, grads, scale, transB=0, alpha=1.0):
        outs = tuple(np.empty(t.shape, x.dtype) for t, c in zip((x, a, b), "xab") if c in grads)
        self.forward_into(outs, dy, x, w, a, b, grads=grads, scale=scale, transB=transB, alpha=alpha)
        return outs

    def forward_into(self, outs, dy, x, w, a, b, *, grads, scale, transB=0, alpha=1.0):
        m, n, k, r, devices = lora_dims(x.shape, w.shape, a.shape, b.shape, transB)
        got = dict(zip(grads, outs))
        s = dy.dtype.type(scale)
        d2, x2 = dy.reshape(m, n), x.reshape(m, k)
        if "x" in got and _merges(m, k, devices):  # dX through the merged weight; dA, dB as below
            weff = _merged_weight(w, a, b, k, n, devices, transB, alpha, scale)
            dx = got["x"].reshape(m, k)
            if devices == 1:
                np.matmul(d2, weff.T, out=dx)
            else:
                np.matmul(_per_device(d2, devices), weff.transpose(0, 2, 1), out=_per_device(dx, devices))
            rest = grads.replace("x", "")
            if rest:
                self.forward_into(outs[1:], dy, x, w, a, b, grads=rest, scale=scale, transB=transB, alpha=alpha)
            return
        if devices == 1:  # 2-D views: numpy's batched matmul costs more on small shapes
            dd, xd, a3, b3 = d2, x2, a.reshape(k, r), b.reshape(r, n)

            def t(v):
                return v.T
        else:
            dd, xd = _per_device(d2, devices), _per_device(x2, devices)
            a3, b3 = a.reshape(devices, k, r), b.reshape(devices, r, n)

            def t(v):
                return v.transpose(0, 2, 1)
        ds = np.matmul(dd, t(b3))
        ds *= s
        if "x" in got:
            dx = got["x"].reshape(m, k)
            np.matmul(d2, w if transB else w.T, out=dx)
            if alpha != 1.0:
                dx *= dx.dtype.type(alpha)
            (dx if devices == 1 else _per_device(dx, devices))[...] += ds @ t(a3)
        if "a" in got:
            np.matmul(t(xd), ds, out=got["a"].reshape(a3.shape))
        if "b" in got:
            sx = np.matmul(xd, a3)
            sx *= s
            np.matmul(t(sx), dd, out=got["b"].reshape(b3.shape))

    def flops(self, out_shapes, dy, x, w, a, b, *, grads, scale, transB=0, alpha=1.0):
        m, n, k, r, _ = lora_dims(x, w, a, b, transB)
        per = {"x": 2 * m * n * k + 2 * m * r * k, "a": 2 * m * k * r, "b": 2 * m * k * r + m * r + 2 * m * r * n}
        return 2 * m * n * r + m * r + sum(per[c] for c in grads)

    def c_args(self, site: Site):
        dy, x, w, a, b = (site.input(i) for i in range(5))
        grads = site.attr("grads")
        if len(grads) != len(site.outputs):
            raise site.error(f"grads={grads!r} names {len(grads)} outputs, the step has {len(site.outputs)}")
        outs = dict(zip(grads, site.outputs))
        site.require("float32", dy, x, w, a, b, *site.outputs)
        return dict(_lora_common(site, x, w, a, b), dy=Ref(dy),
                    **{f"d{g}": Ref(outs[g]) if g in outs else None for g in "xab"})
