"""The compile report: parameters, memory and FLOPs per training step (and, with a target, transfers and
cycles). ``build_report`` gives the JSON form (schema in docs/report.md); ``format_table`` the readable one."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from compiler.ir import Role
from compiler.ops import get_op

if TYPE_CHECKING:  # pragma: no cover
    from compiler.plan import MemoryPlan
    from compiler.program import Program


def _bytes(program: "Program", *roles: Role) -> int:
    wanted = {r.value for r in roles}
    return sum(t.nbytes for n, t in program.tensors.items() if t.role in wanted and n in program.values)


def build_report(program: "Program", plan: "MemoryPlan") -> dict[str, Any]:
    params = {n: t for n, t in program.tensors.items() if t.role in (Role.FROZEN.value, Role.TRAINABLE.value)}
    trainable = {n: t for n, t in params.items() if t.role == Role.TRAINABLE.value}
    grad_bytes = 0
    updated = {}  # parameter -> elements its update writes (a sparse update writes only its chosen channels)
    for step in program.train.steps:
        if get_op(step.op).updates and len(step.inputs) > 1:
            grad_bytes += program.tensors[step.inputs[1]].nbytes
            updated[step.inputs[0]] = program.tensors[step.inputs[1]].nbytes // 4
    flops = {"forward": 0, "backward": 0, "update": 0}
    for step in program.train.steps:
        flops[step.phase] += step.flops
    return {
        "model": program.model, "batch": program.batch, "task": program.task, "tuning": dict(program.tuning),
        "params": {"total": sum(t.nbytes // 4 for t in params.values()),
                   "trainable": sum(updated.get(n, t.nbytes // 4) for n, t in trainable.items()),
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
        "flops": {**flops, "total": sum(flops.values())},
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
