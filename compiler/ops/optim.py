"""The optimizer steps (SGD, Adam), applied in place to a parameter and its optimizer state."""
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
    cluster = True
    num_outputs = -1
    updates = (0, 3)
    foldable = False

    def infer(self, param, grad, lr, velocity=None, *, momentum=0.0, weight_decay=0.0, axis=0, channels=0):
        want = self.update_shape(param, axis=axis, channels=channels)
        if tuple(grad) != want or (velocity is not None and tuple(velocity) != want):
            raise CompileError(f"SGD: grad {tuple(grad)} / velocity {velocity} do not fit param {tuple(param)} "
                               f"(axis {axis}, channels {channels})")
        return ()

    def update_shape(self, param, index=0, *, axis=0, channels=0, **attrs):
        return _update_shape(param, axis, channels)

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
        rows, cols, ld = _update_layout(site, param, grad, *(n for n in (velocity,) if n))
        return dict(param=Ref(param), grad=Ref(grad), lr=Ref(lr), velocity=Ref(velocity) if velocity else None,
                    rows=rows, cols=cols, ld=ld,
                    momentum=float(site.attr("momentum")), weight_decay=float(site.attr("weight_decay")))


def _update_shape(param, axis: int, channels: int) -> tuple[int, ...]:
    """The shape of the part of the param an update writes (a sparse update: the first ``channels``)."""
    param = tuple(param)
    return param if not channels else param[:axis] + (channels,) + param[axis + 1:]


def _update_layout(site: Site, param, grad, *dense) -> tuple[int, int, int]:
    """The C kernels' view of an update: rows blocks of cols updated elements, ld apart in the param (a sparse
    update's first channels of each row block); grad and the state buffers ``dense`` are rows x cols."""
    n = site.same_size(grad, *dense)
    shape, axis, channels = site.shape(param), int(site.attr("axis")), int(site.attr("channels"))
    rows, ld = (1, n) if not channels else (size(shape[:axis]), size(shape[axis:]))
    if n != (size(shape) if not channels else rows * channels * size(shape[axis + 1:])):
        raise site.error(f"grad {site.shape(grad)} does not fit param {shape} (axis {axis}, channels {channels})")
    return rows, n // rows, ld


def _index(rank: int, axis: int, channels: int) -> tuple[slice, ...]:
    return (slice(None),) * axis + (slice(0, channels or None),) + (slice(None),) * (rank - axis - 1)


class Adam(Op):
    """PyTorch's Adam (L2 weight decay, no AMSGrad): d = g + wd·p; m = m + (1−β1)·(d − m) (torch's lerp);
    v = β2·v + (1−β2)·d²; p -= lr/c1 · m / (√v/√c2 + ε) with cₖ = 1 − βₖᵗ the bias corrections, arithmetic in torch's order.

    Inputs: param, grad, lr (scalar), m, v, corrections (2,). No outputs: param, m, v and the corrections are
    written back in place. The corrections are kept as state that starts at 0, like every optimizer state, and
    steps as c ← 1 − β·(1 − c), so no step counter and no pow are needed on the device. ``channels`` k > 0
    (sparse update): only the first k entries of the param along ``axis`` are updated; grad, m and v have k.
    """
    name = "Adam"
    kind = "optimizer"
    internal = True
    c_call = ("ef_adam(${param}, ${grad}, ${lr}, ${m}, ${v}, ${corrections}, ${rows}, ${cols}, ${ld}, ${beta1}, "
              "${beta2}, ${eps}, ${weight_decay})")
    num_outputs = -1
    updates = (0, 3, 4, 5)
    foldable = False

    def infer(self, param, grad, lr, m, v, corrections, *, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              axis=0, channels=0):
        want = _update_shape(param, axis, channels)
        if tuple(grad) != want or tuple(m) != want or tuple(v) != want or tuple(corrections) != (2,):
            raise CompileError(f"Adam: grad {tuple(grad)} / m {tuple(m)} / v {tuple(v)} / corrections "
                               f"{tuple(corrections)} do not fit param {tuple(param)} (axis {axis}, channels {channels})")
        return ()

    def update_shape(self, shape, index=0, *, axis=0, channels=0, **attrs):
        return tuple(shape) if index == 5 else _update_shape(shape, axis, channels)  # the corrections: all

    def forward(self, param, grad, lr, m, v, corrections, *, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                axis=0, channels=0):
        outs = [param.copy(), m.copy(), v.copy(), corrections.copy()]
        self.forward_into(outs, param, grad, lr, m, v, corrections, beta1=beta1, beta2=beta2, eps=eps,
                          weight_decay=weight_decay, axis=axis, channels=channels)
        return tuple(outs)

    def forward_into(self, outs, param, grad, lr, m, v, corrections, *, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0, axis=0, channels=0):
        """The same arithmetic as ``forward``, written back in place: outs are (param, m, v, corrections)."""
        t = param.dtype.type
        index = _index(param.ndim, axis, channels)
        part = param[index]
        d = grad + part * t(weight_decay) if weight_decay else grad
        c = outs[3]
        c[...] = t(1) - np.array([beta1, beta2], param.dtype) * (t(1) - corrections)
        m_new = np.add(m, t(1 - beta1) * (d - m), out=outs[1])
        v_new = np.add(v * t(beta2), d * d * t(1 - beta2), out=outs[2])
        step = lr.astype(param.dtype) / c[0]
        denom = np.sqrt(v_new) / np.sqrt(c[1]) + t(eps)
        np.subtract(part, step * (m_new / denom), out=outs[0][index])

    def flops(self, out_shapes, param, grad, *rest, weight_decay=0.0, **attrs):
        return size(grad) * (10 + (2 if weight_decay else 0))

    def c_args(self, site: Site):
        param, grad, lr, m, v, corrections = (site.input(i) for i in range(6))
        site.require("float32", param, grad, lr, m, v, corrections)
        rows, cols, ld = _update_layout(site, param, grad, m, v)
        return dict(param=Ref(param), grad=Ref(grad), lr=Ref(lr), m=Ref(m), v=Ref(v), corrections=Ref(corrections),
                    rows=rows, cols=cols, ld=ld, beta1=float(site.attr("beta1")),
                    beta2=float(site.attr("beta2")), eps=float(site.attr("eps")),
                    weight_decay=float(site.attr("weight_decay")))
