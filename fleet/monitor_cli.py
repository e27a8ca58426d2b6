"""`edgefleet monitor RUN_DIR`: a local Prometheus server scraping the run's exporter until Ctrl-C."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fleet.exporter import read_exporter_info
from fleet.prometheus import DIR, SCRAPE_INTERVAL_S, PrometheusError, find_binary, start_prometheus
from fleet.records import read_run_scenario

DASHBOARD = Path(__file__).resolve().parents[1] / "monitoring" / "grafana-dashboard.json"


def exporter_target(run_dir: str | Path) -> str:
    """The run's exporter address: where it listens (exporter.json), else what its scenario asks for."""
    info = read_exporter_info(run_dir)
    if info is not None:
        return info.address
    metrics = read_run_scenario(run_dir).metrics
    if not metrics.enabled:
        raise PrometheusError(f"{run_dir}: the run exports no metrics; enable them in its scenario "
                              "([metrics] enabled = true)")
    return str(metrics.address)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("monitor", help="start a local Prometheus server scraping a run's metrics",
                              description="Start Prometheus (the Debian `prometheus` binary) on loopback, data in "
                                          "RUN_DIR/prometheus, scraping the run's exporter; stops on Ctrl-C.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--listen", default="127.0.0.1:9090", help="Prometheus's address (default 127.0.0.1:9090)")
    p.add_argument("--interval", type=int, default=SCRAPE_INTERVAL_S, help="scrape interval in seconds")
    p.set_defaults(handler=monitor)
    return p


def monitor(args: argparse.Namespace) -> int:
    find_binary()  # a missing binary is reported before anything else
    if not Path(args.run_dir).is_dir():
        raise ValueError(f"{args.run_dir}: no such run directory")
    target = exporter_target(args.run_dir)
    server = start_prometheus(Path(args.run_dir) / DIR, target, args.listen, args.interval)
    print(f"prometheus:  {server.url}  (pid {server.process.pid}, data in {server.directory / 'data'})")
    print(f"scraping:    http://{target}/metrics")
    print(f"graph:       {server.url}/graph?g0.expr=edgefleet_run_current_round")
    print(f"grafana:     import {DASHBOARD} (data source: Prometheus at {server.url})")
    print("Ctrl-C stops Prometheus", flush=True)
    try:
        code = server.process.wait()
    except KeyboardInterrupt:
        server.stop()
        return 0
    print(f"prometheus exited with code {code}; see {server.directory / 'prometheus.log'}", file=sys.stderr)
    return 1
