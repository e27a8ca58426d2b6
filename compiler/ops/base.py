"""The Op base class and the registry.

An op holds everything about itself in one class: attributes (keyword arguments of ``forward`` with their
defaults), shape rule (``infer``), numpy forward, gradient rule written in terms of other ops, FLOP count, its
kind (from which the op groups are derived), how the target cost model charges it (``cost``), and its C kernel
binding (``c_call`` and ``c_args``, see ``binding``). Defining a subclass with a ``name`` registers it; a name
defined twice is an error. Modules in this package are imported automatically (``compiler.ops.load_all``).
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np

from compiler.ir import CompileError
from compiler.ops.binding import Site, Template

if TYPE_CHECKING:  # pragma: no cover
    from compiler.autodiff import GradBuilder

Shape = tuple[int, ...]
REGISTRY: dict[str, "Op"] = {}

# Cost-model kinds. The target lowering charges each kind its own way.
KINDS = ("gemm", "conv", "elementwise", "reduction", "pool", "norm", "data", "loss", "optimizer")
# How the target cost model charges a step (compiler/targets/tiling.py): a GEMM view tiled for L1 and RedMulE,
# the fused LoRA row-panel kernels, the sum of the plain GEMM steps it runs ("composite": LoRA on a conv,
# compiler/targets/fused_conv.py), an int8 GEMM on the cores' 4-way int8 dot products (the quantized layers,
# compiler/targets/int8.py), a stream through L1 on the cores, or nothing (a view).
COSTS = ("gemm", "fused", "composite", "int8", "stream", "none")


class Op:
    name: ClassVar[str] = ""
    kind: ClassVar[str] = "elementwise"
    num_outputs: ClassVar[int] = 1  # -1: decided by the attributes (``infer`` returns a tuple of shapes)
    inplace: ClassVar[bool] = False   # output 0 may take input 0's buffer when input 0 dies at this step
    view: ClassVar[bool] = False      # output 0 is input 0 with another shape: same bytes, no copy
    foldable: ClassVar[bool] = True   # may be evaluated at compile time when all inputs are constant
    backward_only: ClassVar[bool] = False  # appears only in backward graphs (no ONNX equivalent)
    internal: ClassVar[bool] = False  # compiler-made (a loss, the optimizer, a fused layer): not in docs/ops.md
    c_call: ClassVar[str | None] = None  # the C kernel call with ${holes} (binding.py); "" for a view
    redmule: ClassVar[bool] = False   # the HAL runs it on RedMulE as ef_hal_<kernel> with the same arguments
    cluster: ClassVar[bool] = False   # the HAL streams it through L1 on all cores as ef_hal_<kernel> (same arguments)
    cost: ClassVar[str] = ""          # one of COSTS; "" derives it from ``view`` and ``kind``

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            return
        if cls.name in REGISTRY:
            raise TypeError(f"op {cls.name!r} is registered twice ({REGISTRY[cls.name].__class__.__qualname__}, "
                            f"{cls.__qualname__})")
        if cls.kind not in KINDS:
            raise TypeError(f"op {cls.name!r}: unknown kind {cls.kind!r}")
        if not cls.cost:
            cls.cost = "none" if cls.view else ("gemm" if cls.kind in ("gemm", "conv") else "stream")
        if cls.cost not in COSTS:
            raise TypeError(f"op {cls.name!r}: unknown cost {cls.cost!r}")
        REGISTRY[cls.name] = cls()

    # ---- the C kernel -------------------------------------------------------------------------------
    @property
    def template(self) -> Template | None:
        """The strict C call template with this op's argument builder; None if the op has no kernel."""
        return None if self.c_call is None else Template(self.c_call, self.c_args)

    @property
    def c_kernel(self) -> str:
        return self.template.kernel if self.c_call else ""

    @property
    def redmule_kernel(self) -> str:
        return "ef_hal_" + self.c_kernel[len("ef_"):] if self.redmule else ""

    @property
    def cluster_kernel(self) -> str:
        return "ef_hal_" + self.c_kernel[len("ef_"):] if self.cluster else ""

    def c_args(self, site: Site) -> Mapping[str, Any]:
        """Every hole of ``c_call`` from the step (binding.py); views have no call and no arguments."""
        return {}

    # ---- attributes -------------------------------------------------------------------------------

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

    def update_shape(self, shape: Shape, index: int = 0, **attrs: Any) -> Shape:
        """The shape of the part of updated input ``index`` this op writes (the cost model charges its bytes):
        all of it, unless the op updates a sub-tensor (an optimizer step of a sparse update)."""
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
