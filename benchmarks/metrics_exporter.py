"""The metrics exporter at fleet scale: scrape time with N devices registered, and what it costs a round.

For N devices (default 1,000 and 10,000) one round's DeviceRecords (train for every device, 2 % drop-outs,
telemetry as a Siracusa LoRA device reports it) go through ``FleetMetrics`` as the round driver hands them
over (begin_round, device_done per record, end_round), while the exporter serves HTTP on loopback:

  observe_s          CPU of the observer calls for one round (begin + N device_done + end_round)
  render_cpu_*_s     CPU time of the exporter thread rendering one scrape (wall times include waiting for
                     a core on a shared machine)
  scrape_after_round_s   one HTTP scrape right after the round (every device's lines re-rendered)
  scrape_cached_s    median HTTP scrape when nothing changed (cached lines joined)
  baseline_generic_s prometheus-client's own ``generate_latest`` over the same collector (the named
                     baseline: what a plain custom collector would cost per scrape)

A round's exporter cost = observe_s + one after-round scrape + cached scrapes for the rest of the round at
the scrape interval (5 s, monitoring/prometheus.yml), in wall time (``share_of_round``) and in CPU time
(``cpu_share_of_round``). Both divide by the edgefleet round
time measured at the same N in benchmarks/results/fleet_round.json (Deep-AE LoRA, this machine). That is an
upper bound on the slowdown: the scrape runs on its own thread while the driver mostly waits on Ray.

    python benchmarks/metrics_exporter.py [--devices 1000 10000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from device_runtime.protocol import Telemetry  # noqa: E402
from fleet.exporter import MetricsExporter  # noqa: E402
from fleet.metrics import FleetMetrics  # noqa: E402
from fleet.roundlog import DeviceRecord, RoundLog  # noqa: E402

SCRAPE_INTERVAL_S = 5.0
RESULTS = ROOT / "benchmarks" / "results" / "metrics_exporter.json"


def round_records(devices: int, round_: int) -> list[DeviceRecord]:
    out = []
    for d in range(devices):
        group = ("big", "siracusa", 2_000_000) if d % 3 else ("small", "siracusa-small-l2", 600_000)
        cause = "dropout" if (d * 7 + round_) % 50 == 0 else ""
        telemetry = Telemetry(samples=32, steps=1, wall_s=0.001 + (d % 17) * 1e-4, modelled_cycles_per_step=181_000,
                              peak_bytes_by_level={"L1": 61_440, "L2": 412_000 + d % 5, "L3": 1_200_000},
                              bytes_down=21_000, bytes_up=0 if cause else 21_000, modelled_s=181_000 / 370e6)
        out.append(DeviceRecord(round_, "train", d, group[0], group[1], "numpy", cause, "",
                                0 if cause else 32, 1.2, 0.61, 1.1 - 0.001 * (d % 100), 1.0, 0.65 + (d % 10) / 100,
                                group[2], telemetry))
    return out


def scrape(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        size = len(response.read())
    return time.perf_counter() - t0, size


def measure(devices: int, rounds: int = 3) -> dict:
    metrics = FleetMetrics()
    exporter = MetricsExporter(metrics, "127.0.0.1:0")
    observe, after_round, cached, after_round_cpu, cached_cpu = [], [], [], [], []
    try:
        for r in range(1, rounds + 1):
            records = round_records(devices, r)
            t0 = time.process_time()
            metrics.begin_round(r, rounds)
            for record in records:
                metrics.device_done(record)
            metrics.end_round(RoundLog(r, time.time() - 1.0, time.time(), list(range(devices)), records))
            observe.append(time.process_time() - t0)
            seconds, size = scrape(exporter.url)
            after_round.append(seconds)
            after_round_cpu.append(metrics.render_cpu_s)
            for _ in range(3):
                cached.append(scrape(exporter.url)[0])
                cached_cpu.append(metrics.render_cpu_s)
        from prometheus_client import CollectorRegistry, generate_latest
        registry = CollectorRegistry()
        registry.register(metrics)
        t0 = time.perf_counter()
        generic = generate_latest(registry)
        baseline = time.perf_counter() - t0
    finally:
        exporter.close()
    series = sum(1 for line in generic.splitlines() if line and not line.startswith(b"#"))
    return {"devices": devices, "series": series, "exposition_bytes": size,
            "observe_s": statistics.median(observe), "scrape_after_round_s": statistics.median(after_round),
            "scrape_cached_s": statistics.median(cached), "baseline_generic_s": baseline,
            "render_cpu_after_round_s": statistics.median(after_round_cpu),
            "render_cpu_cached_s": statistics.median(cached_cpu),
            "speedup_after_round_vs_generic": baseline / statistics.median(after_round),
            "speedup_cached_vs_generic": baseline / statistics.median(cached)}


def round_seconds(devices: int) -> float | None:
    path = ROOT / "benchmarks" / "results" / "fleet_round.json"
    if not path.exists():
        return None
    for config in json.loads(path.read_text())["configurations"]:
        if config["devices"] == devices and config["edgefleet"].get("measured"):
            return float(config["edgefleet"]["seconds_per_round"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    configurations = []
    for n in args.devices:
        result = measure(n)
        round_s = round_seconds(n)
        if round_s:
            scrapes = max(0.0, round_s / SCRAPE_INTERVAL_S - 1)
            cost = result["observe_s"] + result["scrape_after_round_s"] + scrapes * result["scrape_cached_s"]
            cpu = result["observe_s"] + result["render_cpu_after_round_s"] + scrapes * result["render_cpu_cached_s"]
            result.update({"fleet_round_seconds": round_s, "exporter_seconds_per_round": cost,
                           "share_of_round": cost / round_s, "exporter_cpu_seconds_per_round": cpu,
                           "cpu_share_of_round": cpu / round_s})
        configurations.append(result)
        print(json.dumps(result), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "metrics_exporter", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_1m_at_end": os.getloadavg()[0]},
        "setup": {"round": "every device trains (2 % drop out); 14 per-device families, 3 memory levels",
                  "scrape_interval_s": SCRAPE_INTERVAL_S,
                  "fleet_round_seconds": "edgefleet seconds_per_round at the same N, benchmarks/results/fleet_round.json",
                  "share_of_round": "(observe_s + scrape_after_round_s + cached scrapes over the rest of the round) "
                                    "/ fleet_round_seconds: an upper bound on the slowdown"},
        "configurations": configurations}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
