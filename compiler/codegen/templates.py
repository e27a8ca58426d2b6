"""The op → C kernel call table, derived from the registry: every op holds its own strict template
(``Op.c_call``) and argument builder (``Op.c_args``); see ``compiler/ops/binding.py`` for the binding rules.

A step that target lowering put on RedMulE (Step.unit == "redmule") calls the HAL's kernel instead (tiled GEMM,
fused LoRA layer) with the same arguments (compiler/codegen/hal/ef_hal.h); the ops that have one say so
(``Op.redmule``). Likewise a streamed step on the cores (Step.unit == "cluster") calls the HAL's L1-tiled, all-core
version (hal/ef_hal_stream.c) of the ops that have one (``Op.cluster``). Every board links a HAL, so the choice is the program's alone.
"""
from __future__ import annotations

from typing import Any, Mapping

from compiler.ir import CompileError
from compiler.ops import REGISTRY, get_op
from compiler.ops.binding import Ref, Site, Template, bind

Shape = tuple[int, ...]

VIEW = Template("")

TEMPLATES: dict[str, Template] = {name: op.template for name, op in REGISTRY.items() if op.template is not None}
REDMULE_KERNELS: dict[str, str] = {op.c_kernel: op.redmule_kernel for op in REGISTRY.values() if op.redmule}
CLUSTER_KERNELS: dict[str, str] = {op.c_kernel: op.cluster_kernel for op in REGISTRY.values() if op.cluster}


def template_for(op: str, step: str = "") -> Template:
    try:
        return TEMPLATES[op]
    except KeyError:
        raise CompileError(f"step {step!r}: op {op} has no C kernel template (its class in compiler/ops has "
                           "no c_call)") from None


def site_of(step_name: str, op_name: str, inputs, outputs, attrs: Mapping[str, Any],
            shapes: Mapping[str, Shape], dtypes: Mapping[str, str]) -> Site:
    """A Site with the op's attributes resolved (defaults filled; unknown or missing ones are errors)."""
    op = get_op(op_name)
    resolved = op.resolve_attrs(dict(attrs), where=f"step {step_name!r}: ")
    return Site(step_name, op_name, tuple(inputs), tuple(outputs), shapes, dtypes, resolved)


__all__ = ["CLUSTER_KERNELS", "REDMULE_KERNELS", "TEMPLATES", "VIEW", "Ref", "Site", "Template", "bind", "site_of", "template_for"]
