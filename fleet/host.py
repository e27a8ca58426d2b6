"""A device host runs many simulated devices in one process: one executor per program, each device's data
generated where it runs (from the scenario seed), adapters in and out as plain dicts of numpy arrays.

``DeviceHostCore`` is plain Python (tests and the in-process engine use it directly); ``DeviceHost`` is the
same class as a Ray actor. What crosses the process boundary is builtins and numpy arrays only: programs
travel as (manifest JSON, .npz bytes), never as pickled objects of ours.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from compiler.program import Program
from device_runtime import NumpyDevice
from device_runtime.batched import BatchedDevices
from fleet.data import DeviceData, device_data
from fleet.scenario import DataSpec

def _qemu_device(program: Program, name: str):
    from device_runtime.qemu import QemuDevice  # builds with the RISC-V toolchain on first use
    return QemuDevice(program, name=name)


RUNTIMES = {"numpy": NumpyDevice, "qemu": _qemu_device}

# fault injection (scenario fleet.groups[].faults): the kinds a device can be told to simulate
FAULT_KINDS = ("raise", "nan", "shape")


@dataclass(frozen=True)
class Job:
    device: int                # device index in the fleet
    arrays: str                # key into the call's table of adapter sets
    steps: int
    lr: float
    fault: str = ""            # simulate a fault of this kind (tests and fault scenarios)


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


DATA_CACHE_BYTES = 1 << 30  # per host


def _nbytes(data: DeviceData) -> int:
    return sum(a.nbytes for a in (data.x_train, data.y_train, data.x_test, data.y_test))


class DeviceHostCore:
    def __init__(self, data_spec: Mapping[str, Any], seed: int):
        self.data_spec = DataSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data_spec.items()})
        self.seed = seed
        self.devices: dict[str, NumpyDevice] = {}
        self.batched: dict[str, BatchedDevices] = {}  # key → the same program with a device axis
        self.programs: dict[str, Program] = {}
        self._data: OrderedDict[int, DeviceData] = OrderedDict()  # least recently used first
        self._data_bytes = 0

    # ---- set-up ---------------------------------------------------------------------------------------
    def install(self, key: str, manifest: bytes, params: bytes, batched: bool = False,
                runtime: str = "numpy") -> str:
        """Install a program under ``key``; ``batched``: its device-axis form, used for many devices at once;
        ``runtime``: "numpy" (the executor) or "qemu" (the RISC-V ELF on qemu-system-riscv32)."""
        program = Program.from_bytes(manifest, params, where=f"program {key}")
        if batched:
            self.batched[key] = BatchedDevices(program)
        elif key not in self.devices:
            self.programs[key] = program
            self.devices[key] = RUNTIMES[runtime](program, name=key)
        return key

    def data(self, device: int) -> DeviceData:
        if device in self._data:
            self._data.move_to_end(device)
            return self._data[device]
        data = device_data(self.data_spec, self.seed, device)
        self._data[device] = data
        self._data_bytes += _nbytes(data)
        while self._data_bytes > DATA_CACHE_BYTES and len(self._data) > 1:  # regenerating is cheap, memory is not
            _, evicted = self._data.popitem(last=False)
            self._data_bytes -= _nbytes(evicted)
        return data

    def node(self) -> str:
        """The Ray node this host runs on ("local" outside Ray)."""
        try:
            import ray
            if ray.is_initialized():
                return ray.get_runtime_context().get_node_id()
        except ImportError:  # pragma: no cover
            pass
        return "local"

    # ---- work -----------------------------------------------------------------------------------------
    def run(self, key: str, kind: str, jobs: Sequence[Mapping[str, Any]],
            arrays: Mapping[str, Mapping[str, np.ndarray]]) -> list[dict[str, Any]]:
        """Run ``kind`` ("train" | "evaluate") for every job; one result dict per job, errors included."""
        batched = self.batched.get(key)
        if batched is not None and len(jobs) > 1 and len({(j["steps"], j["lr"]) for j in jobs}) == 1:
            out: list[dict[str, Any]] = []
            for i in range(0, len(jobs), batched.devices):
                out += self._run_batched(batched, kind, [Job(**raw) for raw in jobs[i:i + batched.devices]], arrays)
            return out
        device = self.devices[key]
        results = []
        for raw in jobs:
            job = Job(**raw)
            start = time.perf_counter()
            try:
                result = self._one(device, kind, job, arrays[job.arrays])
                result["wall_s"] = time.perf_counter() - start
            except Exception as exc:  # a device failure is a reply, not a crash of the host
                result = {"device": job.device, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            results.append(result)
        return results

    def _one(self, device: Any, kind: str, job: Job, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        program = device.program
        data = self.data(job.device)
        device.set_params(arrays)
        device.reset_optimizer()
        before = device.evaluate(data.x_test, data.y_test)
        out: dict[str, Any] = {"device": job.device,
                               "loss_before": before.loss,
                               "metric_before": task_metric(program.task, before.outputs, data.x_test, data.y_test),
                               "num_examples": int(len(data.x_train))}
        if kind == "evaluate":
            out["num_examples"] = int(len(data.x_test))
            return out
        y_train = data.y_train if program.task == "classification" else None
        trained = device.train(data.x_train, y_train, job.steps, lr=job.lr)
        params = trained.params
        for name, value in arrays.items():  # echo what the device holds but does not train (FFA-LoRA's A)
            params.setdefault(name, np.asarray(value))
        after = device.evaluate(data.x_test, data.y_test)
        out.update(arrays=params, loss=float(np.mean(trained.losses)), loss_after=after.loss,
                   metric_after=task_metric(program.task, after.outputs, data.x_test, data.y_test),
                   samples=int(trained.telemetry.samples), steps=job.steps)
        _inject(job, out)
        return out


    def _run_batched(self, bd: BatchedDevices, kind: str, jobs: list[Job],
                     arrays: Mapping[str, Mapping[str, np.ndarray]]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        task = bd.program.task
        data = [self.data(j.device) for j in jobs]
        x_test = np.stack([d.x_test for d in data])
        y_test = np.stack([d.y_test for d in data])
        labels = y_test if task == "classification" else None
        bd.set_params([arrays[j.arrays] for j in jobs])
        outputs, losses = bd.evaluate(x_test, labels)
        results = [{"device": j.device, "loss_before": float(losses[k]),
                    "metric_before": task_metric(task, outputs[k], data[k].x_test, data[k].y_test),
                    "num_examples": int(len(data[k].x_test if kind == "evaluate" else data[k].x_train))}
                   for k, j in enumerate(jobs)]
        if kind == "train":
            x_train = np.stack([d.x_train for d in data])
            y_train = np.stack([d.y_train for d in data]) if task == "classification" else None
            step_losses = bd.train(x_train, y_train, jobs[0].steps, lr=jobs[0].lr)
            trained = bd.get_params(len(jobs))
            outputs, losses = bd.evaluate(x_test, labels)
            for k, (job, result) in enumerate(zip(jobs, results)):
                params = trained[k]
                for name, value in arrays[job.arrays].items():  # echo what is held but not trained
                    params.setdefault(name, np.asarray(value))
                result.update(arrays=params, loss=float(step_losses[:, k].mean()), loss_after=float(losses[k]),
                              metric_after=task_metric(task, outputs[k], data[k].x_test, data[k].y_test),
                              samples=int(job.steps * bd.batch), steps=job.steps)
                _inject(job, result)
        wall = (time.perf_counter() - start) / len(jobs)
        for result in results:
            result["wall_s"] = wall
        return results


def _inject(job: Job, result: dict[str, Any]) -> None:
    """Apply a simulated fault to a finished device result (fault scenarios and tests)."""
    if job.fault == "raise":
        result.clear()
        result.update(device=job.device, error=f"DeviceError: device {job.device}: simulated failure")
        return
    params = result["arrays"]
    first = next(iter(params))
    if job.fault == "nan":
        params[first] = np.full_like(params[first], np.nan)
    elif job.fault == "shape":
        params[first] = params[first][..., :-1]


def local_steps(training_steps: int | None, epochs: int | None, samples: int, batch: int) -> int:
    if training_steps is not None:
        return training_steps
    return max(1, int(epochs or 1) * math.ceil(samples / batch))


try:  # the Ray actor form; ray is a dependency, but keep the core importable without it
    import ray

    DeviceHost = ray.remote(num_cpus=1)(DeviceHostCore)
except ImportError:  # pragma: no cover
    DeviceHost = None
