"""`edgefleet run SCENARIO` and `edgefleet run --resume RUN_DIR`."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("run", help="run a federated personalization scenario",
                              description="Run a scenario (TOML) end to end, or resume a killed run.")
    p.add_argument("scenario", nargs="?", help="scenario TOML file (e.g. scenarios/quickstart.toml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR after its last finished round")
    p.add_argument("--allow-changes", nargs="+", metavar="KEY", default=[],
                   help="with --resume: accept these edited scenario keys (only keys safe to change, e.g. "
                        "training.rounds)")
    p.add_argument("--rounds", type=int, help="override training.rounds (with --resume: extend the run, "
                                              "finished or not, to this many rounds)")
    p.add_argument("--devices", type=int, help="override the fleet size (groups scaled in proportion)")
    p.add_argument("--run-dir", help="where the run is written (default: the scenario's run_dir)")
    p.add_argument("--actors", type=int, help="Ray host actors (0 = run in this process)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fleet.engine import run_scenario
    from fleet.limits import preflight
    from fleet.scenario import load_scenario
    if args.allow_changes and not args.resume:
        raise ValueError("--allow-changes goes with --resume RUN_DIR")
    if args.resume:
        if args.scenario or args.devices:
            raise ValueError("--resume takes the run directory (and --rounds N to extend it): the run's own "
                             "scenario is used")
        # locks, verifies the scenario and checkpoints, resumes from the newest valid one (fleet.runs)
        summary = run_scenario(None, args.resume, resume=True, rounds=args.rounds, allow_changes=args.allow_changes,
                               progress=not args.quiet, actors=args.actors)
    else:
        if not args.scenario:
            raise ValueError("give a scenario file, or --resume RUN_DIR")
        scenario = load_scenario(args.scenario)
        run_dir = args.run_dir or _free_dir(scenario.run_dir)  # an explicit --run-dir is never reused
        scenario = scenario.with_overrides(rounds=args.rounds, devices=args.devices, run_dir=run_dir)
        for warning in preflight(scenario, args.actors):  # before anything is written
            print(f"edgefleet: warning: {warning}", file=sys.stderr)
        print(f"run directory: {run_dir}", file=sys.stderr)
        summary = run_scenario(scenario, scenario.run_dir, progress=not args.quiet, actors=args.actors)
    p = summary["personalization"]
    print(f"\n{summary['scenario']}: {summary['rounds_completed']} rounds, {summary['devices']} devices, "
          f"{summary['timing']['seconds_per_round']:.2f} s/round")
    print(f"  {summary['metric']}: base {p['base_accuracy_mean']:.3f}  global {p['global_accuracy_mean']:.3f}  "
          f"personalized {p['personalized_accuracy_mean']:.3f}  ({100 * p['share_of_devices_improved']:.0f} % of "
          f"devices improved)")
    if summary["failures"]:
        print(f"  failures: {json.dumps(summary['failures'])}")
    return 0


def _free_dir(default: str) -> str:
    """The scenario's run directory, or the first free ``<dir>-N`` when it already holds a run."""
    from pathlib import Path
    path, n = Path(default), 2
    while path.exists() and any(path.iterdir()):
        path = Path(f"{default}-{n}")
        n += 1
    return str(path)
