"""Every Prometheus metric edgefleet serves, declared here and nowhere else, and the collector that sets them.

``FleetMetrics`` is a RoundObserver: it keeps the latest numbers per device and the run's counters in
memory, updated from the DeviceRecords and RoundLogs the round driver hands it (never from Ray actors), and
turns them into metric families at collection time (a prometheus-client custom collector). Names follow
Prometheus conventions: an ``edgefleet_`` prefix, base units (``_bytes``, ``_seconds``), ``_total`` for
counters. Per-device series (labels device, group, target, runtime) are the deliberate high-cardinality
choice of this exporter: 14 series per device, so ``render`` formats a device's lines once per change and
joins cached lines at a scrape (prometheus-client's generic formatter would take seconds at 10,000
devices); ``collect`` yields the same families through prometheus-client for any registry.

After --resume, ``restore`` replays the run directory's RoundLogs, so counters continue where the killed
run stopped.
"""
from __future__ import annotations

import functools
import math
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric as Family
from prometheus_client.utils import floatToGoString

from device_runtime.protocol import CAUSE_DROPOUT, CAUSE_OFFLINE, CAUSE_STRAGGLER
from fleet.roundlog import DeviceRecord, RoundLog

DEVICE_LABELS = ("device", "group", "target", "runtime")
STATES = ("idle", "training", "failed", "dropped", "straggling")
BLOCK = 256                              # devices whose rendered lines are cached together
ROUND_DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclass(frozen=True)
class Metric:
    name: str                            # the family name; a counter's includes its _total
    kind: str                            # gauge | counter | histogram
    help: str
    labels: tuple[str, ...] = ()

    @property
    def series(self) -> tuple[str, ...]:
        """The sample names Prometheus stores for this family."""
        if self.kind == "histogram":
            return (self.name + "_bucket", self.name + "_sum", self.name + "_count")
        return (self.name,)


def _device(name: str, kind: str, help_: str, *extra: str) -> Metric:
    return Metric(name, kind, help_, DEVICE_LABELS + extra)


# ---- per device (in the order ``_device_lines`` renders them) -------------------------------------------
DEVICE_METRICS = (
    _device("edgefleet_device_peak_memory_bytes", "gauge", "Peak bytes of the device's program per memory level.",
            "level"),
    _device("edgefleet_device_memory_budget_bytes", "gauge", "The device's memory budget."),
    _device("edgefleet_device_modelled_step_cycles", "gauge", "Cycles per training step by the target's cost model."),
    _device("edgefleet_device_modelled_images_per_second", "gauge",
            "Training samples per second on the target by its cost model (last training job)."),
    _device("edgefleet_device_measured_images_per_second", "gauge",
            "Training samples per second measured on the host running the device (last training job)."),
    _device("edgefleet_device_job_duration_seconds", "gauge", "Measured wall time of the device's last job."),
    _device("edgefleet_device_loss", "gauge", "Mean training loss of the device's last training job."),
    _device("edgefleet_device_metric", "gauge",
            "Task metric (accuracy or AUC) after the device's last job: trained adapters, or those evaluated."),
    _device("edgefleet_device_upload_bytes_total", "counter", "Bytes the device sent to the server."),
    _device("edgefleet_device_download_bytes_total", "counter", "Bytes the server sent to the device."),
    _device("edgefleet_device_rounds_joined_total", "counter", "Rounds in which the device's training was used."),
    _device("edgefleet_device_jobs_failed_total", "counter", "The device's jobs that failed or it missed.",
            "cause"),
    _device("edgefleet_device_last_seen_timestamp_seconds", "gauge", "Unix time of the device's last reply."),
    _device("edgefleet_device_state", "gauge", "1 for the device's current state.", "state"),
    _device("edgefleet_device_measured_step_cycles", "gauge",
            "Cycles per training step counted on the device (boards, QEMU) in its last training job."),
    _device("edgefleet_device_link_seconds_total", "counter",
            "Time spent on the serial link to the device (boards), both directions, retries included."),
    _device("edgefleet_device_link_bytes_total", "counter",
            "Bytes over the serial link to the device (boards), both directions, framing included."),
)

