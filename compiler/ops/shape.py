"""Data-movement ops: views, transposes, concatenation, slicing, reductions, broadcasting.

ONNX passes shapes, axes and slice bounds as constant inputs; the frontend turns those into attributes,
so every shape here is known at compile time.
"""
from __future__ import annotations

import numpy as np

from compiler.ir import CompileError
from compiler.ops._util import norm_axis, size
from compiler.ops.base import Op
from compiler.ops.binding import Ref, Site, dtype_code, esize, gather_copy_args, reduce_into_args
from compiler.ops.layout import broadcast_strides, coalesce, contiguous_strides, split_at


def resolve_reshape(in_shape, shape, allowzero=0):
    shape = [in_shape[i] if (d == 0 and not allowzero) else int(d) for i, d in enumerate(shape)]
    if shape.count(-1) > 1:
        raise CompileError(f"Reshape: more than one -1 in {shape}")
    if -1 in shape:
        known = size([d for d in shape if d != -1])
        shape[shape.index(-1)] = size(in_shape) // max(known, 1)
    if size(shape) != size(in_shape):
        raise CompileError(f"Reshape: cannot reshape {tuple(in_shape)} to {tuple(shape)}")
    return tuple(shape)


class Reshape(Op):
    name = "Reshape"
    kind = "data"
    view = True
    c_call = ""

    def infer(self, x, *, shape, allowzero=0):
        return resolve_reshape(x, shape, allowzero)

    def forward(self, x, *, shape, allowzero=0):
        return x.reshape(resolve_reshape(x.shape, shape, allowzero))

    def gradient(self, g, x, y, dy, *, shape, allowzero=0):
        return (g.reshape(dy[0], g.shape(x[0])),)

    def flops(self, out_shapes, *in_shapes, **attrs):
        return 0


class Identity(Op):
    name = "Identity"
    kind = "data"
    view = True
    c_call = ""

    def infer(self, x):
        return x

    def forward(self, x):
        return x

    def gradient(self, g, x, y, dy):
        return (dy[0],)

    def flops(self, out_shapes, *in_shapes):
        return 0


class Transpose(Op):
    name = "Transpose"
    kind = "data"
    c_call = "ef_transpose(${y}, ${x}, ${esize}, ${rank}, ${shape}, ${sx})"
    cluster = True

    def infer(self, x, *, perm=None):
        perm = perm if perm is not None else tuple(reversed(range(len(x))))
        if sorted(perm) != list(range(len(x))):
            raise CompileError(f"Transpose: perm {perm} does not fit rank {len(x)}")
        return tuple(x[p] for p in perm)

    def forward(self, x, *, perm=None):
        return np.ascontiguousarray(np.transpose(x, perm))

    def forward_into(self, outs, x, *, perm=None):
        np.copyto(outs[0], np.transpose(x, perm))

    def gradient(self, g, x, y, dy, *, perm=None):
        perm = perm if perm is not None else tuple(reversed(range(len(g.shape(x[0])))))
        return (g.emit("Transpose", [dy[0]], perm=tuple(int(i) for i in np.argsort(perm))),)

    def flops(self, out_shapes, *in_shapes, **attrs):
        return 0

    def c_args(self, site: Site):
        x, y = site.input(0), site.outputs[0]
        shape = site.shape(x)
        perm = site.attr("perm")
        perm = tuple(reversed(range(len(shape)))) if perm is None else tuple(int(p) for p in perm)
        own = contiguous_strides(shape)
        return gather_copy_args(site, x, y, tuple(own[p] for p in perm))


