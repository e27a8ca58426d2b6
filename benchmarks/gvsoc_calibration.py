"""Model vs GVSoC: cycles per op kind and per training step, before and after fitting; GVSoC's speed.

Runs the calibration programs (deep-ae and cct-digits, LoRA and selective ``last-1``; ``fleet.calibrate_cli``)
for ``--steps`` training steps each on GVSoC's ``siracusa`` target, compares the per-step profile with the
``siracusa`` cycle model, fits the model (``compiler.targets.calibrate.fit``) and writes
benchmarks/results/gvsoc_calibration.json:

    per_kind_before / per_kind_after   per governing constant: steps, measured and modelled cycles, error %
    per_step_before / per_step_after   per program: one whole training step
    gvsoc_speed                        simulated cluster cycles per host second, per program
    fitted                             the fitted constants

Needs GVSoC (``--gvsoc PATH`` or $EDGEFLEET_GVSOC); with ``--table`` it refits a saved table instead.

    python benchmarks/gvsoc_calibration.py --gvsoc /path/to/gvsoc
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compiler.targets import load_target  # noqa: E402
from compiler.targets.calibrate import CalibrationTable, fit  # noqa: E402
from fleet.calibrate_cli import CALIBRATION_STEPS, _programs, format_errors, measure  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gvsoc_calibration.json"


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
    if args.table:
        table = CalibrationTable.load(args.table)
        programs = _programs(target, sorted({m.program for m in table.measurements}))
    else:
        programs = _programs(target, None)
        table = measure(programs, target, args.gvsoc, args.steps, Path(args.workdir),
                        log=lambda s: print(s, file=sys.stderr))
    result = fit(table, programs, target)
    print(format_errors(result))
    out = {"target": target.name, "simulator": table.simulator, "steps": table.notes.get("steps"),
           "host": platform.node(), "python": platform.python_version(),
           "seconds": round(time.perf_counter() - start, 1),
           "per_kind_before": result.before, "per_kind_after": result.after,
           "per_step_before": result.steps_before, "per_step_after": result.steps_after,
           "gvsoc_speed": table.notes.get("gvsoc_speed", {}), "fitted": dict(result.values)}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