# ---- per round (the last finished round, and counters over rounds) ---------------------------------------
ROUND_DURATION = Metric("edgefleet_round_duration_seconds", "histogram", "Wall time of a round.")
ROUND_SAMPLED = Metric("edgefleet_round_sampled_devices", "gauge", "Devices sent a training job in the last round.")
ROUND_PARTICIPANTS = Metric("edgefleet_round_participants", "gauge",
                            "Devices whose job succeeded in the last round, by instruction.", ("instruction",))
ROUND_FAILURES = Metric("edgefleet_round_failures", "gauge",
                        "Jobs of the last round that failed or were missed, by cause (offline and dropout are "
                        "availability, the others failures).", ("cause",))
FAILURES = Metric("edgefleet_job_failures_total", "counter", "Jobs that failed or were missed, by cause.", ("cause",))
REJECTED = Metric("edgefleet_replies_rejected_total", "counter",
                  "Replies the strategy's guard left out of aggregation, by cause.", ("cause",))
ROUND_AGGREGATION = Metric("edgefleet_round_aggregation_seconds", "gauge", "Aggregation time of the last round.")
ROUND_PHASE = Metric("edgefleet_round_phase_seconds", "gauge", "Time of each phase of the last round.", ("phase",))
ROUND_SERVER_METRIC = Metric("edgefleet_round_server_metric", "gauge",
                             "The strategy's server-side metrics of the last round.", ("name",))
ROUND_LOSS = Metric("edgefleet_round_train_loss", "gauge", "Mean training loss over the last round's devices.")
ROUND_METRIC = Metric("edgefleet_round_metric", "gauge",
                      "Mean task metric of the last round: before and after local training, and of the global "
                      "adapters on evaluated devices.", ("stage",))
ROUND_BYTES = Metric("edgefleet_transferred_bytes_total", "counter", "Bytes between server and devices.",
                     ("direction",))
# ---- per run ----------------------------------------------------------------------------------------------
CURRENT_ROUND = Metric("edgefleet_run_current_round", "gauge", "The round running now (or the last one).")
PLANNED_ROUNDS = Metric("edgefleet_run_planned_rounds", "gauge", "Rounds the run is configured for.")
ROUNDS_COMPLETED = Metric("edgefleet_rounds_completed_total", "counter", "Rounds finished.")
DEVICES = Metric("edgefleet_devices", "gauge", "Devices by state.", ("state",))
START_TIME = Metric("edgefleet_run_start_time_seconds", "gauge", "Unix time the run started.")
BUILD_INFO = Metric("edgefleet_build_info", "gauge", "edgefleet's version and git commit.", ("version", "commit"))
RENDER_TIME = Metric("edgefleet_exporter_render_seconds", "gauge", "Time the exporter took for its previous scrape.")
EXPORTER_CPU = Metric("edgefleet_exporter_cpu_seconds_total", "counter",
                      "CPU time the exporter spent: taking records from the round driver (observe) and rendering "
                      "scrapes (render).", ("activity",))

RUN_METRICS = (ROUND_DURATION, ROUND_SAMPLED, ROUND_PARTICIPANTS, ROUND_FAILURES, FAILURES, REJECTED,
               ROUND_AGGREGATION, ROUND_PHASE, ROUND_SERVER_METRIC, ROUND_LOSS, ROUND_METRIC, ROUND_BYTES,
               CURRENT_ROUND, PLANNED_ROUNDS, ROUNDS_COMPLETED, DEVICES, START_TIME, BUILD_INFO, RENDER_TIME, EXPORTER_CPU)
METRICS = DEVICE_METRICS + RUN_METRICS
SERIES = frozenset(s for m in METRICS for s in m.series)


def state_of(record: DeviceRecord) -> str:
    if record.ok:
        return "idle"
    if record.cause in (CAUSE_DROPOUT, CAUSE_OFFLINE):
        return "dropped"
    return "straggling" if record.cause == CAUSE_STRAGGLER else "failed"