class Concat(Op):
    name = "Concat"
    kind = "data"
    c_call = "ef_concat(${y}, ${xs}, ${esize}, ${count}, ${outer}, ${chunk})"

    def infer(self, *xs, axis):
        axis = norm_axis(axis, len(xs[0]))
        out = list(xs[0])
        out[axis] = sum(s[axis] for s in xs)
        return tuple(out)

    def forward(self, *xs, axis):
        return np.concatenate(xs, axis=axis)

    def gradient(self, g, x, y, dy, *, axis):
        axis = norm_axis(axis, len(g.shape(x[0])))
        grads, start = [], 0
        for name in x:
            end = start + g.shape(name)[axis]
            grads.append(g.emit("Slice", [dy[0]], starts=(start,), ends=(end,), axes=(axis,))
                         if g.needs(name) else None)
            start = end
        return tuple(grads)

    def flops(self, out_shapes, *in_shapes, **attrs):
        return 0

    def c_args(self, site: Site):
        xs, y = site.inputs, site.outputs[0]
        shape = site.shape(y)
        axis = norm_axis(int(site.attr("axis")), len(shape))
        outer, _, inner = split_at(shape, axis)
        return dict(y=Ref(y), xs=tuple(Ref(x) for x in xs), esize=esize(site, y), count=len(xs), outer=outer,
                    chunk=tuple(site.shape(x)[axis] * inner for x in xs))


class Split(Op):
    name = "Split"
    kind = "data"
    c_call = "ef_split(${ys}, ${x}, ${esize}, ${count}, ${outer}, ${chunk})"
    num_outputs = -1

    def infer(self, x, *, axis=0, split):
        axis = norm_axis(axis, len(x))
        if sum(split) != x[axis]:
            raise CompileError(f"Split: parts {split} do not add up to dimension {x[axis]}")
        return tuple(tuple(x[:axis]) + (s,) + tuple(x[axis + 1:]) for s in split)

    def forward(self, x, *, axis=0, split):
        return tuple(np.split(x, np.cumsum(split)[:-1], axis=axis))

    def gradient(self, g, x, y, dy, *, axis=0, split):
        parts = [d if d is not None else g.const(np.zeros(g.shape(o), np.float32), "zeros")
                 for o, d in zip(y, dy)]
        return (g.emit("Concat", parts, axis=axis),)

    def flops(self, out_shapes, *in_shapes, **attrs):
        return 0

    def c_args(self, site: Site):
        x, ys = site.input(0), site.outputs
        shape = site.shape(x)
        axis = norm_axis(int(site.attr("axis")), len(shape))
        outer, _, inner = split_at(shape, axis)
        parts = tuple(site.shape(y)[axis] for y in ys)
        if tuple(int(p) for p in site.attr("split")) != parts:
            raise site.error(f"split {tuple(site.attr('split'))} does not match the outputs' sizes {parts}")
        return dict(ys=tuple(Ref(y) for y in ys), x=Ref(x), esize=esize(site, x), count=len(ys), outer=outer,
                    chunk=tuple(site.shape(y)[axis] * inner for y in ys))


def slice_index(shape, starts, ends, axes=None, steps=None):
    axes = axes if axes is not None else tuple(range(len(starts)))
    steps = steps if steps is not None else (1,) * len(starts)
    index = [slice(None)] * len(shape)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = norm_axis(axis, len(shape))
        index[axis] = slice(*slice(int(start), int(end), int(step)).indices(shape[axis]))
    return tuple(index)


def _slice_walk(site: Site, shape) -> tuple[int, tuple, tuple]:
    """(element offset, output shape, strides) of the slice of a dense tensor of ``shape``."""
    index = slice_index(shape, site.attr("starts"), site.attr("ends"), site.attr("axes"), site.attr("steps"))
    own = contiguous_strides(shape)
    offset, lengths, strides = 0, [], []
    for sl, n, st in zip(index, shape, own):
        start, stop, step = sl.indices(n)
        count = len(range(start, stop, step))
        offset += start * st if count else 0
        lengths.append(count)
        strides.append(step * st)
    return offset, tuple(lengths), tuple(strides)


