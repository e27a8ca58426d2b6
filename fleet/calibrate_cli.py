"""`edgefleet calibrate --target siracusa --gvsoc PATH`: measure training steps on GVSoC, compare with the cycle
model per op kind (the target constant that governs each step) and per whole step, fit the constants, write
the table (JSON), the fitted target (TOML, errors beside the fitted constants) and a readable error table.

What is measured: whole training steps of the calibration programs (deep-ae and cct-digits, LoRA and
selective), each step's kernels timed by the firmware's per-step profile (``EFP`` lines). The fit and the
tables are ``compiler.targets.calibrate``; docs/gvsoc.md describes the method and its limits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

# label, model, tuning, batch: what calibration measures
PROGRAMS = (("deep-ae/lora", "deep-ae", {"strategy": "lora", "targets": ["encoder.*", "decoder.*"]}, 4),
            ("deep-ae/last-1", "deep-ae", "last-1", 4),
            ("cct-digits/lora", "cct-digits", "lora", 1),
            ("cct-digits/last-1", "cct-digits", "last-1", 1),
            ("cct-digits/full", "cct-digits", "full", 1),          # large SGD and weight-gradient GEMMs
            ("deep-ae/lora-b1", "deep-ae", {"strategy": "lora", "targets": ["encoder.*", "decoder.*"]}, 1))
CALIBRATION_STEPS = 2
SAMPLES = 16


@dataclass(frozen=True)
class CalibrationRun:
    table_path: Path
    toml_path: Path
    report: dict[str, Any]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("calibrate", help="fit a target's cycle model to GVSoC",
                              description="Run training steps on GVSoC, compare with the cycle model per op kind "
                                          "and per step, fit the target's constants.")
    p.add_argument("--target", default="siracusa", help="target to calibrate (built-in name or TOML path)")
    p.add_argument("--gvsoc", help="the GVSoC executable (else $EDGEFLEET_GVSOC, else gvsoc on PATH)")
    p.add_argument("--out", default="calibration", help="directory for table.json, the fitted TOML, report.json")
    p.add_argument("--steps", type=int, default=CALIBRATION_STEPS, help="training steps per program")
    p.add_argument("--programs", help="comma-separated labels (default: all of "
                                      f"{', '.join(p[0] for p in PROGRAMS)})")
    p.add_argument("--table", help="fit an existing table.json instead of running GVSoC")
    p.set_defaults(handler=calibrate)
    return p


def _programs(target, labels: Sequence[str] | None):
    from compiler import compile_model
    from compiler.targets import lower_to_target
    chosen = [p for p in PROGRAMS if not labels or p[0] in labels]
    if labels and len(chosen) != len(labels):
        known = ", ".join(p[0] for p in PROGRAMS)
        raise ValueError(f"--programs: unknown label(s) {sorted(set(labels) - {p[0] for p in chosen})} "
                         f"(known: {known})")
    out = {}
    for label, model, tuning, batch in chosen:
        out[label] = lower_to_target(compile_model(model, tuning=tuning, batch=batch, lr=0.01), target)
    return out


def synthetic_batches(program, samples: int, seed: int = 0):
    """Random inputs (and labels) of the program's shapes: cycle counts do not depend on the values."""
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, *program.tensors[program.input].shape[1:])).astype(np.float32)
    if not program.label:
        return x, None
    label = program.tensors[program.label]
    if label.dtype == "int64":
        return x, rng.integers(0, program.tensors[program.output].shape[-1], samples).astype(np.int64)
    return x, rng.standard_normal((samples, *label.shape[1:])).astype(np.float32)


def measure(programs, target, gvsoc: str | None, steps: int, workdir: Path, log=print):
    """Run every program ``steps`` training steps on GVSoC; the calibration table and GVSoC's speed."""
    from compiler.targets.calibrate import CalibrationTable, StepTotal, measurements_for
    from device_runtime.gvsoc import GvsocDevice
    rows, totals, speed = [], [], {}
    load_before = [round(x, 2) for x in os.getloadavg()]
    for label, program in programs.items():
        x, y = synthetic_batches(program, SAMPLES)
        device = GvsocDevice(program, workdir / label.replace("/", "-"), gvsoc=gvsoc)
        start = time.perf_counter()
        device.train(x, y, steps)
        host_s = time.perf_counter() - start
        cycles = int(device.last_step_cycles.sum())
        rows += measurements_for(label, program, target, device.last_profile, steps)
        model = sum(m.model_cycles for m in rows if m.program == label)
        totals.append(StepTotal(label, model, round(cycles / steps)))
        speed[label] = {"simulated_cycles": cycles, "host_s": round(host_s, 2),
                        "cycles_per_host_s": round(cycles / device.last_run_s if device.last_run_s else 0)}
        log(f"{label}: {cycles / steps:,.0f} cycles/step on GVSoC, model {model:,}, {host_s:.1f} s")
    table = CalibrationTable(target.name, tuple(rows), tuple(totals), simulator="GVSoC siracusa",
                             notes={"steps": steps, "gvsoc_speed": speed,
                                    "load_average": {"before": load_before,
                                                     "after": [round(x, 2) for x in os.getloadavg()]}})
    return table


def calibrate(args: argparse.Namespace) -> int:
    from compiler.targets import load_target
    from compiler.targets.calibrate import CalibrationTable, fit, fitted_toml
    target = load_target(args.target)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [s.strip() for s in args.programs.split(",")] if args.programs else None
    if args.table:
        table = CalibrationTable.load(args.table)
        labels = sorted({m.program for m in table.measurements})
        programs = _programs(target, labels)
    else:
        programs = _programs(target, labels)
        table = measure(programs, target, args.gvsoc, args.steps, out / "runs",
                        log=lambda s: print(s, file=sys.stderr))
        table.save(out / "table.json")
    result = fit(table, programs, target)
    name = f"{target.name}-gvsoc"
    source = Path(target.source) if Path(target.source).is_file() else None
    if source is None:
        from importlib import resources
        text = (resources.files("compiler.targets") / target.source).read_text()
    else:
        text = source.read_text()
    (out / f"{name}.toml").write_text(fitted_toml(text, result, name, table.simulator or "the simulator"))
    report = {"target": target.name, "fitted": dict(result.values), "per_kind_before": result.before,
              "per_kind_after": result.after, "per_step_before": result.steps_before,
              "per_step_after": result.steps_after, "notes": dict(table.notes)}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(format_errors(result))
    print(f"\nwritten: {out / 'table.json'}, {out / (name + '.toml')}, {out / 'report.json'}")
    return 0


def format_errors(result) -> str:
    lines = [f"{'constant (op kind)':52} {'steps':>5} {'measured':>12} {'before':>8} {'after':>8}"]
    for key, after in result.after.items():
        before = result.before.get(key, {})
        lines.append(f"{key:52} {after['steps']:>5} {after['measured_cycles']:>12,} "
                     f"{before.get('error_pct', 0):>+7.1f}% {after['error_pct']:>+7.1f}%")
    lines.append("")
    lines.append(f"{'whole training step':52} {'':>5} {'measured':>12} {'before':>8} {'after':>8}")
    for program, after in result.steps_after.items():
        before = result.steps_before.get(program, {})
        lines.append(f"{program:52} {'':>5} {after['measured_cycles']:>12,} {before.get('error_pct', 0):>+7.1f}% "
                     f"{after['error_pct']:>+7.1f}%")
    return "\n".join(lines)
