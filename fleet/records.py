"""RoundLogs in a run directory's metrics.jsonl: one "device" line per DeviceRecord, then one "round" line.

    {"type": "device", **DeviceRecord.to_dict()}                  (one per reply, in arrival order)
    {"type": "round", **RoundLog.summary(), "started_at", "ended_at", "sampled"}

``round_log_records`` writes that form and ``read_round_logs`` gives the RoundLogs back, so the exporter
(restoring its counters after --resume), ``edgefleet status`` and ``edgefleet report`` read the same record
the round driver wrote. Lines of a round without its "round" line (a killed round) are left out.
"""
from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from fleet.roundlog import DeviceRecord, RoundLog
from fleet.runs import RunError

NAN = float("nan")
_FLOAT_FIELDS = frozenset(f.name for f in fields(DeviceRecord) if f.type in ("float", float))


def round_log_records(log: RoundLog) -> list[dict[str, Any]]:
    """The metrics.jsonl lines of one round. A DeviceRecord's float fields that are NaN (not applicable: an
    evaluate job has no training loss) or infinite are written as null, as ``_device`` reads them back; any
    other non-finite number (in telemetry, in the round line) is left to ``RunDir.append_metrics``, which
    writes null and names it in the line's "nonfinite" table."""
    devices = [_device_line(d) for d in log.devices]
    return devices + [{"type": "round", **log.summary(), "started_at": log.started_at, "ended_at": log.ended_at,
                       "sampled": list(log.sampled)}]


def _device_line(record: DeviceRecord) -> dict[str, Any]:
    line = {"type": "device", **record.to_dict()}
    for name in _FLOAT_FIELDS:
        value = line[name]
        if value - value != 0:  # NaN or ±inf (a finite float minus itself is 0); one test per field, no walk
            line[name] = None
    return line


def round_logs_from_records(records: Iterable[Mapping[str, Any]]) -> list[RoundLog]:
    devices: dict[int, list[DeviceRecord]] = {}
    logs: list[RoundLog] = []
    for raw in records:
        kind, round_ = raw.get("type"), int(raw.get("round", 0))
        if kind == "device":
            devices.setdefault(round_, []).append(_device(raw))
        elif kind == "round":
            started = float(raw.get("started_at", 0.0))
            ended = float(raw.get("ended_at", started + float(raw.get("duration_s", 0.0))))
            logs.append(RoundLog(round_, started, ended, [int(d) for d in raw.get("sampled", [])],
                                 devices.pop(round_, []), dict(raw.get("rejected", {})),
                                 dict(raw.get("timings", {})), dict(raw.get("server_metrics", {}))))
    return logs


def read_round_logs(run_dir: str | os.PathLike) -> list[RoundLog]:
    """The RoundLogs of the intact records (each line's CRC checked; a torn tail is left out, fleet.runs)."""
    from fleet.runs import RunDir
    return round_logs_from_records(RunDir(run_dir).metrics())


def _device(raw: Mapping[str, Any]) -> DeviceRecord:
    if "instruction" in raw:
        return DeviceRecord.from_dict({k: (NAN if v is None and k in _FLOAT_FIELDS else v) for k, v in raw.items()})
    # metrics.jsonl written before the round driver (fleet.grid's device dicts): the fields that map
    telemetry = {"wall_s": raw.get("wall_s", 0.0), "bytes_up": raw.get("bytes_up", 0),
                 "bytes_down": raw.get("bytes_down", 0), "peak_bytes_by_level": raw.get("peak_bytes_by_level", {}),
                 "modelled_s": raw.get("modelled_s", 0.0), "samples": raw.get("num_examples", 0)}
    return DeviceRecord.from_dict({
        "round": raw.get("round", 0), "instruction": raw.get("kind", "train"), "device": raw["device"],
        "group": raw.get("group", ""), "cause": "error" if "error" in raw else "", "error": raw.get("error", ""),
        "num_examples": raw.get("num_examples", 0), "loss_before": raw.get("loss_before", float("nan")),
        "metric_before": raw.get("metric_before", float("nan")), "loss": raw.get("train_loss", float("nan")),
        "loss_after": raw.get("loss_after", float("nan")), "metric_after": raw.get("metric_after", float("nan")),
        "telemetry": telemetry})


def read_run_scenario(run_dir: str | os.PathLike):
    """The resolved scenario a run directory was started with."""
    import tomllib

    from fleet.runs import SCENARIO
    from fleet.scenario import parse_scenario
    path = Path(run_dir) / SCENARIO
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing; not an edgefleet run directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise RunError(f"{path}: not TOML ({exc})") from None
    return parse_scenario(raw, source=str(path))
