"""How an op binds to its C kernel: a strict template and the typed values of its holes.

A template is a C call with named holes, ``ef_add(${y}, ${a}, ${b}, ...)``; an op holds its own (``Op.c_call``)
and the argument builder that computes every hole from the step (``Op.c_args``: operand shapes, dtypes,
attributes). ``bind`` checks both ways: a hole the builder did not fill, or a value for no hole, is a
CompileError naming the op and the key; a missing attribute is one too. The bound arguments are typed values
(``Ref`` for a tensor, int, float, a tuple of ints for a ``const int[]``, a tuple of Refs for a pointer array,
None for NULL), rendered to C by ``compiler.codegen.emit`` and passed through ctypes by the kernel tests, so
both exercise the same binding. The builders shared by several ops live here; the rest sit beside their op.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from compiler.ir import DTYPE_BYTES, CompileError
from compiler.ops.layout import broadcast_strides, coalesce, contiguous_strides, size

Shape = tuple[int, ...]

DTYPE_CODES = {"float32": 0, "float64": 1, "int64": 2, "int32": 3, "bool": 4, "int8": 5}  # EF_F32 ... in ef_kernels.h
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


def esize(site: Site, name: str) -> int:
    return DTYPE_BYTES[site.dtype(name)]


def dtype_code(site: Site, name: str) -> int:
    try:
        return DTYPE_CODES[site.dtype(name)]
    except KeyError:
        raise site.error(f"no C kernel for dtype {site.dtype(name)} of {name!r}") from None


# ---- builders shared by op families ----------------------------------------------------------------------
def binary_args(site: Site) -> dict[str, Any]:
    """y = f(a, b) with numpy broadcasting, as strides over the coalesced output."""
    a, b, y = site.input(0), site.input(1), site.outputs[0]
    site.require("float32", a, b, y)
    out = site.shape(y)
    try:
        shape, sy, sa, sb = coalesce(out, contiguous_strides(out), broadcast_strides(site.shape(a), out),
                                     broadcast_strides(site.shape(b), out))
    except ValueError as exc:
        raise site.error(str(exc)) from None
    return dict(y=Ref(y), a=Ref(a), b=Ref(b), rank=len(shape), shape=shape, sa=sa, sb=sb)


def unary_args(site: Site) -> dict[str, Any]:
    x, y = site.input(0), site.outputs[0]
    site.require("float32", x, y)
    return dict(y=Ref(y), x=Ref(x), n=site.same_size(x, y))


def pair_grad_args(site: Site) -> dict[str, Any]:
    """dx from (y or x, dy), all the same size."""
    v, dy, dx = site.input(0), site.input(1), site.outputs[0]
    site.require("float32", v, dy, dx)
    return dict(dx=Ref(dx), v=Ref(v), dy=Ref(dy), n=site.same_size(v, dy, dx))


def gather_copy_args(site: Site, x: str, y: str, sx_for_out: Shape, offset: int | None = None) -> dict[str, Any]:
    """y (dense) = x read with per-output-axis strides."""
    out = site.shape(y)
    shape, _, sx = coalesce(out, contiguous_strides(out), sx_for_out)
    args = dict(y=Ref(y), x=Ref(x), esize=esize(site, x), rank=len(shape), shape=shape, sx=sx)
    if offset is not None:
        args["offset"] = offset
    return args


def reduce_into_args(site: Site, x: str, y: str, kept: Shape) -> dict[str, Any]:
    """y (``kept``: x's shape with 1 on every reduced axis, leading axes allowed to be missing) = Σ x."""
    xs = site.shape(x)
    site.require("float32", x, y)
    shape, _, sy = coalesce(xs, contiguous_strides(xs), broadcast_strides(kept, xs))
    return dict(y=Ref(y), x=Ref(x), ny=size(kept), rank=len(shape), shape=shape, sy=sy)


def c_strides(site: Site, c: str | None, m: int, n: int) -> tuple[int, int]:
    """Row and column strides of a GEMM's C input broadcast to (m, n); (0, 0) without C."""
    if c is None:
        return 0, 0
    try:
        return broadcast_strides(site.shape(c), (m, n))
    except ValueError as exc:
        raise site.error(str(exc)) from None
