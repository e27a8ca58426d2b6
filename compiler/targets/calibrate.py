"""Calibration of a target's cycle constants against measured cycles (GVSoC): the error table and the fit.

A ``Measurement`` is one program step measured on the simulator (its cycles from the firmware's per-step
profile) beside the model's cycles for the same step on the same unit. Each step's modelled cycles are governed
by one constant of the target file (``governing_key``):

    unit redmule                        redmule.fp32_macs_per_cycle        (cycles ~ 1 / value)
    unit cluster, a GEMM (macs > 0)     cluster.gemm_macs_per_cycle_per_core (cycles ~ 1 / value)
    unit cluster, op with an override   cluster.op_cycles_per_element.<op> (cycles ~ value)
    unit cluster, otherwise             cluster.cycles_per_element.<kind>  (cycles ~ value)

``fit`` minimises the squared log errors of every group and every whole step over the constants together
(Levenberg-Marquardt, re-costing the programs: fork, DMA and pipelining make the model affine or flat in a
constant, and fused steps couple constants),
and ``fitted_toml`` writes the target file with the new values and, beside each, the errors before and after.
Runs nothing itself: ``fleet.calibrate`` measures on GVSoC and calls these. docs/target.md has the method.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import numpy as np

from compiler.program import Program
from compiler.targets.lower import cost_program
from compiler.targets.placement import place
from compiler.targets.spec import LINKS, Target, TargetError
from compiler.targets.tiling import StepCost, cost_step

INVERSE_KEYS = ("redmule.fp32_macs_per_cycle", "cluster.gemm_macs_per_cycle_per_core")
# constants every step pays, fitted jointly with the governing ones (start values where the file has none): the
# fork, the step's own overhead, and the cluster DMA's fixed cost per transfer (each tile's loads and stores)
GLOBAL_KEYS = {"cluster.fork_cycles": 100.0, "options.step_overhead_cycles": 100.0,
               "dma.l2_to_l1.latency_cycles": 80.0, "dma.l1_to_l2.latency_cycles": 80.0,
               "dma.l2_to_l1.bandwidth_bytes_per_cycle": 8.0, "dma.l1_to_l2.bandwidth_bytes_per_cycle": 8.0}
INTEGER_KEYS = ("cluster.fork_cycles", "options.step_overhead_cycles", "dma.l2_to_l1.latency_cycles",
                "dma.l1_to_l2.latency_cycles")
LINK_FIELDS = ("latency_cycles", "bandwidth_bytes_per_cycle")
LINK_KEYS = {f"dma.{table}.{name}": (link, name) for link, table in LINKS.items() for name in LINK_FIELDS}
FIT_ROUNDS = 12
FD_STEP = 0.05                     # finite-difference step on log(constant)
FIT_RANGE = 1e4                    # a fitted constant stays within 1e-4..1e4 times its start value
FIT_RANGE_LOG = math.log(FIT_RANGE)
SETTLE_ROUNDS = 4                  # ratio steps of the governing constants per trial of the global ones
TABLE_VERSION = 1


@dataclass(frozen=True)
class Measurement:
    program: str                 # label of the measured program, e.g. "deep-ae/lora"
    phase: str                   # "train" | "evaluate"
    index: int                   # the step's index in the phase
    name: str
    op: str
    kind: str                    # the cost model's kind (StepCost.kind)
    unit: str                    # the unit the firmware ran it on (the lowering's choice)
    macs: int
    model_cycles: int            # the model's cycles on that unit, with the target the table was measured for
    measured_cycles: int         # GVSoC: cycles of cluster core 0 for the step, per training step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Measurement":
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class StepTotal:
    """One whole training step of a program: measured (mcycle around the step) and modelled."""
    program: str
    model_cycles: int
    measured_cycles: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CalibrationTable:
    target: str                                  # the target the model cycles are for
    measurements: tuple[Measurement, ...]
    steps: tuple[StepTotal, ...] = ()
    simulator: str = ""                          # what measured (e.g. "GVSoC siracusa, gvsoc 209c147")
    notes: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": TABLE_VERSION, "target": self.target, "simulator": self.simulator,
                "notes": dict(self.notes), "measurements": [m.to_dict() for m in self.measurements],
                "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "calibration table") -> "CalibrationTable":
        if raw.get("version") != TABLE_VERSION:
            raise TargetError(f"{where}: version {raw.get('version')!r}, expected {TABLE_VERSION}")
        try:
            return cls(raw["target"], tuple(Measurement.from_dict(m) for m in raw["measurements"]),
                       tuple(StepTotal(**s) for s in raw.get("steps", [])), raw.get("simulator", ""),
                       MappingProxyType(dict(raw.get("notes", {}))))
        except (KeyError, TypeError) as exc:
            raise TargetError(f"{where}: malformed ({exc})") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationTable":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TargetError(f"{path}: cannot read the calibration table ({exc})") from None
        return cls.from_dict(raw, str(path))


def governing_key(target: Target, unit: str, op: str, kind: str, macs: int) -> str:
    """The target-file key whose value the step's modelled cycles follow."""
    if unit == "redmule":
        return "redmule.fp32_macs_per_cycle"
    if macs > 0:
        return "cluster.gemm_macs_per_cycle_per_core"
    if op in target.op_cycles_per_element:
        return f"cluster.op_cycles_per_element.{op}"
    return f"cluster.cycles_per_element.{kind}"


