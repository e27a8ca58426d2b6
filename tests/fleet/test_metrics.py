"""The metrics vocabulary and the exporter's collector: names by Prometheus conventions, the fast exposition
equal to prometheus-client's own formatter, values equal to the run directory's records, counters that
continue after a resume."""
from __future__ import annotations

import math
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleet.exporter import MetricsExporter, read_exporter_info, serve_run
from fleet.metrics import DEVICE_LABELS, METRICS, SERIES, FleetMetrics
from fleet.records import read_round_logs
from tests.fleet.round_logs import round_logs, write_run_dir

UNITS = ("_bytes", "_seconds", "_total", "_cycles", "_per_second", "_info", "_round", "_rounds", "_devices",
         "_loss", "_metric", "_state", "_participants", "_failures")


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def observe(metrics: FleetMetrics, logs, total_rounds: int) -> None:
    """What the round driver does: begin, each device's record as it arrives, end."""
    for log in logs:
        metrics.begin_round(log.round, total_rounds)
        for record in log.devices:
            metrics.device_done(record)
        metrics.end_round(log)


def test_vocabulary_follows_prometheus_conventions():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert m.name.startswith("edgefleet_") and m.name == m.name.lower()
        assert (m.kind == "counter") == m.name.endswith("_total"), m.name
        assert m.kind in ("gauge", "counter", "histogram") and m.help
        if m.name.startswith("edgefleet_device_"):
            assert m.labels[:4] == DEVICE_LABELS
        assert "bytes" not in m.name or m.name.endswith(("_bytes", "_bytes_total")), m.name


def test_fast_exposition_equals_prometheus_client_formatter():
    logs = round_logs(devices=12, rounds=3)
    metrics = FleetMetrics(clock=lambda: 1_800_000_000.0)
    observe(metrics, logs, 3)
    registry = CollectorRegistry()
    registry.register(metrics)
    fast, generic = samples(metrics.render()), samples(generate_latest(registry))
    for own in (fast, generic):  # the exporter's own timings differ from scrape to scrape
        for key in [k for k in own if k[0].startswith("edgefleet_exporter_")]:
            own.pop(key)
    assert fast.keys() == generic.keys()
    for key, value in fast.items():
        assert value == generic[key] or (math.isnan(value) and math.isnan(generic[key])), key
    assert {name for name, _ in fast} <= SERIES


def expected_per_device(logs):
    """Each device's numbers computed straight from the records (the oracle for the exporter's series)."""
    out = {}
    for log in logs:
        for r in log.devices:
            d = out.setdefault(r.device, {"up": 0, "down": 0, "joined": 0, "loss": math.nan, "seen": math.nan,
                                          "failed": {}, "link_s": 0.0, "link_bytes": 0, "cycles": 0})
            if r.telemetry.link_bytes:
                d["link_s"] += r.telemetry.link_s
                d["link_bytes"] += r.telemetry.link_bytes
            if r.ok and r.instruction == "train" and r.telemetry.measured_cycles:
                d["cycles"] = r.telemetry.measured_cycles // r.telemetry.steps
            d["up"] += r.telemetry.bytes_up
            d["down"] += r.telemetry.bytes_down
            d["joined"] += r.ok and r.instruction == "train"
            if r.ok and r.instruction == "train":
                d["loss"] = r.loss
            if r.cause:
                d["failed"][r.cause] = d["failed"].get(r.cause, 0) + 1
            if r.ok or r.cause in ("error", "nonfinite"):
                d["seen"] = log.ended_at
            d["state"] = ("idle" if r.ok else "dropped" if r.cause in ("dropout", "offline") else
                          "straggling" if r.cause == "straggler" else "failed")
            d["peak"] = dict(r.telemetry.peak_bytes_by_level)
            d["labels"] = {"device": str(r.device), "group": r.group, "target": r.target, "runtime": r.runtime}
    return out


