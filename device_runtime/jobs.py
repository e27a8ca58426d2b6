"""Running a ``Job`` on a device: one code path for every backend.

``run_job`` takes any ``Device`` (numpy executor, QEMU, GVSoC, a serial board) and the device's data, and
returns a ``JobResult``; ``run_jobs_batched`` does the same for many devices in one pass of a device-axis
program (``BatchedDevices``) and returns the same per-device results — a single device is the batch of one.
A failing device is a failed ``JobResult`` (cause and one line), never an exception out of here.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from device_runtime.batched import BatchedDevices
from device_runtime.protocol import (CAUSE_ERROR, CAUSE_NONFINITE, CAUSES, Job, JobResult, ProtocolError,
                                     Telemetry)


class JobData(Protocol):
    """A device's own data (``fleet.data.DeviceData`` is one)."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def task_metric(task: str, outputs: np.ndarray, x: np.ndarray, y: np.ndarray | None) -> float:
    """Accuracy for classification; ROC AUC of the reconstruction error for anomaly detection."""
    if task == "classification":
        return float(np.mean(np.argmax(outputs, axis=1) == y))
    errors = np.mean((outputs - x).reshape(len(x), -1) ** 2, axis=1)
    labels = np.asarray(y)
    positives, negatives = errors[labels == 1], errors[labels == 0]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    # Mann-Whitney U: P(error of an anomaly > error of a normal sample), ties count half
    greater = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    return float(greater / (len(positives) * len(negatives)))


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
    bad = result.nonfinite()
    if bad:
        return JobResult.failed(job, CAUSE_NONFINITE, f"device {job.device}: {bad} is not finite",
                                result.telemetry)
    return result


class Evaluated(NamedTuple):
    """A device's loss and task metric on its test data with some arrays: what an evaluate job answers, and
    what a train job with the same arrays would compute first (so it can be reused)."""
    loss: float
    metric: float


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
        after = device.evaluate(data.x_test, data.y_test)
        arrays = _sent_back(job, trained.params)
        telemetry = trained.telemetry
        result = JobResult(job.device, job.instruction, arrays=arrays, num_examples=int(len(data.x_train)),
                           loss_before=before.loss, metric_before=before.metric,
                           loss=float(np.mean(trained.losses)), loss_after=after.loss,
                           metric_after=task_metric(task, after.outputs, data.x_test, data.y_test),
                           telemetry=telemetry)
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
    """Jobs one device-axis pass can run together: same instruction, steps, learning rate and config."""
    first = jobs[0]
    return all(j.instruction == first.instruction and j.steps == first.steps and j.lr == first.lr
               and dict(j.config) == dict(first.config) for j in jobs)


def run_jobs_batched(bd: BatchedDevices, jobs: Sequence[Job], data: Sequence[JobData],
                     before: Sequence[Evaluated] | None = None) -> list[JobResult]:
    """Up to ``bd.devices`` jobs (``batchable``) in one pass; one JobResult per job, as ``run_job`` gives.
    ``before``: every device's numbers with its job's arrays, already known (train jobs skip that pass)."""
    if not jobs:
        return []
    if not batchable(jobs):
        raise ProtocolError("run_jobs_batched: jobs differ in instruction, steps, lr or config")
    start = time.perf_counter()
    first, task = jobs[0], bd.program.task
    try:
        bd.set_params([j.arrays for j in jobs])
        bd.set_proximal(first.proximal_mu, [j.arrays for j in jobs])
        x_test = np.stack([d.x_test for d in data])
        y_test = np.stack([d.y_test for d in data])
        if before is None or first.instruction == "evaluate":
            evaluated = bd.evaluate(x_test, _labels(task, y_test))
            before = [Evaluated(e.loss, task_metric(task, e.outputs, d.x_test, d.y_test))
                      for e, d in zip(evaluated, data)]
        trained = after = None
        if first.instruction != "evaluate":
            x_train = np.stack([d.x_train for d in data])
            y_train = np.stack([d.y_train for d in data])
            trained = bd.train(x_train, _labels(task, y_train), first.steps, lr=first.lr)
            after = bd.evaluate(x_test, _labels(task, y_test))
    except (ProtocolError, KeyboardInterrupt):
        raise
    except Exception as exc:
        line = f"{type(exc).__name__}: {exc}"
        return [JobResult.failed(j, CAUSE_ERROR, line) for j in jobs]
    wall = (time.perf_counter() - start) / len(jobs)
    results = []
    for k, (job, d) in enumerate(zip(jobs, data)):
        if trained is None:
            results.append(JobResult(job.device, job.instruction, num_examples=int(len(d.x_test)),
                                     loss_before=before[k].loss, metric_before=before[k].metric,
                                     telemetry=Telemetry(wall_s=wall, bytes_down=nbytes(job.arrays))))
            continue
        arrays = _sent_back(job, trained[k].params)
        result = JobResult(job.device, job.instruction, arrays=arrays, num_examples=int(len(d.x_train)),
                           loss_before=before[k].loss, metric_before=before[k].metric,
                           loss=float(np.mean(trained[k].losses)), loss_after=after[k].loss,
                           metric_after=task_metric(task, after[k].outputs, d.x_test, d.y_test),
                           telemetry=trained[k].telemetry)
        results.append(_checked(result.with_telemetry(wall_s=wall, bytes_down=nbytes(job.arrays),
                                                      bytes_up=nbytes(arrays)), job))
    return results
