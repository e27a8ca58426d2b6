"""Losses. Each reduces to a scalar mean over the batch (PyTorch's default ``reduction="mean"``)."""
from __future__ import annotations

import numpy as np

from compiler.ir import CompileError
from compiler.ops._util import size
from compiler.ops.base import Op
from compiler.ops.binding import Ref, Site


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _cross_entropy_dims(site: Site, logits: str, labels: str) -> tuple[int, int]:
    site.require("float32", logits)
    site.require("int64", labels)
    shape = site.shape(logits)
    return size(shape[:-1]), shape[-1]


class SoftmaxCrossEntropy(Op):
    """Mean cross-entropy of logits (N, C) against integer class labels (N,)."""
    name = "SoftmaxCrossEntropy"
    kind = "loss"
    internal = True
    c_call = "ef_softmax_cross_entropy(${loss}, ${logits}, ${labels}, ${rows}, ${classes})"

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

    def c_args(self, site: Site):
        logits, labels, loss = site.input(0), site.input(1), site.outputs[0]
        site.require("float32", loss)
        rows, classes = _cross_entropy_dims(site, logits, labels)
        return dict(loss=Ref(loss), logits=Ref(logits), labels=Ref(labels), rows=rows, classes=classes)


class SoftmaxCrossEntropyGrad(Op):
    name = "SoftmaxCrossEntropyGrad"
    kind = "loss"
    backward_only = True
    c_call = ("ef_softmax_cross_entropy_grad(${dx}, ${logits}, ${labels}, ${dy}, ${rows}, "
              "${classes})")

    def infer(self, logits, labels, dy):
        return logits

    def forward(self, logits, labels, dy):
        p = _softmax(logits)
        np.put_along_axis(p, labels[..., None].astype(np.int64),
                          np.take_along_axis(p, labels[..., None].astype(np.int64), axis=-1) - 1, axis=-1)
        return (p * (dy / size(labels.shape))).astype(logits.dtype, copy=False)

    def flops(self, out_shapes, logits, *rest):
        return 6 * size(logits)

    def c_args(self, site: Site):
        logits, labels, dy, dx = site.input(0), site.input(1), site.input(2), site.outputs[0]
        site.require("float32", dy, dx)
        rows, classes = _cross_entropy_dims(site, logits, labels)
        return dict(dx=Ref(dx), logits=Ref(logits), labels=Ref(labels), dy=Ref(dy), rows=rows, classes=classes)


class MSELoss(Op):
    """Mean squared error over every element."""
    name = "MSELoss"
    kind = "loss"
    internal = True
    c_call = "ef_mse_loss(${loss}, ${pred}, ${target}, ${n})"

    def infer(self, pred, target):
        if tuple(pred) != tuple(target):
            raise CompileError(f"MSELoss: prediction {tuple(pred)} and target {tuple(target)} differ in shape")
        return ()

    def forward(self, pred, target):
        d = pred - target
        return np.asarray(np.mean(np.square(d, out=d)), dtype=pred.dtype)  # squared in place: no second temporary

    def gradient(self, g, x, y, dy):
        dp = g.emit("MSELossGrad", [x[0], x[1], dy[0]])
        return dp, (g.emit("Neg", [dp]) if g.needs(x[1]) else None)

    def flops(self, out_shapes, pred, target):
        return 3 * size(pred)

    def c_args(self, site: Site):
        pred, target, loss = site.input(0), site.input(1), site.outputs[0]
        site.require("float32", pred, target, loss)
        return dict(loss=Ref(loss), pred=Ref(pred), target=Ref(target), n=site.same_size(pred, target))


class MSELossGrad(Op):
    name = "MSELossGrad"
    kind = "loss"
    backward_only = True
    c_call = "ef_mse_loss_grad(${dx}, ${pred}, ${target}, ${dy}, ${n})"

    def infer(self, pred, target, dy):
        return pred

    def forward(self, pred, target, dy):
        return ((pred - target) * (2.0 * dy / pred.size)).astype(pred.dtype, copy=False)

    def flops(self, out_shapes, pred, *rest):
        return 3 * size(pred)

    def c_args(self, site: Site):
        pred, target, dy, dx = site.input(0), site.input(1), site.input(2), site.outputs[0]
        site.require("float32", pred, target, dy, dx)
        return dict(dx=Ref(dx), pred=Ref(pred), target=Ref(target), dy=Ref(dy), n=site.same_size(pred, target, dx))