def model_cycles_on(cost: StepCost, unit: str) -> int:
    """The model's cycles for a step on ``unit`` (its choice, or the alternative the cost model priced)."""
    if cost.unit == unit:
        return cost.cycles
    return int(cost.alternatives.get(unit, cost.cycles))


def remodel(table: CalibrationTable, programs: Mapping[str, Program], target: Target) -> CalibrationTable:
    """The table with every step's model cycles recomputed for ``target``, each on the unit it ran on."""
    placements = {label: place(program, target) for label, program in programs.items()}

    def cycles(m: Measurement) -> int:
        program = programs[m.program]
        step = getattr(program, m.phase).steps[m.index]
        levels = placements[m.program].phase_levels[m.phase]
        return model_cycles_on(cost_step(step, program.tensors, levels, target, only_unit=m.unit), m.unit)

    rows = tuple(dataclasses.replace(m, model_cycles=cycles(m)) for m in table.measurements)
    totals = {}
    for m in rows:
        totals[m.program] = totals.get(m.program, 0) + m.model_cycles
    steps = tuple(dataclasses.replace(s, model_cycles=totals.get(s.program, s.model_cycles)) for s in table.steps)
    return dataclasses.replace(table, target=target.name, measurements=rows, steps=steps)


def _error_pct(model: float, measured: float) -> float:
    return round(100.0 * (model - measured) / measured, 1) if measured else 0.0


def error_table(table: CalibrationTable, target: Target) -> dict[str, dict[str, Any]]:
    """Model vs measured per group (the governing key): summed cycles and the error of the sum, in %."""
    groups: dict[str, dict[str, Any]] = {}
    for m in table.measurements:
        key = governing_key(target, m.unit, m.op, m.kind, m.macs)
        g = groups.setdefault(key, {"steps": 0, "model_cycles": 0, "measured_cycles": 0, "ops": set()})
        g["steps"] += 1
        g["model_cycles"] += m.model_cycles
        g["measured_cycles"] += m.measured_cycles
        g["ops"].add(m.op)
    for g in groups.values():
        g["ops"] = sorted(g["ops"])
        g["error_pct"] = _error_pct(g["model_cycles"], g["measured_cycles"])
    return dict(sorted(groups.items()))


def step_errors(table: CalibrationTable) -> dict[str, dict[str, Any]]:
    """Model vs measured per whole training step, per program."""
    return {s.program: {"model_cycles": s.model_cycles, "measured_cycles": s.measured_cycles,
                        "error_pct": _error_pct(s.model_cycles, s.measured_cycles)} for s in table.steps}


