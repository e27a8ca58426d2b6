"""`edgefleet report RUN_DIR [-o DIR]`: PNG plots and one self-contained HTML page of a run."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="plots and an HTML page of a run",
                              description="Write PNG plots of a live or finished run and one self-contained HTML "
                                          "page showing them with the summary table.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("-o", "--out", metavar="DIR", help="output directory (default RUN_DIR/report)")
    p.set_defaults(handler=report)
    return p


def report(args: argparse.Namespace) -> int:
    from fleet.report import write_report
    from fleet.runs import RunDir
    if not Path(args.run_dir).is_dir():
        raise ValueError(f"{args.run_dir}: no such run directory")
    RunDir(args.run_dir).state()  # not a run directory → one line saying so
    result = write_report(args.run_dir, args.out)
    print(f"report: {result.html} ({len(result.pngs)} plots)")
    return 0
