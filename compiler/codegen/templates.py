"""The op → C kernel call table: one strict template per registered op.

A template is a C call with named holes, ``ef_add(${y}, ${a}, ${b}, ...)``, and an argument builder that
computes every hole from the step (operand shapes, dtypes, attributes). ``bind`` checks both ways: a hole
the builder did not fill, or a value for no hole, is a CompileError naming the op and the key; a missing
attribute is one too. The bound arguments are typed values (``Ref`` for a tensor, int, float, a tuple of
ints for a ``const int[]``, a tuple of Refs for a pointer array, None for NULL), rendered to C by
``compiler.codegen.emit`` and passed through ctypes by the kernel tests, so both exercise the same table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from compiler.ir import DTYPE_BYTES, CompileError
from compiler.ops import get_op
from compiler.ops._util import norm_axis
from compiler.ops.conv import Window
from compiler.ops.linear import lora_dims, gemm_dims
from compiler.ops.shape import _axes, slice_index
from compiler.codegen.layout import (broadcast_strides, coalesce, contiguous_strides, size, split_at)

Shape = tuple[int, ...]

DTYPE_CODES = {"float32": 0, "float64": 1, "int64": 2, "int32": 3, "bool": 4}  # EF_F32 ... in ef_kernels.h
GELU_APPROXIMATIONS = {"none": 0, "tanh": 1}
_HOLE = re.compile(r"\$\{(\w+)\}")


@dataclass(frozen=True)
class Ref:
    """A tensor operand (rendered as its pointer macro)."""
    name: str


@dataclass(frozen=True)
class Site:
    """What a template sees of one step."""
    step: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shapes: Mapping[str, Shape]
    dtypes: Mapping[str, str]
    attrs: Mapping[str, Any]   # resolved: defaults filled in

    def shape(self, name: str) -> Shape:
        return tuple(self.shapes[name])

    def dtype(self, name: str) -> str:
        return self.dtypes[name]

    def attr(self, key: str) -> Any:
        try:
            return self.attrs[key]
        except KeyError:
            raise self.error(f"missing attribute {key!r}") from None

    def error(self, message: str) -> CompileError:
        return CompileError(f"step {self.step!r} ({self.op}): {message}")

    def input(self, i: int) -> str:
        if i >= len(self.inputs) or not self.inputs[i]:
            raise self.error(f"missing input {i}")
        return self.inputs[i]

    def optional(self, i: int) -> str | None:
        return self.inputs[i] if i < len(self.inputs) and self.inputs[i] else None

    def require(self, dtype: str, *names: str | None) -> None:
        for name in names:
            if name is not None and self.dtype(name) != dtype:
                raise self.error(f"the C kernel takes {dtype} operands; {name!r} is {self.dtype(name)}")

    def same_size(self, *names: str) -> int:
        sizes = {size(self.shape(n)) for n in names}
        if len(sizes) != 1:
            raise self.error(f"operands {list(names)} differ in size {[self.shape(n) for n in names]}")
        return sizes.pop()


@dataclass(frozen=True)
class Template:
    call: str                                          # C call with ${hole}s; "" for a view (no code)
    args: Callable[[Site], Mapping[str, Any]] | None = None

    @property
    def kernel(self) -> str:
        return self.call.split("(", 1)[0].strip()

    @property
    def holes(self) -> tuple[str, ...]:
        return tuple(_HOLE.findall(self.call))

    @property
    def view(self) -> bool:
        return not self.call


VIEW = Template("")


def bind(template: Template, site: Site) -> list[tuple[str, Any]]:
    """The template's holes in call order with their values (strict: missing or extra keys are errors)."""
    values = dict(template.args(site))
    holes = template.holes
    missing = [h for h in holes if h not in values]
    if missing:
        raise site.error(f"template {template.kernel} has no value for {missing[0]!r}")
    extra = sorted(set(values) - set(holes))
    if extra:
        raise site.error(f"template {template.kernel} got a value for unknown key {extra[0]!r}")
    return [(h, values[h]) for h in holes]


def template_for(op: str, step: str = "") -> Template:
    try:
        return TEMPLATES[op]
    except KeyError:
        raise CompileError(f"step {step!r}: op {op} has no C kernel template "
                           f"(compiler/codegen/templates.py)") from None


def esize(site: Site, name: str) -> int:
    return DTYPE_BYTES[site.dtype(name)]


