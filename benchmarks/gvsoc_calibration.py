"""Model vs GVSoC: cycles per op kind and per training step, before and after fitting; GVSoC's speed.

Runs the calibration programs (deep-ae and cct-digits, LoRA and selective ``last-1``; ``fleet.calibrate_cli``)
for ``--steps`` training steps each on GVSoC's ``siracusa`` target, compares the per-step profile with the
``siracusa`` cycle model, fits the model (``compiler.targets.calibrate.fit``) and writes
benchmarks/results/gvsoc_calibration.json:

    per_kind_before / per_kind_after   per governing constant: steps, measured and modelled cycles, error %
    per_step_before / per_step_after   per program: one whole training step
    gvsoc_speed                        simulated cluster cycles per host second, per program
    load_average                       os.getloadavg() around this run (and around the GVSoC runs, when recorded)
    fitted                             the fitted constants
    held_out                           fitted on the LoRA programs only, errors on the selective ones

Needs GVSoC (``--gvsoc PATH`` or $EDGEFLEET_GVSOC); with ``--table`` it refits a saved table instead.

    python benchmarks/gvsoc_calibration.py --gvsoc /path/to/gvsoc
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compiler.targets import load_target  # noqa: E402
from compiler.targets.calibrate import CalibrationTable, error_table, fit, remodel, step_errors  # noqa: E402
from fleet.calibrate_cli import CALIBRATION_STEPS, _programs, format_errors, measure  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gvsoc_calibration.json"


def _subset(table: CalibrationTable, programs) -> CalibrationTable:
    return dataclasses.replace(table, measurements=tuple(m for m in table.measurements if m.program in programs),
                               steps=tuple(s for s in table.steps if s.program in programs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gvsoc", default=os.environ.get("EDGEFLEET_GVSOC"))
    parser.add_argument("--steps", type=int, default=CALIBRATION_STEPS)
    parser.add_argument("--table", help="refit this table.json instead of running GVSoC")
    parser.add_argument("--workdir", default="/tmp/edgefleet-gvsoc-calibration")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    target = load_target("siracusa")
    start = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    if args.table:
        table = CalibrationTable.load(args.table)
        programs = _programs(target, sorted({m.program for m in table.measurements}))
    else:
        programs = _programs(target, None)
        table = measure(programs, target, args.gvsoc, args.steps, Path(args.workdir),
                        log=lambda s: print(s, file=sys.stderr))
    result = fit(table, programs, target)
    print(format_errors(result))
    # held out: fit on the LoRA programs only, predict the selective ones (last-1) with those constants
    lora = {k: v for k, v in programs.items() if k.endswith("/lora")}
    other = {k: v for k, v in programs.items() if k not in lora}
    held_out = {}
    if lora and other:
        part = fit(_subset(table, lora), lora, target)
        predicted = remodel(_subset(table, other), other, part.target)
        held_out = {"fitted_on": sorted(lora), "predicted": sorted(other),
                    "per_kind": error_table(predicted, part.target), "per_step": step_errors(predicted)}
    out = {"target": target.name, "simulator": table.simulator, "steps": table.notes.get("steps"),
           "host": platform.node(), "python": platform.python_version(),
           "seconds": round(time.perf_counter() - start, 1),
           "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()],
                            "measured_with": table.notes.get("load_average", {})},
           "per_kind_before": result.before, "per_kind_after": result.after,
           "per_step_before": result.steps_before, "per_step_after": result.steps_after,
           "gvsoc_speed": table.notes.get("gvsoc_speed", {}), "fitted": dict(result.values),
           "held_out": held_out}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
