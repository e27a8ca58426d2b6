"""A real Prometheus server (the Debian binary, started by `edgefleet monitor`) scraping a run's exporter on
loopback: the per-device series it stores equal the run directory's records, counters continue across a
kill and resume, and every panel of the Grafana dashboard returns data for metrics the exporter serves."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.exporter import MetricsExporter, serve_run
from fleet.metrics import SERIES, FleetMetrics
from fleet.prometheus import free_port, prometheus_config, query
from fleet.records import read_round_logs, round_log_records
from fleet.runs import RunDir
from fleet.status_cli import run_status
from tests.fleet.round_logs import round_logs, write_run_dir
from tests.fleet.test_metrics import expected_per_device, observe

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
DEVICES, ROUNDS, KILLED_AFTER = 12, 3, 2
DEADLINE_S = 60.0


class Prometheus:
    """The server `edgefleet monitor` started, seen through its HTTP API."""

    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> list[dict]:
        return query(self.url, expr)


def wait_for(server: Prometheus, expr: str, value: float) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        result = server.query(expr)
        if result and float(result[0]["value"][1]) == value:
            return
        time.sleep(0.3)
    raise AssertionError(f"Prometheus never saw {expr} == {value}")


def cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fleet.cli", *args], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, **kwargs)


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    """A run killed after round 2 and resumed, its exporter scraped by `edgefleet monitor`'s Prometheus."""
    path = tmp_path_factory.mktemp("monitored") / "run"
    logs = round_logs(DEVICES, ROUNDS)
    write_run_dir(path, logs[:KILLED_AFTER], DEVICES, ROUNDS, finished=False)
    address = f"127.0.0.1:{free_port()}"
    first = serve_run(path, address, ROUNDS)  # the first process: rounds 1-2 (the run dir holds them already)
    listen = f"127.0.0.1:{free_port()}"
    monitor = cli("monitor", str(path), "--listen", listen, "--interval", "1", stdout=subprocess.PIPE)
    lines = []
    for line in monitor.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    pid = int(re.search(r"pid (\d+)", lines[0]).group(1))
    server = Prometheus(f"http://{listen}")
    try:
        wait_for(server, "edgefleet_rounds_completed_total", KILLED_AFTER)
        first.close()  # killed
        exporter = serve_run(path, address, ROUNDS)  # --resume: counters restored from the run directory
        run = RunDir(path)
        for log in logs[KILLED_AFTER:]:
            observe(exporter.metrics, [log], ROUNDS)
            run.append_metrics(round_log_records(log))
        run.write_state({"rounds_completed": ROUNDS, "finished": False})
        wait_for(server, "edgefleet_rounds_completed_total", ROUNDS)
        yield path, server, lines, exporter
    finally:
        monitor.send_signal(signal.SIGINT)
        assert monitor.wait(timeout=30) == 0
        with pytest.raises(ProcessLookupError):  # `edgefleet monitor` stopped its Prometheus
            os.kill(pid, 0)
        if "exporter" in locals():
            exporter.close()


def vector(server: Prometheus, expr: str) -> dict[str, float]:
    return {r["metric"]["device"]: float(r["value"][1]) for r in server.query(expr)}


def test_monitor_prints_urls_and_writes_its_files_in_the_run(monitored):
    path, server, lines, _ = monitored
    text = "".join(lines)
    assert server.url in text and "/metrics" in text and "grafana-dashboard.json" in text
    assert (path / "prometheus" / "prometheus.yml").exists() and any((path / "prometheus" / "data").iterdir())
    assert server.query("up")[0]["value"][1] == "1"


def test_prometheus_holds_the_run_directory_values_per_device(monitored):
    path, server, _, _ = monitored
    expected = expected_per_device(read_round_logs(path))
    assert len(expected) == DEVICES
    for metric, key in (("edgefleet_device_upload_bytes_total", "up"), ("edgefleet_device_download_bytes_total", "down"),
                        ("edgefleet_device_rounds_joined_total", "joined"),
                        ("edgefleet_device_last_seen_timestamp_seconds", "seen")):
        assert vector(server, metric) == {str(d): float(e[key]) for d, e in expected.items()}, metric
    losses = vector(server, "edgefleet_device_loss")
    assert losses == pytest.approx({str(d): e["loss"] for d, e in expected.items() if e["loss"] == e["loss"]})
    peaks = vector(server, 'edgefleet_device_peak_memory_bytes{level="L2"}')
    assert peaks == {str(d): float(e["peak"]["L2"]) for d, e in expected.items()}
    groups = {r["metric"]["device"]: r["metric"]["group"] for r in server.query("edgefleet_device_state")}
    assert groups == {str(d): e["labels"]["group"] for d, e in expected.items()}
    failed = {(r["metric"]["device"], r["metric"]["cause"]): float(r["value"][1])
              for r in server.query("edgefleet_device_jobs_failed_total")}
    assert failed == {(str(d), c): n for d, e in expected.items() for c, n in e["failed"].items()}
    assert {c for _, c in failed} == {"error", "dropout", "straggler", "offline", "nonfinite"}