# ---- argument builders ---------------------------------------------------------------------------------
def _binary(site: Site) -> dict[str, Any]:
    a, b, y = site.input(0), site.input(1), site.outputs[0]
    site.require("float32", a, b, y)
    out = site.shape(y)
    try:
        shape, sy, sa, sb = coalesce(out, contiguous_strides(out), broadcast_strides(site.shape(a), out),
                                     broadcast_strides(site.shape(b), out))
    except ValueError as exc:
        raise site.error(str(exc)) from None
    return dict(y=Ref(y), a=Ref(a), b=Ref(b), rank=len(shape), shape=shape, sa=sa, sb=sb)


def _unary(site: Site) -> dict[str, Any]:
    x, y = site.input(0), site.outputs[0]
    site.require("float32", x, y)
    return dict(y=Ref(y), x=Ref(x), n=site.same_size(x, y))


def _approximate(site: Site) -> int:
    value = site.attr("approximate")
    if value not in GELU_APPROXIMATIONS:
        raise site.error(f"approximate={value!r} is not one of {sorted(GELU_APPROXIMATIONS)}")
    return GELU_APPROXIMATIONS[value]


def _gelu(site: Site) -> dict[str, Any]:
    return dict(_unary(site), approximate=_approximate(site))


def _pair_grad(site: Site) -> dict[str, Any]:
    """dx from (y or x, dy), all the same size."""
    v, dy, dx = site.input(0), site.input(1), site.outputs[0]
    site.require("float32", v, dy, dx)
    return dict(dx=Ref(dx), v=Ref(v), dy=Ref(dy), n=site.same_size(v, dy, dx))


def _gelu_grad(site: Site) -> dict[str, Any]:
    return dict(_pair_grad(site), approximate=_approximate(site))


def _c_strides(site: Site, c: str | None, m: int, n: int) -> tuple[int, int]:
    """Row and column strides of a GEMM's C input broadcast to (m, n); (0, 0) without C."""
    if c is None:
        return 0, 0
    try:
        return broadcast_strides(site.shape(c), (m, n))
    except ValueError as exc:
        raise site.error(str(exc)) from None


def _gemm(site: Site) -> dict[str, Any]:
    a, b, c, y = site.input(0), site.input(1), site.optional(2), site.outputs[0]
    site.require("float32", a, b, c, y)
    ta, tb = int(site.attr("transA")), int(site.attr("transB"))
    m, n, k = gemm_dims(site.shape(a), site.shape(b), ta, tb)
    c_rs, c_cs = _c_strides(site, c, m, n)
    return dict(y=Ref(y), a=Ref(a), b=Ref(b), c=Ref(c) if c else None, m=m, n=n, k=k, trans_a=ta, trans_b=tb,
                alpha=float(site.attr("alpha")), beta=float(site.attr("beta")), c_rs=c_rs, c_cs=c_cs)


def _lora_common(site: Site, x: str, w: str, a: str, b: str) -> dict[str, Any]:
    """The shape and attribute arguments both LoRA kernels share."""
    trans_b = int(site.attr("transB"))
    try:
        m, n, k, r, devices = lora_dims(site.shape(x), site.shape(w), site.shape(a), site.shape(b), trans_b)
    except CompileError as exc:
        raise site.error(str(exc)) from None
    return dict(x=Ref(x), w=Ref(w), a=Ref(a), b=Ref(b), m=m, n=n, k=k, r=r, devices=devices, trans_b=trans_b,
                alpha=float(site.attr("alpha")), scale=float(site.attr("scale")))


def _lora_linear(site: Site) -> dict[str, Any]:
    (x, w, a, b), c, y = (site.input(i) for i in range(4)), site.optional(4), site.outputs[0]
    site.require("float32", x, w, a, b, c, y)
    args = _lora_common(site, x, w, a, b)
    c_rs, c_cs = _c_strides(site, c, args["m"], args["n"])
    return dict(args, y=Ref(y), c=Ref(c) if c else None, beta=float(site.attr("beta")), c_rs=c_rs, c_cs=c_cs)


def _lora_linear_grad(site: Site) -> dict[str, Any]:
    dy, x, w, a, b = (site.input(i) for i in range(5))
    grads = site.attr("grads")
    if len(grads) != len(site.outputs):
        raise site.error(f"grads={grads!r} names {len(grads)} outputs, the step has {len(site.outputs)}")
    outs = dict(zip(grads, site.outputs))
    site.require("float32", dy, x, w, a, b, *site.outputs)
    return dict(_lora_common(site, x, w, a, b), dy=Ref(dy),
                **{f"d{g}": Ref(outs[g]) if g in outs else None for g in "xab"})


