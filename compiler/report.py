"""The compile report: parameters, memory and FLOPs per training step (and, with a target, transfers and
cycles). ``build_report`` gives the JSON form (schema in docs/report.md); ``format_table`` the readable one."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from compiler.ir import Role
from compiler.ops import get_op

GEMM_KINDS = ("gemm", "conv")   # op kinds whose FLOPs are matrix products

if TYPE_CHECKING:  # pragma: no cover
    from compiler.ir import Graph
    from compiler.plan import MemoryPlan
    from compiler.program import Program


def _bytes(program: "Program", *roles: Role) -> int:
    wanted = {r.value for r in roles}
    return sum(t.nbytes for n, t in program.tensors.items() if t.role in wanted and n in program.values)


def layer_table(graph: "Graph") -> list[dict[str, Any]]:
    """Every parametrized layer of a tuned forward graph: its module path, ops, parameters with their shapes, and
    what the strategy does with it: "full" (every parameter trains), "partial", "lora" (adapted), "frozen"."""
    layers: dict[str, dict[str, Any]] = {}
    for node in graph.nodes:
        params = [i for i in node.inputs if i in graph.tensors and graph.tensors[i].role in (Role.FROZEN, Role.TRAINABLE)]
        if not params:
            continue
        entry = layers.setdefault(node.layer or node.name, {"layer": node.layer or node.name, "ops": [], "params": {}})
        if node.op not in entry["ops"]:
            entry["ops"].append(node.op)
        for name in params:
            entry["params"][name] = list(graph.tensors[name].shape)
    for entry in layers.values():
        roles = [graph.tensors[n].role for n in entry["params"] if not n.endswith((".lora_a", ".lora_b"))]
        if "LoraLinear" in entry["ops"]:
            entry["status"] = "lora"
        elif roles and all(r == Role.TRAINABLE for r in roles):
            entry["status"] = "full"
        elif any(r == Role.TRAINABLE for r in roles):
            entry["status"] = "partial"
        else:
            entry["status"] = "frozen"
    return list(layers.values())


def format_layers(layers: list[Mapping[str, Any]]) -> str:
    rows = [("layer", "op", "parameters", "tuning")]
    for entry in layers:
        params = ", ".join(f"{n.rpartition('.')[2] if '.' in n else n} {tuple(shape)}"
                           for n, shape in entry["params"].items())
        rows.append((entry["layer"] or "(top level)", "/".join(entry["ops"]), params, entry["status"]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)


def build_report(program: "Program", plan: "MemoryPlan", notes: Mapping[str, Any] | None = None,
                 layers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    params = {n: t for n, t in program.tensors.items() if t.role in (Role.FROZEN.value, Role.TRAINABLE.value)}
    trainable = {n: t for n, t in params.items() if t.role == Role.TRAINABLE.value}
    grad_bytes = 0
    updated = {}  # parameter -> elements its update writes (a sparse update writes only its chosen channels)
    for step in program.train.steps:
        if get_op(step.op).updates and len(step.inputs) > 1:
            grad_bytes += program.tensors[step.inputs[1]].nbytes
            updated[step.inputs[0]] = _elements(program.tensors[step.inputs[1]])
    flops = {"forward": 0, "backward": 0, "update": 0}
    gemm_flops = {"forward": 0, "backward": 0}
    for step in program.train.steps:
        flops[step.phase] += step.flops
        if step.phase in gemm_flops and get_op(step.op).kind in GEMM_KINDS:
            gemm_flops[step.phase] += step.flops
    fused = bool(program.optimizer.get("fused_update", True))
    notes = dict(notes or {})
    extra: dict[str, Any] = {
        "import": {"renamed": dict(notes.get("renamed", {})), "untied": dict(notes.get("untied", {})),
                   "rebatched": dict(notes.get("rebatched", {}))},
        "warnings": list(notes.get("warnings", [])),
        "layers": list(layers or []),
    }
    if "lora_targets" in notes:
        extra["lora_targets"] = list(notes["lora_targets"])
    if "int8" in notes:
        extra["int8"] = dict(notes["int8"])
    return {**extra,
        "model": program.model, "batch": program.batch, "task": program.task, "tuning": dict(program.tuning),
        "params": {"total": sum(_elements(t) for t in params.values()),
                   "trainable": sum(updated.get(n, _elements(t)) for n, t in trainable.items()),
                   "trainable_tensors": len(trainable)},
        "memory": {
            "frozen_weights_bytes": _bytes(program, Role.FROZEN),
            "trainable_bytes": _bytes(program, Role.TRAINABLE),
            "gradient_bytes": grad_bytes,
            "optimizer_state_bytes": _bytes(program, Role.OPT_STATE),
            "constant_bytes": _bytes(program, Role.CONSTANT, Role.HYPER),
            "params_region_bytes": program.params_bytes,
            "arena_bytes": plan.arena_bytes,
            "arena_lower_bound_bytes": plan.lower_bound_bytes,
            "arena_over_lower_bound": round(plan.arena_bytes / max(plan.lower_bound_bytes, 1), 4),
            "eval_arena_bytes": program.evaluate.arena_bytes,
            "total_bytes": program.params_bytes + plan.arena_bytes,
        },
        "flops": {**flops, "total": sum(flops.values()),
                  "gemm_forward": gemm_flops["forward"], "gemm_backward": gemm_flops["backward"],
                  "optimizer": flops["update"], "gemm_macs": (gemm_flops["forward"] + gemm_flops["backward"]) // 2},
        # "dynamic memory" as papers count it: the arena alone, and with the gradient buffers that an
        # accumulate-then-update loop (fused_update = false) keeps beside it
        "dynamic_memory": {"fused_update": fused, "arena_bytes": plan.arena_bytes,
                           "gradient_buffers_bytes": grad_bytes,
                           "arena_plus_gradient_buffers_bytes": plan.arena_bytes + grad_bytes},
        "steps": {"train": len(program.train.steps), "evaluate": len(program.evaluate.steps),
                  "inplace": plan.inplace_steps},
    }


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}" if unit == "" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def format_table(report: Mapping[str, Any]) -> str:
    rows: list[tuple[str, str]] = [
        ("model", f"{report['model']} (batch {report['batch']}, {report['task']})"),
        ("tuning", _tuning_text(report["tuning"])),
        *((("LoRA layers", ", ".join(report["lora_targets"]) or "none"),) if "lora_targets" in report else ()),
        ("parameters", f"{report['params']['total']:,} total, {report['params']['trainable']:,} trainable "
                       f"({100 * report['params']['trainable'] / max(report['params']['total'], 1):.2f} %)"),
    ]
    m = report["memory"]
    rows += [
        ("frozen weights", _kib(m["frozen_weights_bytes"])),
        ("trainable params", _kib(m["trainable_bytes"])),
        ("gradients", _kib(m["gradient_bytes"]) + " (each freed right after its update)"),
        ("optimizer state", _kib(m["optimizer_state_bytes"])),
        ("arena", f"{_kib(m['arena_bytes'])} (lower bound {_kib(m['arena_lower_bound_bytes'])}, "
                  f"x{m['arena_over_lower_bound']:.3f})"),
        ("total memory", _kib(m["total_bytes"])),
    ]
    f = report["flops"]
    rows += [("FLOPs / step", f"{_human(f['total'])} = fwd {_human(f['forward'])} + bwd {_human(f['backward'])} "
                              f"+ update {_human(f['update'])}")]
    for key, label in (("transfers", "DMA / step"), ("perf", "target")):
        if key in report:
            rows += [(label, _target_text(key, report[key]))]
    if "memory_by_level" in report:
        rows += [("memory by level", ", ".join(f"{k} {_kib(v)}" for k, v in report["memory_by_level"].items()))]
    untied = report.get("import", {}).get("untied", {})
    if untied:
        rows += [("untied", f"{len(untied)} tensor(s) the exporter had merged: " + ", ".join(sorted(untied)))]
    rows += [("warning", w) for w in report.get("warnings", [])]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _tuning_text(t: Mapping[str, Any]) -> str:
    text = t["strategy"]
    if t["strategy"] == "lora":
        text += f" rank {t['rank']} alpha {t['alpha']} on {', '.join(t['targets'])}"
    if t.get("train"):
        text += f"; train {', '.join(t['train'])}"
    if t.get("last_k"):
        text += f"; last {t['last_k']} blocks"
    if t.get("bias_only"):
        text += "; biases"
    if t.get("sparse"):
        text += " " + ", ".join(f"{layer} {choice}" for layer, choice in t["sparse"].items())
    return text


def _target_text(key: str, data: Mapping[str, Any]) -> str:
    if key == "transfers":
        links = ", ".join(f"{k} {_kib(v)}" for k, v in data["bytes_by_link"].items())
        return f"{_kib(data['total_bytes'])} ({links})"
    return (f"{data['cycles_per_step']:,} cycles/step, {data['images_per_second']:.1f} images/s, "
            f"{data['flop_per_cycle']:.2f} FLOP/cycle")


def _elements(t: Any) -> int:
    return int(np.prod(t.shape, dtype=np.int64))