class Slice(Op):
    name = "Slice"
    kind = "data"
    c_call = "ef_slice(${y}, ${x}, ${esize}, ${offset}, ${rank}, ${shape}, ${sx})"

    def infer(self, x, *, starts, ends, axes=None, steps=None):
        return np.empty(x, dtype=np.uint8)[slice_index(x, starts, ends, axes, steps)].shape

    def forward(self, x, *, starts, ends, axes=None, steps=None):
        return np.ascontiguousarray(x[slice_index(x.shape, starts, ends, axes, steps)])

    def gradient(self, g, x, y, dy, *, starts, ends, axes=None, steps=None):
        return (g.emit("SliceGrad", [dy[0]], shape=g.shape(x[0]), starts=starts, ends=ends, axes=axes,
                       steps=steps),)

    def flops(self, out_shapes, *in_shapes, **attrs):
        return 0

    def c_args(self, site: Site):
        x, y = site.input(0), site.outputs[0]
        offset, lengths, strides = _slice_walk(site, site.shape(x))
        if lengths != site.shape(y):
            raise site.error(f"slice of {site.shape(x)} is {lengths}, the output is {site.shape(y)}")
        return gather_copy_args(site, x, y, strides, offset)


class SliceGrad(Op):
    """Scatter dy into zeros of the sliced input's shape."""
    name = "SliceGrad"
    kind = "data"
    backward_only = True
    c_call = "ef_slice_grad(${dx}, ${dy}, ${esize}, ${n_dx}, ${offset}, ${rank}, ${shape}, ${sdx})"

    def infer(self, dy, *, shape, starts, ends, axes=None, steps=None):
        return tuple(shape)

    def forward(self, dy, *, shape, starts, ends, axes=None, steps=None):
        out = np.zeros(shape, dy.dtype)
        out[slice_index(shape, starts, ends, axes, steps)] = dy
        return out

    def flops(self, out_shapes, *in_shapes, **attrs):
        return 0

    def c_args(self, site: Site):
        dy, dx = site.input(0), site.outputs[0]
        full = tuple(int(d) for d in site.attr("shape"))
        offset, lengths, strides = _slice_walk(site, full)
        if lengths != site.shape(dy):
            raise site.error(f"slice of {full} is {lengths}, dy is {site.shape(dy)}")
        shape, _, sdx = coalesce(lengths, contiguous_strides(lengths), strides)
        return dict(dx=Ref(dx), dy=Ref(dy), esize=esize(site, dy), n_dx=size(full), offset=offset, rank=len(shape),
                    shape=shape, sdx=sdx)


def _axes(rank, axes):
    return tuple(range(rank)) if axes is None or len(axes) == 0 else tuple(norm_axis(a, rank) for a in axes)


def _reduce_args(site: Site) -> dict:
    x, y = site.input(0), site.outputs[0]
    xs = site.shape(x)
    axes = _axes(len(xs), site.attr("axes"))
    site.attr("keepdims")  # keepdims changes the shape, not the layout
    kept = tuple(1 if i in axes else d for i, d in enumerate(xs))
    return reduce_into_args(site, x, y, kept)


class ReduceMean(Op):
    name = "ReduceMean"
    kind = "reduction"
    c_call = "ef_reduce_mean(${y}, ${x}, ${ny}, ${rank}, ${shape}, ${sy}, ${count})"

    def infer(self, x, *, axes=None, keepdims=1):
        axes = _axes(len(x), axes)
        return tuple(1 if i in axes else d for i, d in enumerate(x) if keepdims or i not in axes)

    def forward(self, x, *, axes=None, keepdims=1):
        return np.mean(x, axis=_axes(x.ndim, axes), keepdims=bool(keepdims)).astype(x.dtype, copy=False)

    def gradient(self, g, x, y, dy, *, axes=None, keepdims=1):
        shape = g.shape(x[0])
        axes = _axes(len(shape), axes)
        kept = tuple(1 if i in axes else d for i, d in enumerate(shape))
        count = size([shape[a] for a in axes])
        spread = g.emit("Expand", [g.reshape(dy[0], kept)], shape=shape)
        return (g.emit("Mul", [spread, g.const(1.0 / count, "inv_count")]),)

    def flops(self, out_shapes, x, **attrs):
        return size(x)

    def c_args(self, site: Site):
        xs = site.shape(site.input(0))
        return dict(_reduce_args(site), count=size([xs[a] for a in _axes(len(xs), site.attr("axes"))]))


