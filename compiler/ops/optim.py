"""The optimizer step, applied in place to a parameter (and its momentum buffer)."""
from __future__ import annotations

import numpy as np

from compiler.ir import CompileError
from compiler.ops._util import size
from compiler.ops.base import Op
from compiler.ops.binding import Ref, Site


class SGD(Op):
    """PyTorch's SGD (dampening 0, no Nesterov): d = g + wd·p; v = μ·v + d; p -= lr·(v if μ else d).

    Inputs: param, grad, lr (scalar) [, velocity]. No outputs: results are written back into the param
    (and the velocity) in place, so the step allocates nothing. ``channels`` k > 0 (sparse update): only the
    first k entries of the param along ``axis`` are updated; grad and velocity have k there.
    """
    name = "SGD"
    kind = "optimizer"
    internal = True
    c_call = "ef_sgd(${param}, ${grad}, ${lr}, ${velocity}, ${rows}, ${cols}, ${ld}, ${momentum}, ${weight_decay})"
    num_outputs = -1
    updates = (0, 3)
    foldable = False

    def infer(self, param, grad, lr, velocity=None, *, momentum=0.0, weight_decay=0.0, axis=0, channels=0):
        want = self.update_shape(param, axis=axis, channels=channels)
        if tuple(grad) != want or (velocity is not None and tuple(velocity) != want):
            raise CompileError(f"SGD: grad {tuple(grad)} / velocity {velocity} do not fit param {tuple(param)} "
                               f"(axis {axis}, channels {channels})")
        return ()

    def update_shape(self, param, *, axis=0, channels=0, **attrs):
        """The shape of the part of the param this step writes."""
        param = tuple(param)
        return param if not channels else param[:axis] + (channels,) + param[axis + 1:]

    def forward(self, param, grad, lr, velocity=None, *, momentum=0.0, weight_decay=0.0, axis=0, channels=0):
        part = param[_index(param.ndim, axis, channels)]
        d = grad + part * part.dtype.type(weight_decay) if weight_decay else grad
        if velocity is not None:
            velocity = velocity * velocity.dtype.type(momentum) + d
            d = velocity
        new = param.copy()
        new[_index(param.ndim, axis, channels)] = part - d * lr.astype(param.dtype)
        return (new,) if velocity is None else (new, velocity)

    def forward_into(self, outs, param, grad, lr, velocity=None, *, momentum=0.0, weight_decay=0.0, axis=0,
                     channels=0):
        """The same arithmetic as ``forward``, written back in place: outs are (param[, velocity])."""
        index = _index(param.ndim, axis, channels)
        part = param[index]
        d = grad + part * part.dtype.type(weight_decay) if weight_decay else grad
        if velocity is not None:
            v = np.multiply(velocity, velocity.dtype.type(momentum), out=outs[1])
            d = np.add(v, d, out=v)
        np.subtract(part, d * lr.astype(param.dtype), out=outs[0][index])

    def flops(self, out_shapes, param, grad, *rest, momentum=0.0, weight_decay=0.0, **attrs):
        return size(grad) * (2 + (2 if momentum else 0) + (2 if weight_decay else 0))

    def c_args(self, site: Site):
        param, grad, lr, velocity = site.input(0), site.input(1), site.input(2), site.optional(3)
        site.require("float32", param, grad, lr, velocity)
        n = site.same_size(grad, *(n for n in (velocity,) if n))
        shape, axis, channels = site.shape(param), int(site.attr("axis")), int(site.attr("channels"))
        rows, ld = (1, n) if not channels else (size(shape[:axis]), size(shape[axis:]))  # sparse: first channels
        if n != (size(shape) if not channels else rows * channels * size(shape[axis + 1:])):
            raise site.error(f"grad {site.shape(grad)} does not fit param {shape} (axis {axis}, channels {channels})")
        return dict(param=Ref(param), grad=Ref(grad), lr=Ref(lr), velocity=Ref(velocity) if velocity else None,
                    rows=rows, cols=n // rows, ld=ld,
                    momentum=float(site.attr("momentum")), weight_decay=float(site.attr("weight_decay")))


def _index(rank: int, axis: int, channels: int) -> tuple[slice, ...]:
    return (slice(None),) * axis + (slice(0, channels or None),) + (slice(None),) * (rank - axis - 1)
