"""A real run with the exporter on, scraped live by a real Prometheus on loopback: killed after round 2
(``stop_after_round``) and resumed. Prometheus holds per-device series equal to the run directory's records,
counters continue across the kill, and every dashboard panel has data."""
from __future__ import annotations

import json
import time

import pytest

from fleet.engine import run_scenario
from fleet.prometheus import free_port, start_prometheus
from fleet.records import read_round_logs
from fleet.roundlog import RoundLog
from tests.fleet.test_engine import scenario
from tests.fleet.test_metrics import expected_per_device
from tests.fleet.test_monitoring import DASHBOARD

ROUNDS, KILLED_AFTER = 3, 2
GROUPS = [{"name": "big", "count": 5, "target": "siracusa", "memory_kib": 4096, "availability": {"kind": "dropout", "p": 0.3}},
          {"name": "faulty", "count": 2, "target": "siracusa", "faults": {"kind": "raise"}},
          {"name": "small", "count": 3, "target": "siracusa-small-l2", "memory_kib": 2048}]


class ScrapedEachRound:
    """An observer after the exporter: each round ends only once Prometheus has scraped it."""

    def __init__(self, server):
        self.server = server

    def begin_round(self, round_: int, total_rounds: int) -> None:
        self._wait_for(round_ - 1, after=time.time())  # a scrape before each round, also on a fast machine

    def device_done(self, record) -> None:
        pass

    def end_round(self, log: RoundLog) -> None:
        self._wait_for(log.round, after=time.time())

    def _wait_for(self, rounds_completed: int, after: float) -> None:
        """Until Prometheus holds a sample taken after ``after`` with that many rounds completed."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            value = self.server.query("edgefleet_rounds_completed_total")
            scraped = self.server.query("timestamp(edgefleet_rounds_completed_total)")  # the sample's own time
            if value and scraped and float(scraped[0]["value"][1]) >= after and \
                    float(value[0]["value"][1]) == rounds_completed:
                return
            time.sleep(0.2)
        raise AssertionError(f"Prometheus did not scrape {rounds_completed} rounds completed")


@pytest.fixture(scope="module")
def scraped_run(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("scraped")
    address = f"127.0.0.1:{free_port()}"
    s = scenario(**{"training.rounds": ROUNDS, "fleet.groups": GROUPS, "training.fraction": 0.8,
                    "metrics": {"address": address}})
    with start_prometheus(root / "prometheus", address, f"127.0.0.1:{free_port()}", interval_s=1) as server:
        watch = ScrapedEachRound(server)
        assert run_scenario(s, root / "run", progress=False, stop_after_round=KILLED_AFTER,
                            observers=[watch]) == {"stopped_after_round": KILLED_AFTER}
        run_scenario(None, root / "run", resume=True, progress=False, observers=[watch])
        yield root / "run", server


def test_prometheus_series_equal_the_run_directory(scraped_run):
    path, server = scraped_run
    logs = read_round_logs(path)
    assert [log.round for log in logs] == [1, 2, 3]
    expected = expected_per_device(logs)
    causes = {c for e in expected.values() for c in e["failed"]}
    assert {"error", "dropout"} <= causes  # the run had failures and drop-outs
    for metric, key in (("edgefleet_device_upload_bytes_total", "up"),
                        ("edgefleet_device_download_bytes_total", "down"),
                        ("edgefleet_device_rounds_joined_total", "joined"),
                        ("edgefleet_device_last_seen_timestamp_seconds", "seen")):
        got = {r["metric"]["device"]: float(r["value"][1]) for r in server.query(metric)}
        assert got == pytest.approx({str(d): float(e[key]) for d, e in expected.items()}), metric
    losses = {r["metric"]["device"]: float(r["value"][1]) for r in server.query("edgefleet_device_loss")}
    assert losses == pytest.approx({str(d): e["loss"] for d, e in expected.items() if e["loss"] == e["loss"]})
    failed = {(r["metric"]["device"], r["metric"]["cause"]): float(r["value"][1])
              for r in server.query("edgefleet_device_jobs_failed_total")}
    assert failed == {(str(d), c): n for d, e in expected.items() for c, n in e["failed"].items()}
    peaks = {(r["metric"]["device"], r["metric"]["level"]) for r in server.query("edgefleet_device_peak_memory_bytes")}
    assert {level for _, level in peaks} >= {"L1", "L2"} and len({d for d, _ in peaks}) == 10
    ips = server.query("edgefleet_device_modelled_images_per_second")
    assert ips and all(float(r["value"][1]) > 0 for r in ips)


def test_counters_continue_after_kill_and_resume(scraped_run):
    _, server = scraped_run
    seen = float(server.query("count_over_time(edgefleet_rounds_completed_total[10m])")[0]["value"][1])
    assert seen >= ROUNDS + 1  # scraped before round 1, after each round, and across the restart
    for counter in ("edgefleet_rounds_completed_total", "edgefleet_device_upload_bytes_total",
                    "edgefleet_round_duration_seconds_count", "edgefleet_job_failures_total"):
        assert float(server.query(f"max(resets({counter}[10m]))")[0]["value"][1]) == 0, counter
    # the resumed process started from round 2's counters: the value after the restart is round 3's
    assert float(server.query("edgefleet_rounds_completed_total")[0]["value"][1]) == ROUNDS
    count = float(server.query("edgefleet_round_duration_seconds_count")[0]["value"][1])
    assert count == ROUNDS


def test_every_dashboard_panel_has_data_for_a_real_run(scraped_run):
    _, server = scraped_run
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        results = [server.query(t["expr"].replace("$__rate_interval", "1m").replace("$group", ".*")
                                .replace("$device", ".*")) for t in panel["targets"]]
        assert any(results), f"panel {panel['title']!r} has no data"
