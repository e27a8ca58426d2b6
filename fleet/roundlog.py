"""One round's record: ``RoundLog`` (round driver → everything downstream).

The round driver (``fleet.rounds.RoundDriver``) opens a RoundLog when a round begins, adds one
``DeviceRecord`` per reply (successful or not) and closes it with the round's timings and the strategy's
server-side metrics. The run directory, the metrics exporter, the progress display and the report read
RoundLogs (and observers get each DeviceRecord as it arrives); nothing downstream reads grid internals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from device_runtime.protocol import EXPECTED_CAUSES, JobResult, Telemetry

NAN = float("nan")


@dataclass(frozen=True)
class DeviceRecord:
    """One device's answer to one job in a round (flattened into metrics.jsonl as a "device" record)."""
    round: int
    instruction: str                     # train | evaluate | personalize
    device: int
    group: str = ""
    target: str = ""
    runtime: str = ""
    cause: str = ""                      # "" = ok; else a device_runtime.protocol cause
    error: str = ""
    num_examples: int = 0
    loss_before: float = NAN
    metric_before: float = NAN
    loss: float = NAN
    loss_after: float = NAN
    metric_after: float = NAN
    budget_bytes: int = 0                # the device's memory budget (0: none given)
    telemetry: Telemetry = field(default_factory=Telemetry)

    @property
    def ok(self) -> bool:
        return not self.cause

    @classmethod
    def from_result(cls, result: JobResult, round_: int, *, group: str = "", target: str = "", runtime: str = "",
                    budget_bytes: int = 0) -> "DeviceRecord":
        return cls(round_, result.instruction, result.device, group, target, runtime, result.cause, result.error,
                   result.num_examples, result.loss_before, result.metric_before, result.loss, result.loss_after,
                   result.metric_after, budget_bytes, result.telemetry)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _DEVICE_RECORD_FIELDS}
        out["telemetry"] = self.telemetry.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "DeviceRecord":
        known = {f.name for f in fields(cls)}
        values = {k: (NAN if v is None else v) for k, v in raw.items() if k in known}
        values["telemetry"] = Telemetry.from_dict(raw.get("telemetry", {}))
        return cls(**values)


# what to_dict copies, listed once (dataclasses.fields() rebuilds its tuple on every call: 2,000 records a round)
_DEVICE_RECORD_FIELDS = tuple(f.name for f in fields(DeviceRecord) if f.name != "telemetry")


@dataclass
class RoundLog:
    round: int
    started_at: float = 0.0              # unix time
    ended_at: float = 0.0
    sampled: list[int] = field(default_factory=list)       # devices sent a train job
    devices: list[DeviceRecord] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)  # replies the strategy guard left out, by cause
    timings: dict[str, float] = field(default_factory=dict)  # train_s, aggregate_train_s, evaluate_s, ...
    server_metrics: dict[str, float] = field(default_factory=dict)  # the strategy's aggregated metrics

    # ---- derived numbers ------------------------------------------------------------------------------
    def of(self, instruction: str, ok: bool = True) -> list[DeviceRecord]:
        return [d for d in self.devices if d.instruction == instruction and d.ok == ok]

    @property
    def failures(self) -> dict[str, int]:
        """Failed jobs by cause (availability — offline, drop-outs — is not a failure: see ``unavailable``)."""
        return _count(d.cause for d in self.devices if d.cause and d.cause not in EXPECTED_CAUSES)

    @property
    def unavailable(self) -> dict[str, int]:
        return _count(d.cause for d in self.devices if d.cause in EXPECTED_CAUSES)

    @property
    def duration_s(self) -> float:
        return max(0.0, self.ended_at - self.started_at)

    def summary(self) -> dict[str, Any]:
        train, evals = self.of("train"), self.of("evaluate")
        return {"round": self.round, "devices_sampled": len(self.sampled), "devices_trained": len(train),
                "devices_evaluated": len(evals), "failures": self.failures, "unavailable": self.unavailable,
                "rejected": dict(self.rejected),
                "train_loss": mean(d.loss for d in train),
                "metric_before": mean(d.metric_before for d in train),
                "metric_after": mean(d.metric_after for d in train),
                "global_metric": mean(d.metric_before for d in evals),
                "bytes_up": sum(d.telemetry.bytes_up for d in self.devices),
                "bytes_down": sum(d.telemetry.bytes_down for d in self.devices),
                "duration_s": self.duration_s, "timings": dict(self.timings),
                "server_metrics": dict(self.server_metrics)}

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "started_at": self.started_at, "ended_at": self.ended_at,
                "sampled": list(self.sampled), "devices": [d.to_dict() for d in self.devices],
                "rejected": dict(self.rejected), "timings": dict(self.timings),
                "server_metrics": dict(self.server_metrics)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "RoundLog":
        return cls(int(raw["round"]), float(raw.get("started_at", 0.0)), float(raw.get("ended_at", 0.0)),
                   list(raw.get("sampled", [])), [DeviceRecord.from_dict(d) for d in raw.get("devices", [])],
                   dict(raw.get("rejected", {})), dict(raw.get("timings", {})), dict(raw.get("server_metrics", {})))


class RoundObserver(Protocol):
    """What the round driver tells downstream code (run directory, exporter, progress display)."""

    def begin_round(self, round_: int, total_rounds: int) -> None: ...

    def device_done(self, record: DeviceRecord) -> None: ...

    def end_round(self, log: RoundLog) -> None: ...


def _count(causes: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for cause in causes:
        out[cause] = out.get(cause, 0) + 1
    return out


def mean(values: Iterable[float]) -> float:
    kept = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept else NAN


def merge_counts(counts: Sequence[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + int(v)
    return out
