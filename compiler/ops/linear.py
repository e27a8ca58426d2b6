"""MatMul and Gemm: the ops a GEMM accelerator runs."""
from __future__ import annotations

import numpy as np

from compiler.ir import CompileError
from compiler.ops._util import size
from compiler.ops.base import Op


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
                db = g.emit("Gemm", [a2, d2], transA=1)
            return da, db
        if g.needs(a):
            da = g.emit("MatMul", [d, g.transpose(b)])
        if g.needs(b):
            db = g.emit("MatMul", [g.transpose(a), d])
        return da, db

    def flops(self, out_shapes, a, b):
        return 2 * size(out_shapes[0]) * a[-1]


class Gemm(Op):
    """Y = alpha·A'·B' + beta·C with A' = Aᵀ if transA, B' = Bᵀ if transB; C broadcasts to (M, N)."""
    name = "Gemm"
    kind = "gemm"

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
            if transB:
                db = g.emit("Gemm", [d, a], alpha=alpha, transA=1, transB=transA)
            else:
                db = g.emit("Gemm", [a, d], alpha=alpha, transA=1 - transA)
        if len(x) > 2 and g.needs(x[2]):
            dc = g.sum_to(d, g.shape(x[2]))
            if beta != 1.0:
                dc = g.emit("Mul", [dc, g.const(beta, "beta")])
        return (da, db) if len(x) == 2 else (da, db, dc)

    def flops(self, out_shapes, a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
        m, n, k = gemm_dims(a, b, transA, transB)
        return 2 * m * n * k + (m * n if c is not None else 0)
