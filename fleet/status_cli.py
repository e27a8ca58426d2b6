"""`edgefleet status RUN_DIR`: where a live or finished run stands, read from its run directory."""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleet.exporter import read_exporter_info
from fleet.metrics import STATES, FleetMetrics
from fleet.progress import format_duration
from fleet.records import read_round_logs, read_run_scenario
from fleet.runs import RunDir


@dataclass
class RunStatus:
    run_dir: str
    scenario: str
    condition: str                       # live | finished | stopped (killed or interrupted; --resume continues)
    rounds_completed: int
    rounds_planned: int
    elapsed_s: float
    eta_s: float                         # nan when unknown or finished
    devices: int
    devices_by_state: dict[str, int] = field(default_factory=dict)
    last_round: dict[str, Any] = field(default_factory=dict)   # RoundLog.summary() of the last finished round
    exporter: str = ""                   # host:port ("" when the run serves no metrics)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: unknown numbers (NaN) are None."""
        return _plain(asdict(self))


def run_status(run_dir: str | os.PathLike, now: float | None = None) -> RunStatus:
    now = time.time() if now is None else now
    run = RunDir(run_dir)
    state = run.state()
    scenario = read_run_scenario(run_dir)
    logs = read_round_logs(run_dir)
    info = read_exporter_info(run_dir)
    live = not state.get("finished") and info is not None and _alive(info.pid)
    condition = "finished" if state.get("finished") else "live" if live else "stopped"
    metrics = FleetMetrics()
    metrics.restore(logs)
    by_state = metrics.devices_by_state()
    by_state["idle"] += max(0, scenario.device_count - sum(by_state.values()))  # never heard from yet
    if logs and logs[0].started_at:
        end = now if live else logs[-1].ended_at
        elapsed = end - logs[0].started_at
    else:
        elapsed = math.nan
    durations = [log.duration_s for log in logs[-5:] if log.duration_s > 0]
    remaining = scenario.training.rounds - len(logs)
    eta = remaining * sum(durations) / len(durations) if durations and condition != "finished" else math.nan
    exporter = info.address if info else (scenario.metrics.address if scenario.metrics.enabled else "")
    return RunStatus(str(run_dir), scenario.name, condition, int(state.get("rounds_completed", len(logs))),
                     scenario.training.rounds, elapsed, eta, scenario.device_count, by_state,
                     logs[-1].summary() if logs else {}, exporter)


def format_status(s: RunStatus) -> str:
    lines = [f"{s.scenario} ({s.run_dir}): {s.condition}",
             f"  round {s.rounds_completed} of {s.rounds_planned} finished"
             + (f", round {s.rounds_completed + 1} running" if s.condition == "live" else "")
             + f"   elapsed {format_duration(s.elapsed_s)}   eta {format_duration(s.eta_s)}",
             f"  devices ({s.devices}): " + ", ".join(f"{k} {s.devices_by_state.get(k, 0)}" for k in STATES)]
    r = s.last_round
    if r:
        lines.append(f"  last round {r['round']}: train loss {r['train_loss']:.4f}  metric before "
                     f"{r['metric_before']:.3f} after {r['metric_after']:.3f}  global {r['global_metric']:.3f}  "
                     f"{r['devices_trained']} of {r['devices_sampled'] or '?'} devices trained")
        lines.append(f"    failures {json.dumps(r['failures'])}  unavailable {json.dumps(r['unavailable'])}"
                     f"  rejected {json.dumps(r['rejected'])}")
    if s.exporter:
        lines.append(f"  metrics: http://{s.exporter}/metrics" + ("" if s.condition == "live" else " (not serving)"))
    else:
        lines.append("  metrics: not exported (enable [metrics] in the scenario)")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("status", help="where a live or finished run stands",
                              description="Round n of N, elapsed time and ETA, devices by state, the last round's "
                                          "numbers and the metrics exporter's address.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(handler=status)
    return p


def status(args: argparse.Namespace) -> int:
    if not Path(args.run_dir).is_dir():
        raise ValueError(f"{args.run_dir}: no such run directory")
    s = run_status(args.run_dir)
    print(json.dumps(s.to_dict(), indent=1) if args.json else format_status(s))
    return 0