class ReduceSum(Op):
    name = "ReduceSum"
    kind = "reduction"
    c_call = "ef_reduce_sum(${y}, ${x}, ${ny}, ${rank}, ${shape}, ${sy})"

    def infer(self, x, *, axes=None, keepdims=1):
        return ReduceMean.infer(self, x, axes=axes, keepdims=keepdims)

    def forward(self, x, *, axes=None, keepdims=1):
        return np.sum(x, axis=_axes(x.ndim, axes), keepdims=bool(keepdims))

    def gradient(self, g, x, y, dy, *, axes=None, keepdims=1):
        shape = g.shape(x[0])
        axes = _axes(len(shape), axes)
        kept = tuple(1 if i in axes else d for i, d in enumerate(shape))
        return (g.emit("Expand", [g.reshape(dy[0], kept)], shape=shape),)

    def flops(self, out_shapes, x, **attrs):
        return size(x)

    def c_args(self, site: Site):
        return _reduce_args(site)


class ReduceMax(Op):
    name = "ReduceMax"
    kind = "reduction"
    c_call = "ef_reduce_max(${y}, ${x}, ${ny}, ${rank}, ${shape}, ${sy})"

    def infer(self, x, *, axes=None, keepdims=1):
        return ReduceMean.infer(self, x, axes=axes, keepdims=keepdims)

    def forward(self, x, *, axes=None, keepdims=1):
        return np.max(x, axis=_axes(x.ndim, axes), keepdims=bool(keepdims))

    def gradient(self, g, x, y, dy, *, axes=None, keepdims=1):
        """dy spread evenly over the positions holding the maximum (PyTorch's amax rule for ties)."""
        shape = g.shape(x[0])
        axes = _axes(len(shape), axes)
        kept = tuple(1 if i in axes else d for i, d in enumerate(shape))
        mask = g.emit("EqualMask", [x[0], g.reshape(y[0], kept)])
        count = g.emit("ReduceSum", [mask], axes=axes, keepdims=1)
        return (g.emit("Mul", [mask, g.emit("Div", [g.reshape(dy[0], kept), count])]),)

    def flops(self, out_shapes, x, **attrs):
        return size(x)

    def c_args(self, site: Site):
        return _reduce_args(site)


class ReduceSumTo(Op):
    """Sum a broadcast result back down to ``shape`` (the one place where gradients are un-broadcast)."""
    name = "ReduceSumTo"
    kind = "reduction"
    backward_only = True
    c_call = "ef_reduce_sum_to(${y}, ${x}, ${ny}, ${rank}, ${shape}, ${sy})"
    cluster = True

    def infer(self, x, *, shape):
        if tuple(np.broadcast_shapes(x, tuple(shape))) != tuple(x):
            raise CompileError(f"ReduceSumTo: {tuple(shape)} does not broadcast to {tuple(x)}")
        return tuple(shape)

    def forward(self, x, *, shape):
        lead = x.ndim - len(shape)
        axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1)
        return np.sum(x, axis=axes, keepdims=True).reshape(shape) if axes else x.reshape(shape)

    def flops(self, out_shapes, x, **attrs):
        return size(x)

    def c_args(self, site: Site):
        return reduce_into_args(site, site.input(0), site.outputs[0], tuple(int(d) for d in site.attr("shape")))


class Expand(Op):
    name = "Expand"
    kind = "data"
    c_call = "ef_expand(${y}, ${x}, ${esize}, ${rank}, ${shape}, ${sx})"

    def infer(self, x, *, shape):
        return tuple(np.broadcast_shapes(x, tuple(shape)))

    def forward(self, x, *, shape):
        return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(shape))).copy()  # ascontiguousarray makes 0-d 1-d

    def gradient(self, g, x, y, dy, *, shape):
        return (g.sum_to(dy[0], g.shape(x[0])),)

    def flops(self, out_shapes, *in_shapes, **attrs):
        return 0

    def c_args(self, site: Site):
        x, y = site.input(0), site.outputs[0]
        return gather_copy_args(site, x, y, broadcast_strides(site.shape(x), site.shape(y)))