def _matmul(site: Site) -> dict[str, Any]:
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


def _gather_copy(site: Site, x: str, y: str, sx_for_out: Shape, offset: int | None = None) -> dict[str, Any]:
    """y (dense) = x read with per-output-axis strides."""
    out = site.shape(y)
    shape, _, sx = coalesce(out, contiguous_strides(out), sx_for_out)
    args = dict(y=Ref(y), x=Ref(x), esize=esize(site, x), rank=len(shape), shape=shape, sx=sx)
    if offset is not None:
        args["offset"] = offset
    return args


def _transpose(site: Site) -> dict[str, Any]:
    x, y = site.input(0), site.outputs[0]
    shape = site.shape(x)
    perm = site.attr("perm")
    perm = tuple(reversed(range(len(shape)))) if perm is None else tuple(int(p) for p in perm)
    own = contiguous_strides(shape)
    return _gather_copy(site, x, y, tuple(own[p] for p in perm))


def _expand(site: Site) -> dict[str, Any]:
    x, y = site.input(0), site.outputs[0]
    return _gather_copy(site, x, y, broadcast_strides(site.shape(x), site.shape(y)))


def _slice_walk(site: Site, shape: Shape) -> tuple[int, Shape, Shape]:
    """(element offset, output shape, strides) of the slice of a dense tensor of ``shape``."""
    index = slice_index(shape, site.attr("starts"), site.attr("ends"), site.attr("axes"), site.attr("steps"))
    own = contiguous_strides(shape)
    offset, lengths, strides = 0, [], []
    for sl, n, s in zip(index, shape, own):
        start, stop, step = sl.indices(n)
        count = len(range(start, stop, step))
        offset += start * s if count else 0
        lengths.append(count)
        strides.append(step * s)
    return offset, tuple(lengths), tuple(strides)


def _slice(site: Site) -> dict[str, Any]:
    x, y = site.input(0), site.outputs[0]
    offset, lengths, strides = _slice_walk(site, site.shape(x))
    if lengths != site.shape(y):
        raise site.error(f"slice of {site.shape(x)} is {lengths}, the output is {site.shape(y)}")
    return _gather_copy(site, x, y, strides, offset)


def _slice_grad(site: Site) -> dict[str, Any]:
    dy, dx = site.input(0), site.outputs[0]
    full = tuple(int(d) for d in site.attr("shape"))
    offset, lengths, strides = _slice_walk(site, full)
    if lengths != site.shape(dy):
        raise site.error(f"slice of {full} is {lengths}, dy is {site.shape(dy)}")
    shape, _, sdx = coalesce(lengths, contiguous_strides(lengths), strides)
    return dict(dx=Ref(dx), dy=Ref(dy), esize=esize(site, dy), n_dx=size(full), offset=offset, rank=len(shape),
                shape=shape, sdx=sdx)


def _concat(site: Site) -> dict[str, Any]:
    xs, y = site.inputs, site.outputs[0]
    shape = site.shape(y)
    axis = norm_axis(int(site.attr("axis")), len(shape))
    outer, _, inner = split_at(shape, axis)
    return dict(y=Ref(y), xs=tuple(Ref(x) for x in xs), esize=esize(site, y), count=len(xs), outer=outer,
                chunk=tuple(site.shape(x)[axis] * inner for x in xs))


def _split(site: Site) -> dict[str, Any]:
    x, ys = site.input(0), site.outputs
    shape = site.shape(x)
    axis = norm_axis(int(site.attr("axis")), len(shape))
    outer, _, inner = split_at(shape, axis)
    parts = tuple(site.shape(y)[axis] for y in ys)
    if tuple(int(p) for p in site.attr("split")) != parts:
        raise site.error(f"split {tuple(site.attr('split'))} does not match the outputs' sizes {parts}")
    return dict(ys=tuple(Ref(y) for y in ys), x=Ref(x), esize=esize(site, x), count=len(ys), outer=outer,
                chunk=tuple(site.shape(y)[axis] * inner for y in ys))


def _dtype_code(site: Site, name: str) -> int:
    try:
        return DTYPE_CODES[site.dtype(name)]
    except KeyError:
        raise site.error(f"no C kernel for dtype {site.dtype(name)} of {name!r}") from None


