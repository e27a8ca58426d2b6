"""A round's duration with and without the metrics exporter, on the real engine.

The fleet of benchmarks/fleet_round.py (Deep-AE, rank-4 LoRA, machine-sound data, fraction 1.0, one local
step, 2 Ray host actors): the same scenario run once with ``[metrics]`` off and once on, with a real
Prometheus (the Debian binary) scraping the exporter every 5 s (monitoring/prometheus.yml's interval) —
so the "on" run pays for the observer calls and for every scrape. Each run is its own process (its own Ray).
Seconds per round: the mean of the RoundLogs' durations after the first round (warm-up). The two runs
alternate (off, on) ``--repeats`` times; the figure is the ratio of the medians.

On a shared machine the difference between two runs is dominated by other processes' load. The steadier
figure is the exporter's own CPU time in the "on" run (``edgefleet_exporter_cpu_seconds_total``, read from
Prometheus after the run: observer calls + rendering scrapes) against the rounds' wall time:
``exporter_cpu_share_of_rounds`` (an upper bound: scrapes between rounds count too).

    python benchmarks/metrics_round.py [--devices 1000 10000] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "metrics_round.json"
ROUNDS = 3
SCRAPE_INTERVAL_S = 5
RUN_TIMEOUT_S = 3600


def child(devices: int, exporter: str, out: Path) -> None:
    """One run (in its own process); writes the per-round durations."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    from benchmarks.fleet_round import scenario_dict
    from fleet.engine import run_scenario
    from fleet.records import read_round_logs
    from fleet.scenario import parse_scenario
    raw = scenario_dict(devices, ROUNDS)
    if exporter:
        raw["metrics"] = {"address": exporter}
    scenario = parse_scenario(raw, source="metrics_round.py")
    with tempfile.TemporaryDirectory(prefix="edgefleet-metrics-round-") as run_dir:
        run_scenario(scenario, run_dir, progress=False, log=lambda text: None)
        durations = [log.duration_s for log in read_round_logs(run_dir)]
    out.write_text(json.dumps({"round_seconds": durations}))


def measure(devices: int, with_exporter: bool) -> dict:
    from fleet.prometheus import free_port, start_prometheus
    with tempfile.TemporaryDirectory(prefix="edgefleet-metrics-bench-") as tmp:
        out = Path(tmp) / "result.json"
        address = f"127.0.0.1:{free_port()}" if with_exporter else ""
        server = start_prometheus(Path(tmp) / "prometheus", address, f"127.0.0.1:{free_port()}",
                                  SCRAPE_INTERVAL_S) if with_exporter else None
        try:
            load_before = os.getloadavg()[0]
            subprocess.run([sys.executable, __file__, "--child", str(devices), address, str(out)], check=True,
                           timeout=RUN_TIMEOUT_S, env={**os.environ, "PYTHONPATH": str(ROOT)})
            scrapes, cpu = 0, {}
            if server is not None:
                up = server.query("sum_over_time(up[1h])")  # successful scrapes of the exporter
                scrapes = int(float(up[0]["value"][1])) if up else 0
                cpu = {r["metric"]["activity"]: float(r["value"][1])
                       for r in server.query("last_over_time(edgefleet_exporter_cpu_seconds_total[1h])")}
        finally:
            if server is not None:
                server.stop()
        durations = json.loads(out.read_text())["round_seconds"]
    out = {"round_seconds": durations, "seconds_per_round": statistics.mean(durations[1:]),
           "prometheus_scrapes": scrapes, "load_average_1m_before": load_before}
    if cpu:  # the exporter's own CPU over the run (as of its last scrape), against the rounds' wall time
        out.update({"exporter_cpu_seconds": cpu, "exporter_cpu_share_of_rounds": sum(cpu.values()) / sum(durations)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--merge", action="store_true", help="keep the results file's other device counts")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1], Path(args.child[2]))
        return
    configurations = []
    for n in args.devices:
        runs = {"off": [], "on": []}
        for _ in range(args.repeats):
            for mode in ("off", "on"):
                runs[mode].append(measure(n, mode == "on"))
                print(json.dumps({"devices": n, "exporter": mode, **runs[mode][-1]}), flush=True)
        off = statistics.median(r["seconds_per_round"] for r in runs["off"])
        on = statistics.median(r["seconds_per_round"] for r in runs["on"])
        configurations.append({"devices": n, "seconds_per_round_without": off, "seconds_per_round_with": on,
                               "difference": on / off - 1, "runs": runs})
        print(json.dumps({k: v for k, v in configurations[-1].items() if k != "runs"}), flush=True)
    if args.merge and RESULTS.exists():
        kept = [c for c in json.loads(RESULTS.read_text())["configurations"] if c["devices"] not in args.devices]
        configurations = sorted(kept + configurations, key=lambda c: c["devices"])
    RESULTS.write_text(json.dumps({
        "benchmark": "metrics_round", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
        "machine": {"cpu_count": os.cpu_count(), "load_average_1m_at_end": os.getloadavg()[0]},
        "setup": {"scenario": "benchmarks/fleet_round.py scenario_dict (Deep-AE LoRA r4, fraction 1.0, 1 step)",
                  "rounds": ROUNDS, "seconds_per_round": "mean of RoundLog durations of rounds 2..3",
                  "with": f"[metrics] on, a real Prometheus scraping every {SCRAPE_INTERVAL_S} s",
                  "difference": "median with / median without - 1 (noisy on a shared machine)",
                  "exporter_cpu_share_of_rounds": "edgefleet_exporter_cpu_seconds_total (observe + render) / "
                                                  "sum of round durations, in the 'on' run"},
        "configurations": configurations}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
