"""docs/ops.md, generated from the registry: every op an ONNX model may contain (ops the compiler makes for
itself — backward helpers, losses, the optimizer, the fused LoRA layer — are left out).

    python3 -m compiler.catalog > docs/ops.md      (tests/compiler/test_ops_doc.py checks it is current)
"""
from __future__ import annotations

import inspect

from compiler.ops.base import REGISTRY, Op

# ONNX ops the frontend rewrites into registered ones (compiler/frontend.py)
IMPORT_REWRITES = {
    "BatchNormalization": "inference form, folded to a per-channel Mul and Add (frozen)",
    "CastLike": "a Cast to the other input's dtype",
    "Constant": "a constant tensor",
    "Dropout": "Identity (inference)",
    "Flatten": "Reshape",
    "Erf-form GELU": "x·0.5·(1 + erf(x/√2)) is fused into Gelu",
    "Where(x > 20, x, Softplus(x))": "the dynamo exporter's Softplus, fused into Softplus",
}


def _has_gradient(op: Op) -> bool:
    return type(op).gradient is not Op.gradient


def _attrs(op: Op) -> str:
    defaults = op.attr_defaults()
    parts = [k if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in defaults.items()]
    return ", ".join(parts) if parts else "—"


def _summary(op: Op) -> str:
    doc = inspect.cleandoc(type(op).__dict__.get("__doc__") or "")  # the op's own, not a base class's
    first = doc.split("\n\n")[0].replace("\n", " ").strip()
    return first.replace("|", "\\|")


def public_ops() -> list[Op]:
    return [op for name, op in sorted(REGISTRY.items()) if not (op.backward_only or op.internal)]


def render() -> str:
    lines = [
        "# Supported ONNX ops",
        "",
        "Generated from the op registry by `python3 -m compiler.catalog > docs/ops.md`; a test keeps it current.",
        "Every op below has a shape rule, a numpy forward, FLOPs and a C kernel; *trains* says whether it has a",
        "gradient rule (an op without one may still appear where nothing trainable lies behind it).",
        "",
        "A node whose inputs are all constants once the batch is fixed (the exporters' shape arithmetic:",
        "Shape, ConstantOfShape, Equal, Where, Mod, Range, Gather, Unsqueeze, Concat, Cast, ...) is evaluated at",
        "compile time, by ONNX's reference implementation when the registry lacks the op, so any standard ONNX op",
        "may appear there. Attributes that ONNX passes as constant inputs (Reshape's shape, Slice's bounds, Clip's",
        "min and max, the reductions' axes, ...) must be constants.",
        "",
        "| op | kind | trains | attributes | C kernel | notes |",
        "|---|---|---|---|---|---|",
    ]
    for op in public_ops():
        kernel = f"`{op.c_kernel}`" if op.c_kernel else "none (a view)"
        lines.append(f"| {op.name} | {op.kind} | {'yes' if _has_gradient(op) else 'no'} | {_attrs(op)} | {kernel} | "
                     f"{_summary(op)} |")
    lines += ["", "Rewritten on import:", ""]
    lines += [f"- {name}: {what}" for name, what in IMPORT_REWRITES.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
