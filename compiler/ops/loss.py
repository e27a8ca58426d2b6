"""Losses. Each reduces to a scalar mean over the batch (PyTorch's default ``reduction="mean"``)."""
from __future__ import annotations

import numpy as np

from compiler.ir import CompileError
from compiler.ops._util import size
from compiler.ops.base import Op


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class SoftmaxCrossEntropy(Op):
    """Mean cross-entropy of logits (N, C) against integer class labels (N,)."""
    name = "SoftmaxCrossEntropy"
    kind = "loss"

    def infer(self, logits, labels):
        if tuple(labels) != tuple(logits[:-1]):
            raise CompileError(f"SoftmaxCrossEntropy: labels {tuple(labels)} do not match logits {tuple(logits)}")
        return ()

    def out_dtypes(self, dtypes):
        return dtypes[0]

    def forward(self, logits, labels):
        z = logits - logits.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        picked = np.take_along_axis(logp, labels[..., None].astype(np.int64), axis=-1)
        return np.asarray(-picked.mean(), dtype=logits.dtype)

    def gradient(self, g, x, y, dy):
        return g.emit("SoftmaxCrossEntropyGrad", [x[0], x[1], dy[0]]), None

    def flops(self, out_shapes, logits, labels):
        return 5 * size(logits)


class SoftmaxCrossEntropyGrad(Op):
    name = "SoftmaxCrossEntropyGrad"
    kind = "loss"
    backward_only = True

    def infer(self, logits, labels, dy):
        return logits

    def forward(self, logits, labels, dy):
        p = _softmax(logits)
        np.put_along_axis(p, labels[..., None].astype(np.int64),
                          np.take_along_axis(p, labels[..., None].astype(np.int64), axis=-1) - 1, axis=-1)
        return (p * (dy / size(labels.shape))).astype(logits.dtype, copy=False)

    def flops(self, out_shapes, logits, *rest):
        return 6 * size(logits)


class MSELoss(Op):
    """Mean squared error over every element."""
    name = "MSELoss"
    kind = "loss"

    def infer(self, pred, target):
        if tuple(pred) != tuple(target):
            raise CompileError(f"MSELoss: prediction {tuple(pred)} and target {tuple(target)} differ in shape")
        return ()

    def forward(self, pred, target):
        d = pred - target
        return np.asarray(np.mean(d * d), dtype=pred.dtype)

    def gradient(self, g, x, y, dy):
        dp = g.emit("MSELossGrad", [x[0], x[1], dy[0]])
        return dp, (g.emit("Neg", [dp]) if g.needs(x[1]) else None)

    def flops(self, out_shapes, pred, target):
        return 3 * size(pred)


class MSELossGrad(Op):
    name = "MSELossGrad"
    kind = "loss"
    backward_only = True

    def infer(self, pred, target, dy):
        return pred

    def forward(self, pred, target, dy):
        return ((pred - target) * (2.0 * dy / pred.size)).astype(pred.dtype, copy=False)

    def flops(self, out_shapes, pred, *rest):
        return 3 * size(pred)