# ---- ops that only appear in shape arithmetic; the frontend folds them away at compile time ----------
class Shape(Op):
    name = "Shape"
    kind = "data"
    c_call = "ef_shape(${y}, ${n}, ${dims})"

    def infer(self, x, *, start=0, end=None):
        return (len(range(len(x))[start:end]),)

    def out_dtypes(self, dtypes, **attrs):
        return "int64"

    def forward(self, x, *, start=0, end=None):
        return np.array(x.shape[start:end], np.int64)

    def c_args(self, site: Site):
        x, y = site.input(0), site.outputs[0]
        site.require("int64", y)
        dims = site.shape(x)[site.attr("start"):site.attr("end")]
        return dict(y=Ref(y), n=len(dims), dims=tuple(dims) or (0,))


class Gather(Op):
    name = "Gather"
    kind = "data"
    c_call = ("ef_gather(${y}, ${data}, ${indices}, ${esize}, ${idx64}, ${outer}, ${axis_len}, ${inner}, "
              "${nidx})")

    def infer(self, data, indices, *, axis=0):
        axis = norm_axis(axis, len(data))
        return tuple(data[:axis]) + tuple(indices) + tuple(data[axis + 1:])

    def forward(self, data, indices, *, axis=0):
        return np.take(data, indices, axis=axis)

    def gradient(self, g, x, y, dy, *, axis=0):  # scatter-add dy back to the rows it was read from
        return g.emit("GatherGrad", [dy[0], x[1]], shape=g.shape(x[0]), axis=axis), None

    def flops(self, out_shapes, *in_shapes, **attrs):
        return 0

    def c_args(self, site: Site):
        data, indices, y = site.input(0), site.input(1), site.outputs[0]
        if site.dtype(indices) not in ("int64", "int32"):
            raise site.error(f"indices {indices!r} must be int64 or int32, not {site.dtype(indices)}")
        shape = site.shape(data)
        outer, axis_len, inner = split_at(shape, norm_axis(int(site.attr("axis")), len(shape)))
        return dict(y=Ref(y), data=Ref(data), indices=Ref(indices), esize=esize(site, data),
                    idx64=int(site.dtype(indices) == "int64"), outer=outer, axis_len=axis_len, inner=inner,
                    nidx=size(site.shape(indices)))


class GatherGrad(Op):
    """dData from (dY, indices): zeros of the data's shape with every dY row added at the index it was read
    from (repeated indices accumulate)."""
    name = "GatherGrad"
    kind = "data"
    backward_only = True
    c_call = "ef_gather_grad(${dx}, ${dy}, ${indices}, ${idx64}, ${outer}, ${axis_len}, ${inner}, ${nidx})"

    def infer(self, dy, indices, *, shape, axis=0):
        return tuple(shape)

    def forward(self, dy, indices, *, shape, axis=0):
        axis = norm_axis(axis, len(shape))
        dx = np.zeros(shape, dy.dtype)
        idx = np.where(indices < 0, indices + shape[axis], indices).reshape(-1)
        rows = dy.reshape(*shape[:axis], idx.size, *shape[axis + 1:])
        np.add.at(dx, (slice(None),) * axis + (idx,), rows)
        return dx

    def flops(self, out_shapes, dy, *rest, **attrs):
        return size(dy)

    def c_args(self, site: Site):
        dy, indices, dx = site.input(0), site.input(1), site.outputs[0]
        site.require("float32", dy, dx)
        if site.dtype(indices) not in ("int64", "int32"):
            raise site.error(f"indices {indices!r} must be int64 or int32, not {site.dtype(indices)}")
        shape = tuple(site.attr("shape"))
        outer, axis_len, inner = split_at(shape, norm_axis(int(site.attr("axis")), len(shape)))
        return dict(dx=Ref(dx), dy=Ref(dy), indices=Ref(indices), idx64=int(site.dtype(indices) == "int64"),
                    outer=outer, axis_len=axis_len, inner=inner, nidx=size(site.shape(indices)))