def _cast(site: Site) -> dict[str, Any]:
    x, y = site.input(0), site.outputs[0]
    return dict(y=Ref(y), y_dtype=_dtype_code(site, y), x=Ref(x), x_dtype=_dtype_code(site, x),
                n=site.same_size(x, y))


def _shape(site: Site) -> dict[str, Any]:
    x, y = site.input(0), site.outputs[0]
    site.require("int64", y)
    dims = site.shape(x)[site.attr("start"):site.attr("end")]
    return dict(y=Ref(y), n=len(dims), dims=tuple(dims) or (0,))


def _gather(site: Site) -> dict[str, Any]:
    data, indices, y = site.input(0), site.input(1), site.outputs[0]
    if site.dtype(indices) not in ("int64", "int32"):
        raise site.error(f"indices {indices!r} must be int64 or int32, not {site.dtype(indices)}")
    shape = site.shape(data)
    outer, axis_len, inner = split_at(shape, norm_axis(int(site.attr("axis")), len(shape)))
    return dict(y=Ref(y), data=Ref(data), indices=Ref(indices), esize=esize(site, data),
                idx64=int(site.dtype(indices) == "int64"), outer=outer, axis_len=axis_len, inner=inner,
                nidx=size(site.shape(indices)))


def _reduce_into(site: Site, x: str, y: str, kept: Shape) -> dict[str, Any]:
    """y (``kept``: x's shape with 1 on every reduced axis, leading axes allowed to be missing) = Σ x."""
    xs = site.shape(x)
    site.require("float32", x, y)
    shape, _, sy = coalesce(xs, contiguous_strides(xs), broadcast_strides(kept, xs))
    return dict(y=Ref(y), x=Ref(x), ny=size(kept), rank=len(shape), shape=shape, sy=sy)


def _reduce(site: Site) -> dict[str, Any]:
    x, y = site.input(0), site.outputs[0]
    xs = site.shape(x)
    axes = _axes(len(xs), site.attr("axes"))
    site.attr("keepdims")  # keepdims changes the shape, not the layout
    kept = tuple(1 if i in axes else d for i, d in enumerate(xs))
    return _reduce_into(site, x, y, kept)


def _reduce_mean(site: Site) -> dict[str, Any]:
    xs = site.shape(site.input(0))
    return dict(_reduce(site), count=size([xs[a] for a in _axes(len(xs), site.attr("axes"))]))


def _reduce_sum_to(site: Site) -> dict[str, Any]:
    return _reduce_into(site, site.input(0), site.outputs[0], tuple(int(d) for d in site.attr("shape")))


def _window(site: Site, x_shape: Shape, kernel: Shape, out_channels: int, group: int, **attrs: Any) -> tuple:
    win = Window.of(site.op, x_shape, kernel, attrs.get("strides"), attrs.get("pads"), attrs.get("dilations"),
                    attrs.get("auto_pad", "NOTSET"), attrs.get("ceil_mode", 0))
    (h, w), (oh, ow) = win.in_hw, win.out_hw
    return (int(x_shape[0]), int(x_shape[1]), h, w, int(out_channels), oh, ow, *win.kernel, *win.strides,
            *win.dilations, win.pads[0], win.pads[1], win.pads[2], win.pads[3], int(group))


def _conv_attrs(site: Site) -> dict[str, Any]:
    return {k: site.attr(k) for k in ("strides", "pads", "dilations", "auto_pad")}


def _conv(site: Site) -> dict[str, Any]:
    x, w, b, y = site.input(0), site.input(1), site.optional(2), site.outputs[0]
    site.require("float32", x, w, b, y)
    wshape = site.shape(w)
    win = _window(site, site.shape(x), wshape[2:], wshape[0], site.attr("group"), **_conv_attrs(site))
    return dict(y=Ref(y), x=Ref(x), w=Ref(w), b=Ref(b) if b else None, win=win)


def _conv_grad_input(site: Site) -> dict[str, Any]:
    dy, w, dx = site.input(0), site.input(1), site.outputs[0]
    site.require("float32", dy, w, dx)
    wshape = site.shape(w)
    win = _window(site, tuple(site.attr("shape")), wshape[2:], wshape[0], site.attr("group"), **_conv_attrs(site))
    return dict(dx=Ref(dx), dy=Ref(dy), w=Ref(w), win=win)