def _replied(record: DeviceRecord) -> bool:
    return record.ok or record.cause not in (CAUSE_DROPOUT, CAUSE_OFFLINE, CAUSE_STRAGGLER)


class DeviceState:
    """What the exporter knows of one device; ``lines`` caches its rendered samples (None: re-render)."""
    __slots__ = ("labels", "prefix", "budget_bytes", "peak", "cycles", "modelled_ips", "measured_ips", "wall_s",
                 "loss", "metric", "up", "down", "joined", "failed", "last_seen", "state", "lines", "slot",
                 "measured_cycles", "link_s", "link_bytes")

    def __init__(self, labels: tuple[str, str, str, str], slot: int):
        self.slot = slot                 # position in the exposition (registration order)
        self.labels = labels
        self.prefix = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(DEVICE_LABELS, labels))
        self.budget_bytes = 0
        self.peak: Mapping[str, int] = {}
        self.cycles = 0
        self.modelled_ips = self.measured_ips = self.wall_s = self.loss = self.metric = math.nan
        self.up = self.down = self.joined = 0
        self.measured_cycles = self.link_bytes = 0    # boards and QEMU devices only (0: not emitted)
        self.link_s = 0.0
        self.failed: dict[str, int] = {}
        self.last_seen = math.nan
        self.state = "idle"
        self.lines: tuple[str, ...] | None = None