def _value(target: Target, key: str) -> float:
    if key == "cluster.fork_cycles":
        return float(target.fork_cycles)
    if key == "options.step_overhead_cycles":
        return float(target.options.step_overhead_cycles)
    if key in LINK_KEYS:
        link, name = LINK_KEYS[key]
        return float(getattr(target.links[link], name))
    if key == "redmule.fp32_macs_per_cycle":
        return target.redmule.fp32_macs_per_cycle
    if key == "cluster.gemm_macs_per_cycle_per_core":
        return target.core_gemm_macs_per_cycle
    table, name = key.rsplit(".", 1)
    return (target.op_cycles_per_element if table.endswith("op_cycles_per_element") else target.cycles_per_element)[name]


def with_values(target: Target, values: Mapping[str, float]) -> Target:
    """``target`` with the given keys replaced."""
    redmule, gemm = target.redmule, target.core_gemm_macs_per_cycle
    per_kind, per_op = dict(target.cycles_per_element), dict(target.op_cycles_per_element)
    fork, options, links = target.fork_cycles, target.options, dict(target.links)
    for key, value in values.items():
        if key == "cluster.fork_cycles":
            fork = value
        elif key in LINK_KEYS:
            link, name = LINK_KEYS[key]
            links[link] = dataclasses.replace(links[link], **{name: value})
        elif key == "options.step_overhead_cycles":
            options = dataclasses.replace(options, step_overhead_cycles=value)
        elif key == "redmule.fp32_macs_per_cycle":
            redmule = dataclasses.replace(redmule, fp32_macs_per_cycle=value) if redmule else None
        elif key == "cluster.gemm_macs_per_cycle_per_core":
            gemm = value
        elif key.startswith("cluster.op_cycles_per_element."):
            per_op[key.rsplit(".", 1)[1]] = value
        elif key.startswith("cluster.cycles_per_element."):
            per_kind[key.rsplit(".", 1)[1]] = value
        else:
            raise TargetError(f"calibration cannot set key {key!r}")
    return dataclasses.replace(target, redmule=redmule, core_gemm_macs_per_cycle=gemm, fork_cycles=fork,
                               options=options, links=MappingProxyType(links),
                               cycles_per_element=MappingProxyType(per_kind),
                               op_cycles_per_element=MappingProxyType(per_op))


def fit_step(table: CalibrationTable, target: Target) -> dict[str, float]:
    """One round: every governing key scaled by measured / modelled over its steps."""
    values = {}
    for key, g in error_table(table, target).items():
        if not g["model_cycles"] or not g["measured_cycles"]:
            continue
        ratio = g["measured_cycles"] / g["model_cycles"]
        old = _value(target, key)
        values[key] = old / ratio if key in INVERSE_KEYS else old * ratio
    return values


@dataclass(frozen=True)
class FitResult:
    target: Target
    values: Mapping[str, float]                  # the fitted keys and their values
    before: Mapping[str, Mapping[str, Any]]      # error_table with the original target
    after: Mapping[str, Mapping[str, Any]]       # error_table with the fitted target
    steps_before: Mapping[str, Mapping[str, Any]]
    steps_after: Mapping[str, Mapping[str, Any]]
    table: CalibrationTable                      # remodelled with the fitted target


def _residuals(table: CalibrationTable, target: Target) -> list[float]:
    """log(model / measured) per governing constant (summed cycles) and per whole training step."""
    # a group the model prices at nothing keeps its (large) residual: dropping it would reward the fit for it
    out = [math.log(max(g["model_cycles"], 1) / g["measured_cycles"]) for g in error_table(table, target).values()
           if g["measured_cycles"] > 0]
    out += [math.log(max(e["model_cycles"], 1) / e["measured_cycles"]) for e in step_errors(table).values()
            if e["measured_cycles"] > 0]
    return out