def _conv_grad_weight(site: Site) -> dict[str, Any]:
    x, dy, dw = site.input(0), site.input(1), site.outputs[0]
    site.require("float32", x, dy, dw)
    win = _window(site, site.shape(x), tuple(site.attr("kernel_shape")), site.shape(dy)[1], site.attr("group"),
                  **_conv_attrs(site))
    return dict(dw=Ref(dw), x=Ref(x), dy=Ref(dy), win=win)


def _pool_win(site: Site, x_shape: Shape) -> tuple:
    kernel = tuple(site.attr("kernel_shape"))
    if len(kernel) != len(x_shape) - 2:
        raise site.error(f"kernel_shape {kernel} does not fit input {x_shape}")
    attrs = {k: site.attr(k) for k in ("strides", "pads", "dilations", "auto_pad", "ceil_mode")}
    return _window(site, x_shape, kernel, x_shape[1], 1, **attrs)


def _max_pool(site: Site) -> dict[str, Any]:
    x, y = site.input(0), site.outputs[0]
    site.require("float32", x, y)
    site.attr("storage_order")  # only matters for the Indices output, which is not supported
    return dict(y=Ref(y), x=Ref(x), win=_pool_win(site, site.shape(x)))


def _max_pool_grad(site: Site) -> dict[str, Any]:
    x, dy, dx = site.input(0), site.input(1), site.outputs[0]
    site.require("float32", x, dy, dx)
    return dict(dx=Ref(dx), x=Ref(x), dy=Ref(dy), win=_pool_win(site, site.shape(x)))


def _average_pool(site: Site) -> dict[str, Any]:
    x, y = site.input(0), site.outputs[0]
    site.require("float32", x, y)
    return dict(y=Ref(y), x=Ref(x), win=_pool_win(site, site.shape(x)),
                count_include_pad=int(site.attr("count_include_pad")))


def _average_pool_grad(site: Site) -> dict[str, Any]:
    dy, dx = site.input(0), site.outputs[0]
    site.require("float32", dy, dx)
    return dict(dx=Ref(dx), dy=Ref(dy), win=_pool_win(site, tuple(site.attr("shape"))),
                count_include_pad=int(site.attr("count_include_pad")))


def _global_average_pool(site: Site) -> dict[str, Any]:
    x, y = site.input(0), site.outputs[0]
    site.require("float32", x, y)
    shape = site.shape(x)
    return dict(y=Ref(y), x=Ref(x), planes=size(shape[:2]), plane_size=size(shape[2:]))


def _softmax_split(site: Site, name: str) -> tuple[int, int, int]:
    shape = site.shape(name)
    return split_at(shape, norm_axis(int(site.attr("axis")), len(shape)))


def _softmax(site: Site) -> dict[str, Any]:
    x, y = site.input(0), site.outputs[0]
    site.require("float32", x, y)
    outer, n, inner = _softmax_split(site, x)
    return dict(y=Ref(y), x=Ref(x), outer=outer, n=n, inner=inner)


def _softmax_grad(site: Site) -> dict[str, Any]:
    y, dy, dx = site.input(0), site.input(1), site.outputs[0]
    site.require("float32", y, dy, dx)
    outer, n, inner = _softmax_split(site, dy)
    return dict(dx=Ref(dx), y=Ref(y), dy=Ref(dy), outer=outer, n=n, inner=inner)


def _rows(site: Site, x: str) -> tuple[int, int, Shape]:
    shape = site.shape(x)
    axis = norm_axis(int(site.attr("axis")), len(shape))
    return size(shape[:axis]), size(shape[axis:]), shape[axis:]


def _repeat(site: Site, name: str, normalized: Shape) -> int:
    """Elements of a scale/bias that repeats along a normalized row (its shape, without leading 1s, must be
    a suffix of the normalized shape)."""
    shape = list(site.shape(name))
    while shape and shape[0] == 1:
        shape.pop(0)
    if tuple(shape) != tuple(normalized[len(normalized) - len(shape):]) or len(shape) > len(normalized):
        raise site.error(f"{name!r} of shape {site.shape(name)} broadcasts over the normalized shape "
                         f"{normalized} in a way the C kernel does not support (only trailing axes)")
    return size(shape)