def test_device_series_equal_the_run_directory(tmp_path):
    logs = round_logs(devices=12, rounds=3)
    write_run_dir(tmp_path / "run", logs, 12, 3)
    metrics = FleetMetrics()
    observe(metrics, logs, 3)
    got = samples(metrics.render())
    for device, e in expected_per_device(read_round_logs(tmp_path / "run")).items():
        labels = tuple(sorted(e["labels"].items()))
        assert got[("edgefleet_device_upload_bytes_total", labels)] == e["up"]
        assert got[("edgefleet_device_download_bytes_total", labels)] == e["down"]
        assert got[("edgefleet_device_rounds_joined_total", labels)] == e["joined"]
        assert got[("edgefleet_device_last_seen_timestamp_seconds", labels)] == e["seen"]
        assert got[("edgefleet_device_state", tuple(sorted({**e["labels"], "state": e["state"]}.items())))] == 1
        for cause, count in e["failed"].items():
            assert got[("edgefleet_device_jobs_failed_total",
                        tuple(sorted({**e["labels"], "cause": cause}.items())))] == count
        for level, value in e["peak"].items():
            assert got[("edgefleet_device_peak_memory_bytes",
                        tuple(sorted({**e["labels"], "level": level}.items())))] == value
        if math.isfinite(e["loss"]):
            assert got[("edgefleet_device_loss", labels)] == pytest.approx(e["loss"])
        assert got.get(("edgefleet_device_link_bytes_total", labels), 0) == e["link_bytes"]
        assert got.get(("edgefleet_device_link_seconds_total", labels), 0) == pytest.approx(e["link_s"])
        assert got.get(("edgefleet_device_measured_step_cycles", labels), 0) == e["cycles"]
    assert any(e["link_bytes"] and e["cycles"] for e in expected_per_device(logs).values())
    failures = {}
    for log in logs:
        for r in log.devices:
            if r.cause:
                failures[r.cause] = failures.get(r.cause, 0) + 1
    assert {k: got[("edgefleet_job_failures_total", (("cause", k),))] for k in failures} == failures
    assert set(failures) >= {"error", "dropout", "straggler", "offline", "nonfinite"}
    assert got[("edgefleet_round_duration_seconds_count", ())] == 3
    assert got[("edgefleet_round_duration_seconds_sum", ())] == pytest.approx(sum(l.duration_s for l in logs))
    states = {s: got[("edgefleet_devices", (("state", s),))] for s in ("idle", "failed", "dropped")}
    assert states == {"idle": 10, "failed": 1, "dropped": 1}  # round 3: device 9 nonfinite, device 3 offline


def test_counters_continue_after_resume(tmp_path):
    logs = round_logs(devices=12, rounds=4)
    uninterrupted = FleetMetrics()
    observe(uninterrupted, logs, 4)
    write_run_dir(tmp_path / "run", logs[:2], 12, 4, finished=False)  # killed after round 2
    exporter = serve_run(tmp_path / "run", "127.0.0.1:0", planned_rounds=4)
    try:
        assert read_exporter_info(tmp_path / "run").address == exporter.address
        resumed = exporter.metrics
        assert samples(resumed.render())[("edgefleet_rounds_completed_total", ())] == 2
        observe(resumed, logs[2:], 4)
        with urllib.request.urlopen(exporter.url, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            served = samples(response.read())
    finally:
        exporter.close()
    expected = samples(uninterrupted.render())
    counters = [k for k in expected if k[0].endswith(("_total", "_count", "_sum", "_bucket"))
                and not k[0].startswith("edgefleet_exporter_")]
    assert len(counters) > 12 * 3
    for key in counters:
        assert served[key] == pytest.approx(expected[key]), key
    assert served[("edgefleet_run_start_time_seconds", ())] == logs[0].started_at


def test_exporter_listens_on_loopback_by_default():
    exporter = MetricsExporter(FleetMetrics(), "127.0.0.1:0")
    try:
        assert exporter.address.startswith("127.0.0.1:")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(exporter.url.replace("/metrics", "/other"), timeout=5)
    finally:
        exporter.close()
