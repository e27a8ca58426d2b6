"""The Op base class and the registry.

An op holds everything about itself in one class: attributes (keyword arguments of ``forward`` with their
defaults), shape rule (``infer``), numpy forward, gradient rule written in terms of other ops, FLOP count,
cost-model kind and C kernel name. Defining a subclass with a ``name`` registers it; a name defined twice
is an error. Modules in this package are imported automatically (``compiler.ops.load_all``).
"""
from __future__ import annotations

import inspect
import re
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np

from compiler.ir import CompileError

if TYPE_CHECKING:  # pragma: no cover
    from compiler.autodiff import GradBuilder

Shape = tuple[int, ...]
REGISTRY: dict[str, "Op"] = {}

# Cost-model kinds. The target lowering charges each kind its own way.
KINDS = ("gemm", "conv", "elementwise", "reduction", "pool", "norm", "data", "loss", "optimizer")


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Op:
    name: ClassVar[str] = ""
    kind: ClassVar[str] = "elementwise"
    num_outputs: ClassVar[int] = 1  # -1: decided by the attributes (``infer`` returns a tuple of shapes)
    inplace: ClassVar[bool] = False   # output 0 may take input 0's buffer when input 0 dies at this step
    view: ClassVar[bool] = False      # output 0 is input 0 with another shape: same bytes, no copy
    foldable: ClassVar[bool] = True   # may be evaluated at compile time when all inputs are constant
    backward_only: ClassVar[bool] = False  # appears only in backward graphs (no ONNX equivalent)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            return
        if cls.name in REGISTRY:
            raise TypeError(f"op {cls.name!r} is registered twice ({REGISTRY[cls.name].__class__.__qualname__}, "
                            f"{cls.__qualname__})")
        if cls.kind not in KINDS:
            raise TypeError(f"op {cls.name!r}: unknown kind {cls.kind!r}")
        REGISTRY[cls.name] = cls()

    # ---- attributes -------------------------------------------------------------------------------
    @property
    def c_kernel(self) -> str:
        return "ef_" + _snake(self.name)

    def attr_defaults(self) -> dict[str, Any]:
        params = inspect.signature(self.forward).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def resolve_attrs(self, attrs: dict[str, Any], where: str = "") -> dict[str, Any]:
        defaults = self.attr_defaults()
        unknown = set(attrs) - set(defaults)
        if unknown:
            raise CompileError(f"{where}op {self.name} does not support attribute(s) {sorted(unknown)}")
        out = dict(defaults)
        out.update(attrs)
        missing = [k for k, v in out.items() if v is inspect.Parameter.empty]
        if missing:
            raise CompileError(f"{where}op {self.name} needs attribute(s) {missing}")
        return out

    # ---- semantics ----------------------------------------------------------------------------------
    def infer(self, *shapes: Shape, **attrs: Any) -> Shape | tuple[Shape, ...]:
        """Output shape(s) from input shapes. Default: elementwise with numpy broadcasting."""
        return tuple(np.broadcast_shapes(*shapes))

    def out_dtypes(self, dtypes: Sequence[str], **attrs: Any) -> str | tuple[str, ...]:
        """One dtype for every output, or a tuple with one per output. Default: the first input's."""
        return dtypes[0] if dtypes else "float32"

    def forward(self, *xs: np.ndarray, **attrs: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        raise NotImplementedError

    def forward_into(self, outs: Sequence[np.ndarray], *xs: np.ndarray, **attrs: Any) -> None:
        """Store ``forward``'s result(s) in the preallocated ``outs`` (the executor's planned views).

        Ops override this to write straight into ``outs`` (numpy ``out=``) and skip the temporary and the copy;
        an override computes exactly what ``forward`` does, in the same order. The executor calls an override
        only when every input and output has one dtype and no output overlaps an input, except an output that
        is the very same array as an input of an ``inplace`` or ``updates`` op (an in-place Add, SGD's update)."""
        result = self.forward(*xs, **attrs)
        for out, value in zip(outs, result if isinstance(result, tuple) else (result,)):
            np.copyto(out, value, casting="same_kind")

    def gradient(self, g: "GradBuilder", x: tuple[str, ...], y: tuple[str, ...],
                 dy: tuple[str | None, ...], **attrs: Any) -> tuple[str | None, ...]:
        """Names of the gradients of the inputs, built with ``g.emit``; None where not needed."""
        raise CompileError(f"op {self.name} has no gradient rule")

    def flops(self, out_shapes: tuple[Shape, ...], *in_shapes: Shape, **attrs: Any) -> int:
        """Floating-point operations (a multiply-add counts 2). Default: one per output element."""
        return int(sum(np.prod(s, dtype=np.int64) for s in out_shapes))

    # in-place parameter updates: indices of inputs that ``forward``'s results are written back into
    updates: ClassVar[tuple[int, ...]] = ()

    def update_shape(self, shape: Shape, **attrs: Any) -> Shape:
        """The shape of the part of an updated input this op writes (the cost model charges its bytes): all of
        it, unless the op updates a sub-tensor (SGD of a sparse update)."""
        return tuple(shape)

    # ---- helpers used by the passes -----------------------------------------------------------------
    def output_specs(self, shapes: Sequence[Shape], dtypes: Sequence[str],
                     attrs: dict[str, Any]) -> tuple[tuple[Shape, str], ...]:
        """(shape, dtype) of every output."""
        result = self.infer(*shapes, **attrs)
        out_shapes = (result,) if self.num_outputs == 1 else tuple(result)
        out_dtypes = self.out_dtypes(dtypes, **attrs)
        if isinstance(out_dtypes, str):
            out_dtypes = (out_dtypes,) * len(out_shapes)
        return tuple((tuple(int(d) for d in s), t) for s, t in zip(out_shapes, out_dtypes))

    def run(self, inputs: Sequence[np.ndarray], attrs: dict[str, Any]) -> tuple[np.ndarray, ...]:
        result = self.forward(*inputs, **attrs)
        return result if isinstance(result, tuple) else (result,)


def get_op(name: str) -> Op:
    try:
        return REGISTRY[name]
    except KeyError:
        raise CompileError(f"unsupported op {name!r}; supported: {', '.join(sorted(REGISTRY))}") from None