def _layer_norm(site: Site) -> dict[str, Any]:
    x, scale, b, y = site.input(0), site.input(1), site.optional(2), site.outputs[0]
    site.require("float32", x, scale, b, y)
    rows, n, normalized = _rows(site, x)
    ns = _repeat(site, scale, normalized)
    if b is not None and _repeat(site, b, normalized) != ns:
        raise site.error(f"scale {site.shape(scale)} and bias {site.shape(b)} repeat differently")
    site.attr("stash_type")  # statistics are float32, as in the numpy reference
    return dict(y=Ref(y), x=Ref(x), scale=Ref(scale), bias=Ref(b) if b else None, rows=rows, n=n, ns=ns,
                epsilon=float(site.attr("epsilon")))


def _layer_norm_grad_input(site: Site) -> dict[str, Any]:
    x, scale, dy, dx = site.input(0), site.input(1), site.input(2), site.outputs[0]
    site.require("float32", x, scale, dy, dx)
    rows, n, normalized = _rows(site, x)
    return dict(dx=Ref(dx), x=Ref(x), scale=Ref(scale), dy=Ref(dy), rows=rows, n=n,
                ns=_repeat(site, scale, normalized), epsilon=float(site.attr("epsilon")))


def _layer_norm_grad_scale(site: Site) -> dict[str, Any]:
    x, dy, ds = site.input(0), site.input(1), site.outputs[0]
    site.require("float32", x, dy, ds)
    rows, n, _ = _rows(site, x)
    return dict(ds=Ref(ds), x=Ref(x), dy=Ref(dy), rows=rows, n=n, epsilon=float(site.attr("epsilon")))


def _batch_norm(site: Site) -> dict[str, Any]:
    x, scale, b, mean, var = (site.input(i) for i in range(5))
    y = site.outputs[0]
    site.require("float32", x, scale, b, mean, var, y)
    if int(site.attr("training_mode")):
        raise site.error("training_mode=1 is not supported")
    site.attr("momentum")  # only matters in training mode
    shape = site.shape(x)
    return dict(y=Ref(y), x=Ref(x), scale=Ref(scale), b=Ref(b), mean=Ref(mean), var=Ref(var), batch=shape[0],
                channels=shape[1], inner=size(shape[2:]), epsilon=float(site.attr("epsilon")))


def _cross_entropy_dims(site: Site, logits: str, labels: str) -> tuple[int, int]:
    site.require("float32", logits)
    site.require("int64", labels)
    shape = site.shape(logits)
    return size(shape[:-1]), shape[-1]


def _softmax_cross_entropy(site: Site) -> dict[str, Any]:
    logits, labels, loss = site.input(0), site.input(1), site.outputs[0]
    site.require("float32", loss)
    rows, classes = _cross_entropy_dims(site, logits, labels)
    return dict(loss=Ref(loss), logits=Ref(logits), labels=Ref(labels), rows=rows, classes=classes)


def _softmax_cross_entropy_grad(site: Site) -> dict[str, Any]:
    logits, labels, dy, dx = site.input(0), site.input(1), site.input(2), site.outputs[0]
    site.require("float32", dy, dx)
    rows, classes = _cross_entropy_dims(site, logits, labels)
    return dict(dx=Ref(dx), logits=Ref(logits), labels=Ref(labels), dy=Ref(dy), rows=rows, classes=classes)


def _mse(site: Site) -> dict[str, Any]:
    pred, target, loss = site.input(0), site.input(1), site.outputs[0]
    site.require("float32", pred, target, loss)
    return dict(loss=Ref(loss), pred=Ref(pred), target=Ref(target), n=site.same_size(pred, target))


def _mse_grad(site: Site) -> dict[str, Any]:
    pred, target, dy, dx = site.input(0), site.input(1), site.input(2), site.outputs[0]
    site.require("float32", pred, target, dy, dx)
    return dict(dx=Ref(dx), pred=Ref(pred), target=Ref(target), dy=Ref(dy), n=site.same_size(pred, target, dx))


def _sgd(site: Site) -> dict[str, Any]:
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


def _binary_template(kernel: str) -> Template:
    return Template(f"{kernel}(${{y}}, ${{a}}, ${{b}}, ${{rank}}, ${{shape}}, ${{sa}}, ${{sb}})", _binary)


def _unary_template(kernel: str) -> Template:
    return Template(f"{kernel}(${{y}}, ${{x}}, ${{n}})", _unary)


def _grad_template(kernel: str) -> Template:
    return Template(f"{kernel}(${{dx}}, ${{v}}, ${{dy}}, ${{n}})", _pair_grad)