class Where(Op):
    """y = a where cond else b, broadcasting; the condition is a constant (a mask known at compile time)."""
    name = "Where"
    c_call = "ef_where(${y}, ${cond}, ${a}, ${b}, ${rank}, ${shape}, ${sc}, ${sa}, ${sb})"

    def infer(self, cond, a, b):
        return tuple(np.broadcast_shapes(cond, a, b))

    def out_dtypes(self, dtypes):
        return dtypes[1]

    def forward(self, cond, a, b):
        return np.where(cond, a, b).astype(np.result_type(a, b), copy=False)

    def gradient(self, g, x, y, dy):
        if g.needs(x[0]):
            raise CompileError("Where: the condition cannot be trained")
        zero = g.const(0.0, "zero", g.dtype(dy[0]))
        da = g.emit("Where", [x[0], dy[0], zero]) if g.needs(x[1]) else None
        db = g.emit("Where", [x[0], zero, dy[0]]) if g.needs(x[2]) else None
        return None, da, db

    def c_args(self, site: Site):
        cond, a, b, y = site.input(0), site.input(1), site.input(2), site.outputs[0]
        site.require("float32", a, b, y)
        site.require("bool", cond)
        out = site.shape(y)
        try:
            shape, _, sc, sa, sb = coalesce(out, contiguous_strides(out), *(broadcast_strides(site.shape(t), out)
                                                                            for t in (cond, a, b)))
        except ValueError as exc:
            raise site.error(str(exc)) from None
        return dict(y=Ref(y), cond=Ref(cond), a=Ref(a), b=Ref(b), rank=len(shape), shape=shape, sc=sc, sa=sa, sb=sb)


class Unsqueeze(Op):
    name = "Unsqueeze"
    kind = "data"
    view = True
    c_call = ""

    def infer(self, x, *, axes):
        rank = len(x) + len(axes)
        axes = sorted(norm_axis(a, rank) for a in axes)
        out = list(x)
        for a in axes:
            out.insert(a, 1)
        return tuple(out)

    def forward(self, x, *, axes):
        return x.reshape(self.infer(x.shape, axes=axes))

    def gradient(self, g, x, y, dy, *, axes):
        return (g.reshape(dy[0], g.shape(x[0])),)

    def flops(self, out_shapes, *in_shapes, **attrs):
        return 0


class Squeeze(Op):
    name = "Squeeze"
    kind = "data"
    view = True
    c_call = ""

    def infer(self, x, *, axes=None):
        axes = tuple(i for i, d in enumerate(x) if d == 1) if axes is None else \
            tuple(norm_axis(a, len(x)) for a in axes)
        return tuple(d for i, d in enumerate(x) if i not in axes)

    def forward(self, x, *, axes=None):
        return x.reshape(self.infer(x.shape, axes=axes))

    def gradient(self, g, x, y, dy, *, axes=None):
        return (g.reshape(dy[0], g.shape(x[0])),)

    def flops(self, out_shapes, *in_shapes, **attrs):
        return 0


ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 11: "float64"}


class Cast(Op):
    name = "Cast"
    kind = "data"
    c_call = "ef_cast(${y}, ${y_dtype}, ${x}, ${x_dtype}, ${n})"

    def infer(self, x, *, to):
        return x

    def out_dtypes(self, dtypes, *, to):
        if to not in ONNX_DTYPES:
            raise CompileError(f"Cast: unsupported target type {to}")
        return ONNX_DTYPES[to]

    def forward(self, x, *, to):
        return x.astype(ONNX_DTYPES[to])

    def gradient(self, g, x, y, dy, *, to):
        return (dy[0],)

    def c_args(self, site: Site):
        x, y = site.input(0), site.outputs[0]
        return dict(y=Ref(y), y_dtype=dtype_code(site, y), x=Ref(x), x_dtype=dtype_code(site, x),
                    n=site.same_size(x, y))
