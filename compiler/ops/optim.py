"""The optimizer step, applied in place to a parameter (and its momentum buffer)."""
from __future__ import annotations

import numpy as np

from compiler.ops._util import size
from compiler.ops.base import Op


class SGD(Op):
    """PyTorch's SGD (dampening 0, no Nesterov): d = g + wd·p; v = μ·v + d; p -= lr·(v if μ else d).

    Inputs: param, grad, lr (scalar) [, velocity]. No outputs: results are written back into the param
    (and the velocity) in place, so the step allocates nothing.
    """
    name = "SGD"
    kind = "optimizer"
    num_outputs = -1
    updates = (0, 3)
    foldable = False

    def infer(self, param, grad, lr, velocity=None, *, momentum=0.0, weight_decay=0.0):
        return ()

    def forward(self, param, grad, lr, velocity=None, *, momentum=0.0, weight_decay=0.0):
        d = grad + param * param.dtype.type(weight_decay) if weight_decay else grad
        if velocity is not None:
            velocity = velocity * velocity.dtype.type(momentum) + d
            d = velocity
        new = param - d * lr.astype(param.dtype)
        return (new,) if velocity is None else (new, velocity)

    def forward_into(self, outs, param, grad, lr, velocity=None, *, momentum=0.0, weight_decay=0.0):
        """The same arithmetic as ``forward``, written back in place: outs are (param[, velocity])."""
        d = grad + param * param.dtype.type(weight_decay) if weight_decay else grad
        if velocity is not None:
            v = np.multiply(velocity, velocity.dtype.type(momentum), out=outs[1])
            d = np.add(v, d, out=v)
        np.subtract(param, d * lr.astype(param.dtype), out=outs[0])

    def flops(self, out_shapes, param, *rest, momentum=0.0, weight_decay=0.0):
        return size(param) * (2 + (2 if momentum else 0) + (2 if weight_decay else 0))