# A step that target lowering put on RedMulE (Step.unit == "redmule") calls the HAL's kernel instead (tiled GEMM,
# fused LoRA layer), with the same arguments (compiler/codegen/hal/ef_hal.h); every board links a HAL, so the choice
# is the program's alone.
REDMULE_KERNELS: dict[str, str] = {"ef_gemm": "ef_hal_gemm", "ef_mat_mul": "ef_hal_mat_mul",
                                   "ef_lora_linear": "ef_hal_lora_linear",
                                   "ef_lora_linear_grad": "ef_hal_lora_linear_grad"}

TEMPLATES: dict[str, Template] = {
    # elementwise
    "Add": _binary_template("ef_add"),
    "Sub": _binary_template("ef_sub"),
    "Mul": _binary_template("ef_mul"),
    "Div": _binary_template("ef_div"),
    "Pow": _binary_template("ef_pow"),
    "Neg": _unary_template("ef_neg"),
    "Relu": _unary_template("ef_relu"),
    "Sigmoid": _unary_template("ef_sigmoid"),
    "Tanh": _unary_template("ef_tanh"),
    "Erf": _unary_template("ef_erf"),
    "Sqrt": _unary_template("ef_sqrt"),
    "Exp": _unary_template("ef_exp"),
    "Gelu": Template("ef_gelu(${y}, ${x}, ${n}, ${approximate})", _gelu),
    "ReluGrad": _grad_template("ef_relu_grad"),
    "SigmoidGrad": _grad_template("ef_sigmoid_grad"),
    "TanhGrad": _grad_template("ef_tanh_grad"),
    "ErfGrad": _grad_template("ef_erf_grad"),
    "GeluGrad": Template("ef_gelu_grad(${dx}, ${v}, ${dy}, ${n}, ${approximate})", _gelu_grad),
    # GEMM
    "Gemm": Template("ef_gemm(${y}, ${a}, ${b}, ${c}, ${m}, ${n}, ${k}, ${trans_a}, ${trans_b}, ${alpha}, ${beta}, "
                     "${c_rs}, ${c_cs})", _gemm),
    "MatMul": Template("ef_mat_mul(${y}, ${a}, ${b}, ${m}, ${n}, ${k}, ${brank}, ${bshape}, ${sa}, ${sb})", _matmul),
    "LoraLinear": Template("ef_lora_linear(${y}, ${x}, ${w}, ${a}, ${b}, ${c}, ${m}, ${n}, ${k}, ${r}, ${devices}, "
                           "${trans_b}, ${alpha}, ${beta}, ${c_rs}, ${c_cs}, ${scale})", _lora_linear),
    "LoraLinearGrad": Template("ef_lora_linear_grad(${dx}, ${da}, ${db}, ${dy}, ${x}, ${w}, ${a}, ${b}, ${m}, ${n}, "
                               "${k}, ${r}, ${devices}, ${trans_b}, ${alpha}, ${scale})", _lora_linear_grad),
    # data movement
    "Reshape": VIEW,
    "Identity": VIEW,
    "Squeeze": VIEW,
    "Unsqueeze": VIEW,
    "Transpose": Template("ef_transpose(${y}, ${x}, ${esize}, ${rank}, ${shape}, ${sx})", _transpose),
    "Expand": Template("ef_expand(${y}, ${x}, ${esize}, ${rank}, ${shape}, ${sx})", _expand),
    "Slice": Template("ef_slice(${y}, ${x}, ${esize}, ${offset}, ${rank}, ${shape}, ${sx})", _slice),
    "SliceGrad": Template("ef_slice_grad(${dx}, ${dy}, ${esize}, ${n_dx}, ${offset}, ${rank}, ${shape}, ${sdx})",
                          _slice_grad),
    "Concat": Template("ef_concat(${y}, ${xs}, ${esize}, ${count}, ${outer}, ${chunk})", _concat),
    "Split": Template("ef_split(${ys}, ${x}, ${esize}, ${count}, ${outer}, ${chunk})", _split),
    "Cast": Template("ef_cast(${y}, ${y_dtype}, ${x}, ${x_dtype}, ${n})", _cast),
    "Shape": Template("ef_shape(${y}, ${n}, ${dims})", _shape),
    "Gather": Template("ef_gather(${y}, ${data}, ${indices}, ${esize}, ${idx64}, ${outer}, ${axis_len}, ${inner}, "
                       "${nidx})", _gather),
    # reductions
    "ReduceSum": Template("ef_reduce_sum(${y}, ${x}, ${ny}, ${rank}, ${shape}, ${sy})", _reduce),
    "ReduceMean": Template("ef_reduce_mean(${y}, ${x}, ${ny}, ${rank}, ${shape}, ${sy}, ${count})", _reduce_mean),
    "ReduceSumTo": Template("ef_reduce_sum_to(${y}, ${x}, ${ny}, ${rank}, ${shape}, ${sy})", _reduce_sum_to),
    # sliding windows
    "Conv": Template("ef_conv(${y}, ${x}, ${w}, ${b}, ${win})", _conv),
    "ConvGradInput": Template("ef_conv_grad_input(${dx}, ${dy}, ${w}, ${win})", _conv_grad_input),
    "ConvGradWeight": Template("ef_conv_grad_weight(${dw}, ${x}, ${dy}, ${win})", _conv_grad_weight),
    "MaxPool": Template("ef_max_pool(${y}, ${x}, ${win})", _max_pool),
    "MaxPoolGrad": Template("ef_max_pool_grad(${dx}, ${x}, ${dy}, ${win})", _max_pool_grad),
    "AveragePool": Template("ef_average_pool(${y}, ${x}, ${win}, ${count_include_pad})", _average_pool),
    "AveragePoolGrad": Template("ef_average_pool_grad(${dx}, ${dy}, ${win}, ${count_include_pad})",
                                _average_pool_grad),
    "GlobalAveragePool": Template("ef_global_average_pool(${y}, ${x}, ${planes}, ${plane_size})",
                                  _global_average_pool),
    # normalizations
    "Softmax": Template("ef_softmax(${y}, ${x}, ${outer}, ${n}, ${inner})", _softmax),
    "SoftmaxGrad": Template("ef_softmax_grad(${dx}, ${y}, ${dy}, ${outer}, ${n}, ${inner})", _softmax_grad),
    "LayerNormalization": Template("ef_layer_normalization(${y}, ${x}, ${scale}, ${bias}, ${rows}, ${n}, ${ns}, "
                                   "${epsilon})", _layer_norm),
    "LayerNormGradInput": Template("ef_layer_norm_grad_input(${dx}, ${x}, ${scale}, ${dy}, ${rows}, ${n}, ${ns}, "
                                   "${epsilon})", _layer_norm_grad_input),
    "LayerNormGradScale": Template("ef_layer_norm_grad_scale(${ds}, ${x}, ${dy}, ${rows}, ${n}, ${epsilon})",
                                   _layer_norm_grad_scale),
    "BatchNormalization": Template("ef_batch_normalization(${y}, ${x}, ${scale}, ${b}, ${mean}, ${var}, ${batch}, "
                                   "${channels}, ${inner}, ${epsilon})", _batch_norm),
    # losses
    "SoftmaxCrossEntropy": Template("ef_softmax_cross_entropy(${loss}, ${logits}, ${labels}, ${rows}, ${classes})",
                                    _softmax_cross_entropy),
    "SoftmaxCrossEntropyGrad": Template("ef_softmax_cross_entropy_grad(${dx}, ${logits}, ${labels}, ${dy}, ${rows}, "
                                        "${classes})", _softmax_cross_entropy_grad),
    "MSELoss": Template("ef_mse_loss(${loss}, ${pred}, ${target}, ${n})", _mse),
    "MSELossGrad": Template("ef_mse_loss_grad(${dx}, ${pred}, ${target}, ${dy}, ${n})", _mse_grad),
    # optimizer (in place on param and velocity; no outputs)
    "SGD": Template("ef_sgd(${param}, ${grad}, ${lr}, ${velocity}, ${rows}, ${cols}, ${ld}, ${momentum}, "
                    "${weight_decay})", _sgd),
}


def site_of(step_name: str, op_name: str, inputs, outputs, attrs: Mapping[str, Any],
            shapes: Mapping[str, Shape], dtypes: Mapping[str, str]) -> Site:
    """A Site with the op's attributes resolved (defaults filled; unknown or missing ones are errors)."""
    op = get_op(op_name)
    resolved = op.resolve_attrs(dict(attrs), where=f"step {step_name!r}: ")
    return Site(step_name, op_name, tuple(inputs), tuple(outputs), shapes, dtypes, resolved)