def _lm(x: np.ndarray, low: np.ndarray, high: np.ndarray, evaluate, rounds: int):
    """Levenberg-Marquardt on log constants within [low, high]; ``evaluate(x)`` returns (..., residuals) last.
    Returns the best x and its evaluation."""
    best = evaluate(x)
    damping = 1e-2
    for _ in range(rounds):
        r = best[-1]
        jac = np.empty((len(r), len(x)))
        for j in range(len(x)):
            step = x.copy()
            step[j] += FD_STEP
            jac[:, j] = (evaluate(step)[-1] - r) / FD_STEP
        while damping < 1e6:
            lhs = jac.T @ jac + damping * np.diag(np.diag(jac.T @ jac) + 1e-9)
            moved = np.clip(x + np.linalg.solve(lhs, -jac.T @ r), low, high)
            trial = evaluate(moved)
            if float(trial[-1] @ trial[-1]) < float(r @ r):
                x, best = moved, trial
                damping = max(damping / 10, 1e-6)
                break
            damping *= 10
        else:
            break
    return x, best


def fit(table: CalibrationTable, programs: Mapping[str, Program], target: Target,
        rounds: int = FIT_ROUNDS, global_keys: bool = True) -> FitResult:
    """Least squares on the log errors of every group and every whole step, over the log of the constants, each
    evaluation re-costing ``programs`` (the programs the table was measured for, by label).

    Two levels, because the constants every step pays (fork, step overhead, the cluster DMA's latency and
    bandwidth: ``GLOBAL_KEYS``) and the governing ones trade against each other: Levenberg-Marquardt over the global
    constants, each trial settling the governing constants by ratio steps (each group's modelled sum to its
    measured one); then Levenberg-Marquardt over the governing constants together (fused steps couple them: a
    LoRA step on RedMulE also charges its rank-wide products to the cores' GEMM rate). Every constant stays within
    ``FIT_RANGE_LOG`` of its start (one the data do not determine must not run off)."""
    current = remodel(table, programs, target)
    before, steps_before = error_table(current, target), step_errors(current)
    keys = [k for k, g in before.items() if g["model_cycles"] > 0 and g["measured_cycles"] > 0]
    outer = [k for k in GLOBAL_KEYS if global_keys]
    start = {k: _value(target, k) or GLOBAL_KEYS.get(k, 1.0) for k in keys + outer}
    for k in outer:
        start[k] = start[k] or GLOBAL_KEYS[k]

    def bounded(values: Mapping[str, float]) -> dict[str, float]:
        return {k: min(max(v, start[k] / FIT_RANGE), start[k] * FIT_RANGE) for k, v in values.items()}

    def settle(t: Target) -> Target:
        for _ in range(SETTLE_ROUNDS):
            t = with_values(t, bounded({k: v for k, v in fit_step(remodel(table, programs, t), t).items()
                                        if k in start}))
        return t

    def with_globals(logs: np.ndarray):
        t = settle(with_values(target, {k: float(math.exp(v)) for k, v in zip(outer, logs)}))
        remodelled = remodel(table, programs, t)
        return t, remodelled, np.array(_residuals(remodelled, t))

    x0 = np.log([start[k] for k in outer])
    if outer:
        _, (settled, _, _) = _lm(x0, x0 - FIT_RANGE_LOG, x0 + FIT_RANGE_LOG, with_globals, rounds)
    else:
        settled = settle(target)

    def with_governing(logs: np.ndarray):
        t = with_values(settled, {k: float(math.exp(v)) for k, v in zip(keys, logs)})
        remodelled = remodel(table, programs, t)
        return t, remodelled, np.array(_residuals(remodelled, t))

    x1 = np.log([_value(settled, k) for k in keys])
    lows, highs = np.log([start[k] / FIT_RANGE for k in keys]), np.log([start[k] * FIT_RANGE for k in keys])
    x1, _ = _lm(x1, lows, highs, with_governing, rounds)
    values = {k: _value(settled, k) for k in outer}
    values.update({k: float(math.exp(v)) for k, v in zip(keys, x1)})
    values = {k: (round(v) if k in INTEGER_KEYS else v) for k, v in values.items()}
    fitted = with_values(target, values)
    current = remodel(table, programs, fitted)
    return FitResult(fitted, MappingProxyType(values), before, error_table(current, fitted), steps_before,
                     step_errors(current), current)


def fit_offline(table: CalibrationTable, target: Target) -> tuple[Target, dict[str, float]]:
    """One round on the table alone (no programs): the linear estimate of the fitted constants."""
    values = fit_step(table, target)
    return with_values(target, values), values


