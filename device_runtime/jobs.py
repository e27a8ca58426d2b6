"""Running a ``Job`` on a device: one code path for every backend.

``run_job`` takes any ``Device`` (numpy executor, QEMU, GVSoC, a serial board) and the device's data, and
returns a ``JobResult``; ``run_jobs_batched`` does the same for many devices in one pass of a device-axis
program (``BatchedDevices``) and returns the same per-device results — a single device is the batch of one.
A failing device is a failed ``JobResult`` (cause and one line), never an exception out of here.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from device_runtime.batched import BatchedDevices
from device_runtime.protocol import (CAUSE_ERROR, CAUSE_NONFINITE, CAUSES, Job, JobResult, ProtocolError,
                                     StackRow, Telemetry)


class JobData(Protocol):
    """A device's own data (``fleet.data.DeviceData`` is one)."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def task_metric(task: str, outputs: np.ndarray, x: np.ndarray, y: np.ndarray | None) -> float:
    """Accuracy for classification; ROC AUC of the reconstruction error for anomaly detection."""
    return float(task_metrics(task, outputs[None], x[None], None if y is None else np.asarray(y)[None])[0])


def task_metrics(task: str, outputs: np.ndarray, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    """``task_metric`` of D devices at once: outputs (D, n, ...), x (D, n, ...), y (D, n); (D,) float64, NaN
    where a device's AUC does not exist (no anomaly or no normal sample)."""
    if task == "classification":
        return np.mean(np.argmax(outputs, axis=-1) == y, axis=1)
    return anomaly_auc(np.mean((outputs - x).reshape(len(x), x.shape[1], -1) ** 2, axis=2), y)


def anomaly_auc(errors: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each device's ROC AUC of its samples' reconstruction errors (D, n) against its labels (D, n; 1 =
    anomaly); NaN where a device has no anomaly or no normal sample."""
    labels = np.asarray(y)
    positive, negative = labels == 1, labels == 0
    pairs = positive[:, :, None] & negative[:, None, :]  # (device, anomaly i, normal j)
    # Mann-Whitney U: P(error of an anomaly > error of a normal sample), ties count half
    greater = ((errors[:, :, None] > errors[:, None, :]) & pairs).sum(axis=(1, 2))
    ties = ((errors[:, :, None] == errors[:, None, :]) & pairs).sum(axis=(1, 2))
    count = positive.sum(axis=1) * negative.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (greater + 0.5 * ties) / count, np.nan)


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def _labels(task: str, y: np.ndarray) -> np.ndarray | None:
    return y if task == "classification" else None


def _sent_back(job: Job, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a train job answers with: the trained parameters, plus the per-device arrays it received but does
    not train (FFA-LoRA's A), so the reply always holds the whole adapter. Personalize keeps them."""
    if job.instruction != "train":
        return {}
    out = dict(params)
    for name, value in job.arrays.items():
        out.setdefault(name, np.asarray(value))
    return out


def _checked(result: JobResult, job: Job) -> JobResult:
    bad = result.nonfinite(job.evaluates_after)
    if bad:
        return JobResult.failed(job, CAUSE_NONFINITE, f"device {job.device}: {bad} is not finite",
                                result.telemetry)
    return result


class Evaluated(NamedTuple):
    """A device's loss and task metric on its test data with some arrays: what an evaluate job answers, and
    what a train job with the same arrays would compute first (so it can be reused)."""
    loss: float
    metric: float


NOT_EVALUATED = Evaluated(float("nan"), float("nan"))  # a train job told not to evaluate after its steps


def run_job(device: Any, job: Job, data: JobData, before: Evaluated | None = None) -> JobResult:
    """Run one job on one device. ``device`` implements device_runtime.device.Device (plus
    ``reset_optimizer``/``set_proximal`` from ``ParameterAccess``). ``before``: the device's numbers with
    the job's arrays, already known (a train job then skips its first evaluation)."""
    start = time.perf_counter()
    try:
        task = device.program.task
        device.set_params(job.arrays)
        device.reset_optimizer()
        device.set_proximal(job.proximal_mu, job.arrays)
        if before is None or job.instruction == "evaluate":
            evaluated = device.evaluate(data.x_test, data.y_test)
            before = Evaluated(evaluated.loss, task_metric(task, evaluated.outputs, data.x_test, data.y_test))
        if job.instruction == "evaluate":
            return JobResult(job.device, job.instruction, num_examples=int(len(data.x_test)),
                             loss_before=before.loss, metric_before=before.metric,
                             telemetry=Telemetry(wall_s=time.perf_counter() - start, bytes_down=nbytes(job.arrays)))
        trained = device.train(data.x_train, _labels(task, data.y_train), job.steps, lr=job.lr)
        after = NOT_EVALUATED
        if job.evaluates_after:
            evaluated = device.evaluate(data.x_test, data.y_test)
            after = Evaluated(evaluated.loss, task_metric(task, evaluated.outputs, data.x_test, data.y_test))
        arrays = _sent_back(job, trained.params)
        result = JobResult(job.device, job.instruction, arrays=arrays, num_examples=int(len(data.x_train)),
                           loss_before=before.loss, metric_before=before.metric,
                           loss=float(np.mean(trained.losses)), loss_after=after.loss, metric_after=after.metric,
                           telemetry=trained.telemetry)
        result = result.with_telemetry(wall_s=time.perf_counter() - start, bytes_down=nbytes(job.arrays),
                                       bytes_up=nbytes(arrays))
    except (ProtocolError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a device failure is a result, not a crash of whoever asked
        return JobResult.failed(job, failure_cause(exc), f"{type(exc).__name__}: {exc}",
                                Telemetry(wall_s=time.perf_counter() - start))
    return _checked(result, job)


def failure_cause(exc: BaseException) -> str:
    """The protocol's cause for a device's exception: its own ``cause`` when it names one (a serial link's
    disconnected / timeout), else "error"."""
    cause = getattr(exc, "cause", CAUSE_ERROR)
    return cause if cause in CAUSES else CAUSE_ERROR


def batchable(jobs: Sequence[Job]) -> bool:
    """Jobs one device-axis pass can run together: same instruction, steps, learning rate, config and
    evaluation after training."""
    first = jobs[0]
    return all(j.instruction == first.instruction and j.steps == first.steps and j.lr == first.lr
               and j.evaluate_after == first.evaluate_after and dict(j.config) == dict(first.config) for j in jobs)


def run_jobs_batched(bd: BatchedDevices, jobs: Sequence[Job], data: Sequence[JobData],
                     before: Sequence[Evaluated] | None = None) -> list[JobResult]:
    """Up to ``bd.devices`` jobs (``batchable``) in one pass; one JobResult per job, as ``run_job`` gives.
    ``before``: every device's numbers with its job's arrays, already known (train jobs skip that pass).
    Numbers and checks are computed for all devices at once; train results' arrays are rows of one stack
    per tensor (``StackRow``), which ``encode_results`` sends as they are."""
    if not jobs:
        return []
    if not batchable(jobs):
        raise ProtocolError("run_jobs_batched: jobs differ in instruction, steps, lr, config or evaluate_after")
    start = time.perf_counter()
    first, task = jobs[0], bd.program.task
    try:
        received = [j.arrays for j in jobs]
        bd.set_params(received)
        bd.set_proximal(first.proximal_mu, received)
        x_test = np.stack([d.x_test for d in data])
        y_test = np.stack([d.y_test for d in data])
        if before is None or first.instruction == "evaluate":
            before = _evaluated(bd, task, x_test, y_test)
        stacks = after = None
        if first.instruction != "evaluate":
            x_train = np.stack([d.x_train for d in data])
            y_train = np.stack([d.y_train for d in data])
            stacks, losses, telemetry = bd.train_stacked(x_train, _labels(task, y_train), first.steps, lr=first.lr)
            after = _evaluated(bd, task, x_test, y_test) if first.evaluates_after else [NOT_EVALUATED] * len(jobs)
            sent = _sent_back_stacks(jobs, stacks)
            bad = _nonfinite_rows(sent)
    except (ProtocolError, KeyboardInterrupt):
        raise
    except Exception as exc:
        line = f"{type(exc).__name__}: {exc}"
        return [JobResult.failed(j, CAUSE_ERROR, line) for j in jobs]
    wall = (time.perf_counter() - start) / len(jobs)
    down = _bytes_by_table(received)
    if stacks is None:
        return [JobResult(job.device, job.instruction, num_examples=int(len(d.x_test)),
                          loss_before=b.loss, metric_before=b.metric,
                          telemetry=Telemetry(wall_s=wall, bytes_down=down[id(job.arrays)]))
                for job, d, b in zip(jobs, data, before)]
    up = sum(stack[0].nbytes for stack in sent.values()) if sent else 0
    results = []
    for k, (job, d) in enumerate(zip(jobs, data)):
        arrays = StackRow(sent, k) if sent else {}
        result = JobResult(job.device, job.instruction, arrays=arrays, num_examples=int(len(d.x_train)),
                           loss_before=before[k].loss, metric_before=before[k].metric,
                           loss=float(np.mean(losses[:, k])), loss_after=after[k].loss, metric_after=after[k].metric,
                           telemetry=replace(telemetry, wall_s=wall, bytes_down=down[id(job.arrays)],
                                             bytes_up=up if sent else 0))
        problem = bad.get(k) or result.nonfinite_numbers(job.evaluates_after)
        results.append(JobResult.failed(job, CAUSE_NONFINITE, f"device {job.device}: {problem} is not finite",
                                        result.telemetry) if problem else result)
    return results


def _evaluated(bd: BatchedDevices, task: str, x: np.ndarray, y: np.ndarray) -> list[Evaluated]:
    per_sample, outputs = bd.evaluate_stacked(x, _labels(task, y))
    losses = per_sample.mean(axis=1)
    # a reconstruction's per-sample losses are its samples' reconstruction errors: the AUC's scores
    metrics = task_metrics(task, outputs, x, y) if task == "classification" else anomaly_auc(per_sample, y)
    return [Evaluated(float(loss), float(metric)) for loss, metric in zip(losses, metrics)]


def _sent_back_stacks(jobs: Sequence[Job], stacks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``_sent_back`` for a batch, stacked: the trained stacks, plus a stack of each received array that was
    not trained (FFA-LoRA's A); {} for personalize jobs."""
    if jobs[0].instruction != "train":
        return {}
    out = dict(stacks)
    for name in jobs[0].arrays:
        if name not in out:
            out[name] = np.stack([np.asarray(j.arrays[name]) for j in jobs])
    return out


def _nonfinite_rows(stacks: Mapping[str, np.ndarray]) -> dict[int, str]:
    """Row → the name of its first array (in the stacks' order) holding a NaN or Inf."""
    bad: dict[int, str] = {}
    for name, stack in stacks.items():
        finite = np.isfinite(stack).reshape(len(stack), -1).all(axis=1)
        if not finite.all():
            for row in np.flatnonzero(~finite):
                bad.setdefault(int(row), name)
    return bad


def _bytes_by_table(tables: Sequence[Mapping[str, np.ndarray]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for table in tables:
        if id(table) not in out:
            out[id(table)] = nbytes(table)
    return out
