"""The device side of a Flower message, shared by both ways the fleet runs.

A device gets an instruction (an "arrays" ArrayRecord with the global adapters, a "config" ConfigRecord),
runs one job on a ``DeviceHostCore`` and answers with an "arrays" ArrayRecord (train only) and a "metrics"
MetricRecord. The simulated fleet (``fleet.grid.FleetGrid``) and the ClientApp of a real Flower deployment
(``fleet.flower_app``) both build their replies here, so the two paths cannot drift apart.

Reply metrics: "num-examples", "loss-before", "metric-before"; train adds "train-loss", "loss-after",
"metric-after" and "modelled-s" (the time the device's target would take: compute plus link traffic).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fleet.arrays import from_record, to_record

ARRAYS_KEY, CONFIG_KEY, METRICS_KEY = "arrays", "config", "metrics"

# Error codes of replies that carry no result
ERROR_DROPOUT, ERROR_STRAGGLER, ERROR_DEVICE = 1, 2, 3


def job_kind(message: Message) -> str:
    """"train" for a train instruction, "evaluate" otherwise (the kinds ``DeviceHostCore.run`` takes)."""
    return "train" if message.metadata.message_type.split(".")[0] == MessageType.TRAIN else "evaluate"


def instruction_record(message: Message) -> ArrayRecord | None:
    content = message.content
    return content.array_records[ARRAYS_KEY] if ARRAYS_KEY in content.array_records else None


def instruction_arrays(message: Message) -> dict[str, np.ndarray]:
    """The adapters an instruction carries, as numpy arrays ({} when it carries none)."""
    record = instruction_record(message)
    return {} if record is None else from_record(record)


def instruction_config(message: Message) -> ConfigRecord:
    content = message.content
    return content.config_records[CONFIG_KEY] if CONFIG_KEY in content.config_records else ConfigRecord()


def modelled_seconds(kind: str, *, cycles_per_step: int, steps: int, clock_hz: float, link_bps: float,
                     down_bytes: int) -> float:
    """The device's modelled time for a job: its steps on the target's clock (train), plus the adapters
    sent down (and, for train, back up) over its link."""
    compute_s = cycles_per_step * steps / clock_hz if kind == "train" else 0.0
    return compute_s + 8 * down_bytes * (2 if kind == "train" else 1) / link_bps


def reply_content(kind: str, result: Mapping[str, Any], modelled_s: float) -> RecordDict:
    """The reply to a job from a ``DeviceHostCore`` result dict without an "error"."""
    metrics: dict[str, int | float] = {"num-examples": int(result["num_examples"]),
                                       "loss-before": float(result["loss_before"]),
                                       "metric-before": _finite(result["metric_before"])}
    content = RecordDict()
    if kind == "train":
        content[ARRAYS_KEY] = to_record(result["arrays"])
        metrics.update({"train-loss": float(result["loss"]), "loss-after": float(result["loss_after"]),
                        "metric-after": _finite(result["metric_after"]), "modelled-s": float(modelled_s)})
    content[METRICS_KEY] = MetricRecord(metrics)
    return content


def error_reply(message: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=message)


def device_reply(message: Message, kind: str, result: Mapping[str, Any], modelled_s: float) -> Message:
    """The reply Message: the result's content, or an ``ERROR_DEVICE`` error when the device failed."""
    if "error" in result:
        return error_reply(message, ERROR_DEVICE, result["error"])
    return Message(reply_content(kind, result, modelled_s), reply_to=message)


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else -1.0
