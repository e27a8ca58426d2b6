"""Flower messages ⇄ the device protocol, shared by both ways the fleet runs.

A device gets an instruction (an "arrays" ArrayRecord with the global adapters, a "config" ConfigRecord with
the strategy's keys); ``job_from_message`` turns it into a ``Job`` (through ``make_job``, which refuses keys
no device honours). The device answers with a ``JobResult``; ``reply_from_result`` turns that into the reply
Message — "arrays" (train only) and "metrics" (the device's numbers and telemetry) — or a Flower Error whose
code names the failure cause. ``record_from_reply`` reads any reply back into a ``DeviceRecord`` for the
round log, whichever Grid carried it (``FleetGrid`` in simulation, Flower's own on a deployment).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from device_runtime.protocol import CAUSE_ERROR, CAUSES, Job, JobResult, Telemetry, make_job
from fleet.arrays import filled, from_record, numpy_record
from fleet.roundlog import DeviceRecord

ARRAYS_KEY, CONFIG_KEY, METRICS_KEY = "arrays", "config", "metrics"

# Flower Error codes of replies without a result: one per failure cause
ERROR_CODES = {cause: 100 + i for i, cause in enumerate(CAUSES)}
CAUSE_OF_CODE = {code: cause for cause, code in ERROR_CODES.items()}

# reply metric key → JobResult / Telemetry field
RESULT_KEYS = {"num-examples": "num_examples", "loss-before": "loss_before", "metric-before": "metric_before",
               "train-loss": "loss", "loss-after": "loss_after", "metric-after": "metric_after"}
TELEMETRY_KEYS = {"samples": "samples", "steps": "steps", "wall-s": "wall_s",
                  "modelled-cycles-per-step": "modelled_cycles_per_step", "measured-cycles": "measured_cycles",
                  "instructions": "instructions", "bytes-down": "bytes_down", "bytes-up": "bytes_up",
                  "link-s": "link_s", "link-bytes": "link_bytes", "modelled-s": "modelled_s"}
EVALUATE_KEYS = ("num-examples", "loss-before", "metric-before")  # what an evaluate reply carries
# what a train reply carries when the device did not evaluate after its steps (training.evaluate_after = false)
TRAIN_KEYS_WITHOUT_AFTER = tuple(k for k in RESULT_KEYS if k not in ("loss-after", "metric-after"))
DEVICE_KEY = "device"
NO_METRIC = -1.0  # a task metric that does not exist for the data (AUC without anomalies) travels as -1


def instruction(message: Message) -> str:
    """"train" for a train message, "evaluate" otherwise."""
    return "train" if message.metadata.message_type.split(".")[0] == MessageType.TRAIN else "evaluate"


def record_in(content: RecordDict, key: str, kind: type):
    """``content[key]`` when it is a record of type ``kind``, else None (without building Flower's typed views
    ``content.array_records`` & co., which re-check every record on each access)."""
    record = content.get(key)
    return record if isinstance(record, kind) else None


def instruction_record(message: Message) -> ArrayRecord | None:
    return record_in(message.content, ARRAYS_KEY, ArrayRecord)


def instruction_arrays(message: Message) -> dict[str, np.ndarray]:
    """The adapters an instruction carries, as numpy arrays ({} when it carries none)."""
    record = instruction_record(message)
    return {} if record is None else from_record(record)


def instruction_config(message: Message) -> dict[str, Any]:
    config = record_in(message.content, CONFIG_KEY, ConfigRecord)
    return {} if config is None else dict(config)


def job_from_message(message: Message, device: int, arrays: Mapping[str, np.ndarray], **job: Any) -> Job:
    """The Job a message asks of ``device`` (``arrays``: the message's adapters, decoded once by the caller
    when many messages share them; ``job``: steps, lr, seed, round, deadline_s, fault defaults)."""
    return make_job(instruction(message), device, arrays, config=instruction_config(message), **job)


def modelled_seconds(kind: str, *, cycles_per_step: int, steps: int, clock_hz: float, link_bps: float,
                     down_bytes: int) -> float:
    """The device's modelled time for a job: its steps on the target's clock (train), plus the adapters
    sent down (and, for train, back up) over its link."""
    compute_s = cycles_per_step * steps / clock_hz if kind == "train" else 0.0
    return compute_s + 8 * down_bytes * (2 if kind == "train" else 1) / link_bps


def reply_from_result(message: Message, result: JobResult) -> Message:
    """The reply Message for a device's result: its content, or an Error whose code names the cause. The
    records are filled directly (their values are the protocol's ints, floats and ndarrays); the arrays stay
    ndarrays until something asks for their bytes (``fleet.arrays.NumpyArray``)."""
    if not result.ok:
        return Message(Error(code=ERROR_CODES[result.cause], reason=_reason(result)), reply_to=message)
    metrics: dict[str, int | float] = {DEVICE_KEY: int(result.device)}
    train = result.instruction == "train"
    for key in _sent_keys(result):
        value = getattr(result, RESULT_KEYS[key])
        metrics[key] = int(value) if key == "num-examples" else float(value) if math.isfinite(value) else NO_METRIC
    telemetry = result.telemetry
    for key, name in TELEMETRY_KEYS.items():
        value = getattr(telemetry, name)
        metrics[key] = value if isinstance(value, (int, float)) else float(value)
    records = {ARRAYS_KEY: numpy_record(result.arrays)} if train else {}
    records[METRICS_KEY] = filled(MetricRecord, metrics)
    return Message(filled(RecordDict, records), reply_to=message)


def record_from_reply(reply: Message, round_: int, kind: str, device_of: Callable[[int], int],
                      describe: Callable[[int], Mapping[str, Any]] = lambda index: {}) -> DeviceRecord:
    """A reply (successful or not) as the round log's DeviceRecord. ``device_of``: node id → device index
    (used for error replies, which carry no metrics); ``describe``: device index → its static facts (group,
    target, runtime, budget_bytes, and telemetry defaults: modelled cycles, peak memory by level)."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        return _failed_record(round_, kind, device_of(node), describe,
                              CAUSE_OF_CODE.get(reply.error.code, CAUSE_ERROR), reply.error.reason)
    metrics = record_in(reply.content, METRICS_KEY, MetricRecord) or {}
    index = int(metrics[DEVICE_KEY]) if DEVICE_KEY in metrics else device_of(node)
    numbers = {name: _number(metrics.get(key)) for key, name in RESULT_KEYS.items()}
    telemetry = {name: metrics[key] for key, name in TELEMETRY_KEYS.items() if key in metrics}
    return _record(round_, kind, index, describe(index), numbers, telemetry)


