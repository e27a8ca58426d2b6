"""The `edgefleet` command: compile | run | status | monitor | report | calibrate."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Sequence

from compiler import cli as compiler_cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefleet", description="On-device training compiler and federated "
                                     "edge-fleet simulator.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    compiler_cli.add_parser(sub)
    for module in ("fleet.run_cli", "fleet.status_cli", "fleet.monitor_cli", "fleet.report_cli", "fleet.boards_cli",
                   "fleet.calibrate_cli"):
        try:
            __import__(module)
        except ImportError:
            continue
        sys.modules[module].add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("edgefleet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line naming the cause; the traceback only with --debug
        if debug:
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"edgefleet: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
