"""A device host runs many simulated devices in one process: one executor per program, each device's data
generated where it runs (from the scenario seed), adapters in and out as plain dicts of numpy arrays.

``DeviceHostCore`` is plain Python (tests and the in-process engine use it directly); ``DeviceHost`` is the
same class as a Ray actor. What crosses the process boundary is builtins and numpy arrays only: programs
travel as (manifest JSON, .npz bytes), never as pickled objects of ours.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from compiler.program import Program
from device_runtime import DeviceError, NumpyDevice
from fleet.data import DeviceData, device_data
from fleet.scenario import DataSpec

# fault injection (scenario fleet.groups[].faults): the kinds a device can be told to simulate
FAULT_KINDS = ("raise", "nan", "shape")


@dataclass(frozen=True)
class Job:
    device: int                # device index in the fleet
    arrays: str                # key into the call's table of adapter sets
    steps: int
    lr: float
    freeze: tuple[str, ...] = ()   # parameter names that must not change (FFA-LoRA's A)
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


class DeviceHostCore:
    def __init__(self, data_spec: Mapping[str, Any], seed: int):
        self.data_spec = DataSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data_spec.items()})
        self.seed = seed
        self.devices: dict[str, NumpyDevice] = {}
        self.programs: dict[str, Program] = {}
        self._data: dict[int, DeviceData] = {}

    # ---- set-up ---------------------------------------------------------------------------------------
    def install(self, key: str, manifest: bytes, params: bytes) -> str:
        if key not in self.devices:
            program = Program.from_bytes(manifest, params, where=f"program {key}")
            self.programs[key] = program
            self.devices[key] = NumpyDevice(program, name=key)
        return key

    def data(self, device: int) -> DeviceData:
        if device not in self._data:
            if len(self._data) > 4096:  # bound the cache: data is cheap to regenerate
                self._data.clear()
            self._data[device] = device_data(self.data_spec, self.seed, device)
        return self._data[device]

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

    def _one(self, device: NumpyDevice, kind: str, job: Job, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
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
        if job.fault == "raise":
            raise DeviceError(f"device {job.device}: simulated failure")
        y_train = data.y_train if program.task == "classification" else None
        trained = device.train(data.x_train, y_train, job.steps, lr=job.lr)
        params = trained.params
        for name, value in arrays.items():  # echo what the device holds but does not train (FFA-LoRA's A)
            params.setdefault(name, np.asarray(value))
        for name in job.freeze:  # FFA-LoRA compiles A as frozen; this is a guard for other programs
            params[name] = np.asarray(arrays[name])
        after = device.evaluate(data.x_test, data.y_test)
        if job.fault == "nan":
            first = next(iter(params))
            params[first] = np.full_like(params[first], np.nan)
        elif job.fault == "shape":
            first = next(iter(params))
            params[first] = params[first][..., :-1]
        out.update(arrays=params, loss=float(np.mean(trained.losses)), loss_after=after.loss,
                   metric_after=task_metric(program.task, after.outputs, data.x_test, data.y_test),
                   samples=int(trained.telemetry.samples), steps=job.steps)
        return out


def local_steps(training_steps: int | None, epochs: int | None, samples: int, batch: int) -> int:
    if training_steps is not None:
        return training_steps
    return max(1, int(epochs or 1) * math.ceil(samples / batch))


try:  # the Ray actor form; ray is a dependency, but keep the core importable without it
    import ray

    DeviceHost = ray.remote(num_cpus=1)(DeviceHostCore)
except ImportError:  # pragma: no cover
    DeviceHost = None