def record_from_result(result: JobResult, round_: int, kind: str,
                       describe: Callable[[int], Mapping[str, Any]] = lambda index: {}) -> DeviceRecord:
    """The DeviceRecord ``record_from_reply`` reads from ``reply_from_result(message, result)``, made from the
    result itself (the grid that built the reply already holds it)."""
    if not result.ok:
        return _failed_record(round_, kind, result.device, describe, result.cause, _reason(result))
    numbers = {RESULT_KEYS[key]: _number(getattr(result, RESULT_KEYS[key])) for key in _sent_keys(result)}
    telemetry = {name: getattr(result.telemetry, name) for name in TELEMETRY_KEYS.values()}
    return _record(round_, kind, result.device, describe(result.device), numbers, telemetry)


def _sent_keys(result: JobResult) -> tuple[str, ...]:
    """The RESULT_KEYS a successful result's reply carries."""
    if result.instruction != "train":
        return EVALUATE_KEYS
    return tuple(RESULT_KEYS) if math.isfinite(result.loss_after) else TRAIN_KEYS_WITHOUT_AFTER


def _reason(result: JobResult) -> str:
    return f"device {result.device}: {result.error}"


def _failed_record(round_: int, kind: str, index: int, describe: Callable[[int], Mapping[str, Any]], cause: str,
                   error: str) -> DeviceRecord:
    facts = describe(index)
    return DeviceRecord(round_, kind, index, *(facts.get(k, "") for k in ("group", "target", "runtime")),
                        cause=cause, error=error, budget_bytes=int(facts.get("budget_bytes", 0)),
                        telemetry=Telemetry(peak_bytes_by_level=facts.get("peak_bytes_by_level", {})))


def _record(round_: int, kind: str, index: int, facts: Mapping[str, Any], numbers: dict[str, float],
            telemetry: dict[str, Any]) -> DeviceRecord:
    """A successful device's record: its numbers (absent ones NaN) and telemetry, the device's facts filling
    what a device does not report (its plan's peak memory; modelled cycles when it sent none)."""
    if not telemetry.get("modelled_cycles_per_step"):
        telemetry["modelled_cycles_per_step"] = int(facts.get("modelled_cycles_per_step", 0))
    telemetry["peak_bytes_by_level"] = facts.get("peak_bytes_by_level", {})
    num_examples = numbers.pop("num_examples", None)
    return DeviceRecord(round_, kind, index, *(facts.get(k, "") for k in ("group", "target", "runtime")),
                        num_examples=int(num_examples or 0), **numbers,
                        budget_bytes=int(facts.get("budget_bytes", 0)), telemetry=Telemetry(**telemetry))


def _number(value: Any) -> float:
    """A reply's number back: absent, non-finite, or NO_METRIC (no loss or task metric is ever -1) → NaN."""
    if value is None:
        return float("nan")
    value = float(value)
    return float("nan") if value == NO_METRIC or not math.isfinite(value) else value