class FleetMetrics:
    """The exporter's memory of the run (a RoundObserver) and its prometheus-client collector."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self._lock = threading.Lock()
        self._devices: dict[int, DeviceState] = {}
        self._order: list[DeviceState] = []      # by slot
        self._blocks: list[tuple[bytes, ...] | None] = []  # per block of BLOCK devices: its lines per family
        self.start_time = clock()
        self.current_round = 0
        self.planned_rounds = 0
        self.rounds_completed = 0
        self.failures: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.bytes = {"up": 0, "down": 0}
        self.durations: list[float] = []
        self.last: RoundLog | None = None
        self.last_summary: dict = {}
        self.participants: dict[str, int] = dict.fromkeys(("train", "evaluate", "personalize"), 0)
        self.render_s = 0.0              # wall and CPU time of the previous ``render``
        self.render_cpu_s = 0.0
        self.cpu_s = {"observe": 0.0, "render": 0.0}  # accumulated thread CPU time

    # ---- observer ---------------------------------------------------------------------------------------
    def register_device(self, device: int, group: str = "", target: str = "", runtime: str = "",
                        budget_bytes: int = 0, peak_bytes_by_level: Mapping[str, int] | None = None) -> None:
        with self._lock:
            d = self._entry(device, group, target, runtime)
            d.budget_bytes = int(budget_bytes) or d.budget_bytes
            d.peak = dict(peak_bytes_by_level or d.peak)
            self._touch(d)

    def begin_round(self, round_: int, total_rounds: int) -> None:
        self.current_round, self.planned_rounds = int(round_), int(total_rounds)

    def jobs_sent(self, round_: int, devices: Sequence[int]) -> None:
        """Devices sent a training job (state "training" until they answer)."""
        with self._lock:
            for index in devices:
                d = self._devices.get(int(index))
                if d is not None:
                    d.state = "training"
                    self._touch(d)

    def device_done(self, record: DeviceRecord) -> None:
        cpu0 = time.thread_time()
        with self._lock:
            self._apply(record, self.clock())
            self.cpu_s["observe"] += time.thread_time() - cpu0

    def end_round(self, log: RoundLog) -> None:
        cpu0 = time.thread_time()
        with self._lock:
            seen = log.ended_at or self.clock()
            for record in log.devices:
                self._apply(record, seen)
                d = self._devices[record.device]
                d.up += record.telemetry.bytes_up
                d.down += record.telemetry.bytes_down
                if record.telemetry.link_bytes:  # measured on a serial link (a simulated device's is modelled)
                    d.link_s += record.telemetry.link_s
                    d.link_bytes += record.telemetry.link_bytes
                if record.ok and record.instruction == "train":
                    d.joined += 1
                if record.cause:
                    d.failed[record.cause] = d.failed.get(record.cause, 0) + 1
                    self.failures[record.cause] = self.failures.get(record.cause, 0) + 1
                self.bytes["up"] += record.telemetry.bytes_up
                self.bytes["down"] += record.telemetry.bytes_down
            for cause, count in log.rejected.items():
                self.rejected[cause] = self.rejected.get(cause, 0) + int(count)
            self.durations.append(log.duration_s)
            self.rounds_completed += 1
            self.current_round = max(self.current_round, log.round)
            self.last, self.last_summary = log, log.summary()
            self.participants = dict.fromkeys(("train", "evaluate", "personalize"), 0)
            for r in log.devices:
                self.participants[r.instruction] += r.ok
            self.cpu_s["observe"] += time.thread_time() - cpu0

    def restore(self, logs: Iterable[RoundLog], planned_rounds: int = 0) -> None:
        """Replay the finished rounds of a run (after --resume): counters continue from them."""
        logs = list(logs)
        for log in logs:
            self.end_round(log)
        if logs and logs[0].started_at:
            self.start_time = logs[0].started_at
        self.planned_rounds = planned_rounds or self.planned_rounds

    def _entry(self, device: int, group: str, target: str, runtime: str) -> DeviceState:
        d = self._devices.get(device)
        labels = (str(device), group, target, runtime)
        if d is None:
            d = self._devices[device] = DeviceState(labels, len(self._order))
            self._order.append(d)
            if d.slot // BLOCK == len(self._blocks):
                self._blocks.append(None)
            self._touch(d)
        elif labels != d.labels and any(labels[1:]) and tuple(n or o for n, o in zip(labels, d.labels)) != d.labels:
            old = d
            d = self._devices[device] = self._order[old.slot] = DeviceState(
                tuple(n or o for n, o in zip(labels, old.labels)), old.slot)
            for name in DeviceState.__slots__[2:-2]:
                setattr(d, name, getattr(old, name))
            self._touch(d)
        return d

    def _touch(self, d: DeviceState) -> None:
        d.lines = None
        self._blocks[d.slot // BLOCK] = None

    def _apply(self, r: DeviceRecord, seen: float) -> None:
        d = self._entry(r.device, r.group, r.target, r.runtime)
        t = r.telemetry
        d.budget_bytes = r.budget_bytes or d.budget_bytes
        d.peak = t.peak_bytes_by_level or d.peak
        d.cycles = t.modelled_cycles_per_step or d.cycles
        d.state = state_of(r)
        if _replied(r):
            d.last_seen = seen
        if r.ok:
            d.wall_s = t.wall_s
            if r.instruction != "evaluate":
                d.loss = r.loss if math.isfinite(r.loss) else d.loss
                d.modelled_ips = t.samples / t.modelled_s if t.samples and t.modelled_s > 0 else d.modelled_ips
                d.measured_ips = t.samples / t.wall_s if t.samples and t.wall_s > 0 else d.measured_ips
                d.measured_cycles = t.measured_cycles // t.steps if t.measured_cycles and t.steps else d.measured_cycles
            metric = r.metric_before if r.instruction == "evaluate" else r.metric_after
            d.metric = metric if math.isfinite(metric) else d.metric
        self._touch(d)

    # ---- numbers ------------------------------------------------------------------------------------------
    def snapshot(self) -> list[DeviceState]:
        """The devices' states, by device index (read-only use: report, status)."""
        with self._lock:
            return [self._devices[k] for k in sorted(self._devices)]

    def devices_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for d in list(self._devices.values()):
            counts[d.state] += 1
        return counts

    def run_families(self) -> list[Family]:
        out: list[Family] = []

        def gauge(m: Metric, values: Mapping[tuple[str, ...], float] | float) -> None:
            family = GaugeMetricFamily(m.name, m.help, labels=m.labels if m.labels else None)
            items = values.items() if isinstance(values, Mapping) else [((), values)]
            for labels, value in items:
                family.add_metric(list(labels), value)
            out.append(family)

        def counter(m: Metric, values: Mapping[tuple[str, ...], float] | float) -> None:
            family = CounterMetricFamily(m.name, m.help, labels=m.labels if m.labels else None)
            items = values.items() if isinstance(values, Mapping) else [((), values)]
            for labels, value in items:
                family.add_metric(list(labels), value)
            out.append(family)

        last, s = self.last, self.last_summary
        buckets, total = [], 0
        for bound in ROUND_DURATION_BUCKETS_S:
            total = sum(1 for x in self.durations if x <= bound)
            buckets.append((floatToGoString(bound), total))
        buckets.append(("+Inf", len(self.durations)))
        histogram = HistogramMetricFamily(ROUND_DURATION.name, ROUND_DURATION.help)
        histogram.add_metric([], buckets, sum(self.durations))
        out.append(histogram)
        gauge(ROUND_SAMPLED, len(last.sampled) if last else 0)
        gauge(ROUND_PARTICIPANTS, {(k,): v for k, v in self.participants.items()})
        round_causes = {**s.get("failures", {}), **s.get("unavailable", {})}
        gauge(ROUND_FAILURES, {(k,): v for k, v in sorted(round_causes.items())})
        counter(FAILURES, {(k,): v for k, v in sorted(self.failures.items())})
        counter(REJECTED, {(k,): v for k, v in sorted(self.rejected.items())})
        timings = last.timings if last else {}
        gauge(ROUND_AGGREGATION, sum(v for k, v in timings.items() if k.startswith("aggregate")))
        gauge(ROUND_PHASE, {(k,): v for k, v in sorted(timings.items())})
        gauge(ROUND_SERVER_METRIC, {(k,): v for k, v in sorted((last.server_metrics if last else {}).items())})
        gauge(ROUND_LOSS, s.get("train_loss", math.nan))
        gauge(ROUND_METRIC, {("before",): s.get("metric_before", math.nan), ("after",): s.get("metric_after", math.nan),
                             ("global",): s.get("global_metric", math.nan)})
        counter(ROUND_BYTES, {(k,): v for k, v in self.bytes.items()})
        gauge(CURRENT_ROUND, self.current_round)
        gauge(PLANNED_ROUNDS, self.planned_rounds)
        counter(ROUNDS_COMPLETED, self.rounds_completed)
        gauge(DEVICES, {(k,): v for k, v in self.devices_by_state().items()})
        gauge(START_TIME, self.start_time)
        gauge(BUILD_INFO, {build_info(): 1})
        gauge(RENDER_TIME, self.render_s)
        counter(EXPORTER_CPU, {(k,): v for k, v in self.cpu_s.items()})
        return out

    def device_families(self) -> list[Family]:
        """The per-device families through prometheus-client (the generic, slow path; ``render`` is the fast one)."""
        families = [(GaugeMetricFamily if m.kind == "gauge" else CounterMetricFamily)(m.name, m.help, labels=m.labels)
                    for m in DEVICE_METRICS]
        with self._lock:
            for d in self._devices.values():
                for i, extra, value in _device_values(d):
                    families[i].add_metric(list(d.labels) + list(extra), value)
        return families

    def collect(self) -> Iterator[Family]:
        """prometheus-client's Collector interface (``registry.register(fleet_metrics)``)."""
        yield from self.device_families()
        yield from self.run_families()

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every metric, with cached per-device lines."""
        t0, cpu0 = time.perf_counter(), time.thread_time()
        with self._lock:
            for b, block in enumerate(self._blocks):
                if block is None:
                    devices = self._order[b * BLOCK:(b + 1) * BLOCK]
                    for d in devices:
                        if d.lines is None:
                            d.lines = _device_lines(d)
                    self._blocks[b] = tuple("".join(d.lines[i] for d in devices).encode()
                                            for i in range(len(DEVICE_METRICS)))
            blocks = list(self._blocks)
        parts = []
        for i, m in enumerate(DEVICE_METRICS):
            name = m.name
            parts.append(f"# HELP {name} {m.help}\n# TYPE {name} {m.kind}\n".encode())
            parts.extend(block[i] for block in blocks)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(self.run_families))
        parts.append(generate_latest(registry))
        text = b"".join(parts)
        self.render_s = time.perf_counter() - t0
        self.render_cpu_s = time.thread_time() - cpu0
        self.cpu_s["render"] += self.render_cpu_s
        return text


class _Families:
    def __init__(self, make):
        self.collect = make


def _device_values(d: DeviceState) -> Iterator[tuple[int, tuple[str, ...], float]]:
    """(index into DEVICE_METRICS, extra label values, value) of each of a device's samples."""
    for level, value in sorted(d.peak.items()):
        yield 0, (level,), value
    if d.budget_bytes:
        yield 1, (), d.budget_bytes
    if d.cycles:
        yield 2, (), d.cycles
    for i, value in ((3, d.modelled_ips), (4, d.measured_ips), (5, d.wall_s), (6, d.loss), (7, d.metric)):
        if math.isfinite(value):
            yield i, (), value
    yield 8, (), d.up
    yield 9, (), d.down
    yield 10, (), d.joined
    for cause, count in sorted(d.failed.items()):
        yield 11, (cause,), count
    if math.isfinite(d.last_seen):
        yield 12, (), d.last_seen
    yield 13, (d.state,), 1
    if d.measured_cycles:
        yield 14, (), d.measured_cycles
    if d.link_bytes:
        yield 15, (), d.link_s
        yield 16, (), d.link_bytes