def _format(value: float) -> str:
    return f"{value:.6g}" if not float(value).is_integer() else str(int(value))


def fitted_toml(source_text: str, result: FitResult, name: str, simulator: str) -> str:
    """The target file ``source_text`` with the fitted values and, beside each, its group's errors."""
    lines, table = [], ""
    pending = {key: value for key, value in result.values.items()}
    for line in source_text.splitlines():
        header = re.match(r"^\s*\[([^\]]+)\]\s*$", line)
        if header:
            missing = [k for k in pending if k.rsplit(".", 1)[0] == table]
            lines += [_fitted_line(k.rsplit(".", 1)[1], pending.pop(k), result, k) for k in missing]
            table = header.group(1).strip()
        assignment = re.match(r"^(\s*)([A-Za-z0-9_]+)\s*=\s*([^#]+?)\s*(#.*)?$", line)
        if assignment and not header:
            key = f"{table}.{assignment.group(2)}" if table else assignment.group(2)
            if key == "name":
                line = f'name = "{name}"'
            elif key in pending:
                line = _fitted_line(assignment.group(2), pending.pop(key), result, key,
                                    was=assignment.group(3))
        lines.append(line)
    missing = [k for k in pending if k.rsplit(".", 1)[0] == table]
    lines += [_fitted_line(k.rsplit(".", 1)[1], pending.pop(k), result, k) for k in missing]
    for new_table in sorted({k.rsplit(".", 1)[0] for k in pending}):
        lines += ["", f"[{new_table}]"]
        lines += [_fitted_line(k.rsplit(".", 1)[1], pending.pop(k), result, k)
                  for k in sorted(pending) if k.rsplit(".", 1)[0] == new_table]
    head = [f"# Fitted by `edgefleet calibrate` to {simulator}: each fitted constant carries the model-vs-simulator",
            "# error of the steps it governs (summed cycles), before and after the fit. Per whole training step:"]
    for program, e in result.steps_after.items():
        b = result.steps_before.get(program, {})
        head.append(f"#   {program}: {b.get('error_pct', 0):+.1f}% before, {e['error_pct']:+.1f}% after "
                    f"({e['measured_cycles']:,} measured cycles)")
    return "\n".join(head + lines) + "\n"


def _fitted_line(key: str, value: float, result: FitResult, full_key: str, was: str | None = None) -> str:
    b, a = result.before.get(full_key, {}), result.after.get(full_key, {})
    if full_key in GLOBAL_KEYS:
        note = "fitted jointly: paid by every step (see the per-step errors above)"
    else:
        note = (f"fitted: {b.get('error_pct', 0):+.1f}% -> {a.get('error_pct', 0):+.1f}% over {a.get('steps', 0)} "
                f"steps ({', '.join(a.get('ops', []))})")
    note += f"; was {was.strip()}" if was else ""
    return f"{key} = {_format(value)}   # {note}"


def measurements_for(label: str, program: Program, target: Target, profile: Mapping[int, int], steps: int,
                     phase: str = "train") -> list[Measurement]:
    """Rows for one program from a per-step-index profile summed over ``steps`` training steps."""
    costs = cost_program(program, target)[phase]
    rows = []
    for index, (step, cost) in enumerate(zip(getattr(program, phase).steps, costs)):
        if index not in profile:
            continue
        rows.append(Measurement(label, phase, index, step.name, step.op, cost.kind, step.unit or cost.unit,
                                cost.macs, model_cycles_on(cost, step.unit or cost.unit),
                                round(profile[index] / steps)))
    return rows


def merge(tables: Iterable[CalibrationTable]) -> CalibrationTable:
    tables = list(tables)
    return CalibrationTable(tables[0].target, tuple(m for t in tables for m in t.measurements),
                            tuple(s for t in tables for s in t.steps), tables[0].simulator)


__all__ = ["CalibrationTable", "FitResult", "Measurement", "StepTotal", "error_table", "fit", "fit_offline",
           "fitted_toml", "governing_key", "measurements_for", "merge", "model_cycles_on", "remodel", "step_errors",
           "with_values"]