def test_counters_continue_across_kill_and_resume(monitored):
    _, server, _, _ = monitored
    for counter in ("edgefleet_rounds_completed_total", "edgefleet_device_upload_bytes_total",
                    "edgefleet_job_failures_total", "edgefleet_round_duration_seconds_count"):
        resets = server.query(f"max(resets({counter}[10m]))")
        assert float(resets[0]["value"][1]) == 0, counter
        # the first process's value was seen, then the resumed one's: the counter grew, it did not restart
        assert float(server.query(f"max(increase({counter}[10m]))")[0]["value"][1]) > 0 or counter.startswith(
            "edgefleet_job_failures")
    history = server.query("max_over_time(edgefleet_rounds_completed_total[10m])")
    assert float(history[0]["value"][1]) == ROUNDS
    assert float(server.query("min_over_time(edgefleet_rounds_completed_total[10m])")[0]["value"][1]) == KILLED_AFTER


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def test_dashboard_is_grafana_10_with_device_and_group_variables():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 38  # Grafana 10.0
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"group", "device"} <= set(variables)
    assert "$group" in variables["device"]["query"]["query"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("memory", "throughput", "loss", "metric", "failures", "duration", "state"):
        assert topic in titles, topic
    assert sum("$device" in expr for _, expr in panel_queries()) >= 6


def test_every_panel_query_returns_data_for_served_metrics(monitored):
    _, server, _, _ = monitored
    served = {name for name in SERIES}
    for title, expr in panel_queries():
        for name in re.findall(r"\bedgefleet_[a-z0-9_]+", expr):
            assert name in served, f"panel {title!r} names {name}, which the exporter does not serve"
        query = expr.replace("$__rate_interval", "1m").replace("$group", ".*").replace("$device", ".*")
        assert server.query(query), f"panel {title!r}: {expr} returned no data"


def test_status_of_a_live_and_a_stopped_run(monitored, tmp_path):
    path, _, _, exporter = monitored
    live = run_status(path)
    assert (live.condition, live.rounds_completed, live.rounds_planned) == ("live", ROUNDS, ROUNDS)
    assert live.exporter == exporter.address
    assert live.devices_by_state["failed"] == 1 and sum(live.devices_by_state.values()) == DEVICES
    assert live.last_round["failures"] == {"nonfinite": 1}
    out = subprocess.run([sys.executable, "-m", "fleet.cli", "status", str(path)], cwd=ROOT, text=True,
                         capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert "live" in out and f"round {ROUNDS} of {ROUNDS}" in out and exporter.address in out
    logs = round_logs(DEVICES, 4)
    write_run_dir(tmp_path / "stopped", logs[:2], DEVICES, 4, finished=False)
    stopped = run_status(tmp_path / "stopped")
    assert stopped.condition == "stopped" and stopped.rounds_completed == 2
    mean = (logs[0].duration_s + logs[1].duration_s) / 2
    assert stopped.eta_s == pytest.approx(2 * mean)
    assert stopped.elapsed_s == pytest.approx(logs[1].ended_at - logs[0].started_at)


def test_monitor_without_prometheus_names_the_package(tmp_path):
    write_run_dir(tmp_path / "run", round_logs(4, 1), 4, 1)
    bare = tmp_path / "bin"
    bare.mkdir()
    os.symlink(sys.executable, bare / "python3")
    proc = cli("monitor", str(tmp_path / "run"), env={"PATH": str(bare)}, stdout=subprocess.PIPE,
               stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and out == ""
    assert err.count("\n") == 1 and "prometheus" in err and "Debian package 'prometheus'" in err


def test_shipped_prometheus_config_scrapes_the_default_address():
    assert (ROOT / "monitoring" / "prometheus.yml").read_text() == prometheus_config("127.0.0.1:9464")
    check = subprocess.run(["promtool", "check", "config", str(ROOT / "monitoring" / "prometheus.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