def _device_lines(d: DeviceState) -> tuple[str, ...]:
    """A device's samples as exposition lines, one string per family (the same samples as _device_values)."""
    p, n = d.prefix, _NAMES
    finite = math.isfinite
    peak = "".join(f'{n[0]}{{{p},level="{_escape(k)}"}} {_number(v)}\n' for k, v in sorted(d.peak.items()))
    lines = [peak, f"{n[1]}{{{p}}} {d.budget_bytes}\n" if d.budget_bytes else "",
             f"{n[2]}{{{p}}} {d.cycles}\n" if d.cycles else ""]
    for i, value in ((3, d.modelled_ips), (4, d.measured_ips), (5, d.wall_s), (6, d.loss), (7, d.metric)):
        lines.append(f"{n[i]}{{{p}}} {_number(value)}\n" if finite(value) else "")
    lines += [f"{n[8]}{{{p}}} {d.up}\n", f"{n[9]}{{{p}}} {d.down}\n", f"{n[10]}{{{p}}} {d.joined}\n",
              "".join(f'{n[11]}{{{p},cause="{_escape(k)}"}} {v}\n' for k, v in sorted(d.failed.items())),
              f"{n[12]}{{{p}}} {_number(d.last_seen)}\n" if finite(d.last_seen) else "",
              f'{n[13]}{{{p},state="{d.state}"}} 1\n',
              f"{n[14]}{{{p}}} {d.measured_cycles}\n" if d.measured_cycles else ""]
    lines += ([f"{n[15]}{{{p}}} {_number(d.link_s)}\n", f"{n[16]}{{{p}}} {d.link_bytes}\n"] if d.link_bytes
              else ["", ""])
    return tuple(lines)


_NAMES = tuple(m.name for m in DEVICE_METRICS)


def _number(value: float) -> str:
    if type(value) is int:
        return str(value)
    if value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return floatToGoString(value)


def _escape(value: str) -> str:
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


@functools.lru_cache(maxsize=1)
def build_info() -> tuple[str, str]:
    """(version, git commit) of the running edgefleet ("unknown" when not a git checkout)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        release = version("edgefleet")
    except PackageNotFoundError:
        release = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                                capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    return release, commit
