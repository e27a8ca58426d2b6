"""``lower_to_target``: place tensors per memory level, tile every step for L1, choose RedMulE or the cores,
charge cycles, and add transfers / perf / memory_by_level to the report. The Program given is not changed."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from compiler.program import Program
from compiler.targets.placement import PHASES, Placement, place
from compiler.targets.spec import Target
from compiler.targets.tiling import StepCost, cost_step

LINK_ORDER = ("L3->L2", "L2->L3", "L2->L1", "L1->L2")


def cost_program(program: Program, target: Target,
                 placement: Placement | None = None) -> dict[str, list[StepCost]]:
    """The cost of every step of both phases (the lowering's working state, for inspection and tests)."""
    placement = placement or place(program, target)
    cache: dict = {}
    return {name: [cost_step(s, program.tensors, placement.phase_levels[name], target, cache)
                   for s in getattr(program, name).steps] for name in PHASES}


def lower_to_target(program: Program, target: Target) -> Program:
    placement = place(program, target)
    costs = cost_program(program, target, placement)
    tensors = {n: dataclasses.replace(t, level=placement.levels.get(n, t.level)) for n, t in program.tensors.items()}
    phases = {}
    for name in PHASES:
        phase = getattr(program, name)
        steps = tuple(dataclasses.replace(s, unit=c.unit, cycles=c.cycles) for s, c in zip(phase.steps, costs[name]))
        phases[name] = dataclasses.replace(phase, steps=steps)
    described = {"name": target.name, "clock_mhz": target.clock_mhz}
    report = {**program.report, **target_report(program, target, placement, costs), "target": described}
    return program.replace(tensors=tensors, train=phases["train"], evaluate=phases["evaluate"], report=report,
                           target=described)


def target_report(program: Program, target: Target, placement: Placement,
                  costs: Mapping[str, Sequence[StepCost]]) -> dict[str, Any]:
    train = costs["train"]
    by_link = {link: sum(c.bytes_by_link.get(link, 0) for c in train) for link in LINK_ORDER}
    cycles = sum(c.cycles for c in train)
    flops = sum(s.flops for s in program.train.steps)
    on_redmule = [c for c in train if c.unit == "redmule"]
    redmule_cycles = sum(c.cycles for c in on_redmule)
    peak = target.redmule.fp32_macs_per_cycle if target.redmule else 0
    utilization = sum(c.macs for c in on_redmule) / (peak * redmule_cycles) if redmule_cycles else 0.0
    return {
        "transfers": {"bytes_by_link": by_link, "total_bytes": sum(by_link.values()),
                      "dma_cycles": sum(c.dma_cycles for c in train)},
        "perf": {
            "cycles_per_step": cycles,
            "training_cycles": sum(c.cycles for c, s in zip(train, program.train.steps) if s.phase != "update"),
            "optimizer_cycles": sum(c.cycles for c, s in zip(train, program.train.steps) if s.phase == "update"),
            "images_per_second": program.batch * target.clock_mhz * 1e6 / cycles if cycles else 0.0,
            "flop_per_cycle": flops / cycles if cycles else 0.0,
            "redmule_utilization": round(utilization, 4),
            "time_share_by_kind": _shares(train, lambda c: c.kind, cycles),
            "time_share_by_unit": _shares(train, lambda c: c.unit, cycles),
            "eval_cycles_per_batch": sum(c.cycles for c in costs["evaluate"]),
        },
        "memory_by_level": {"L1": max((c.l1_bytes for cs in costs.values() for c in cs), default=0),
                            "L2": placement.bytes_by_level["L2"], "L3": placement.bytes_by_level["L3"]},
        "placement": {"l3_tensors": list(placement.demoted), "arena_bytes": placement.arena_bytes,
                      "arena_l2_bytes": placement.arena_l2_bytes},
    }


def _shares(costs: Sequence[StepCost], key, total: int) -> dict[str, float]:
    shares: dict[str, float] = {}
    for c in costs:
        shares[key(c)] = shares.get(key(c), 0) + c.cycles
    return {k: round(v / total, 4) for k, v in sorted(shares.items(), key=lambda kv: -kv[1]) if total}
