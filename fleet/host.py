"""A device host runs many simulated devices in one process: one executor per program, each device's data
generated where it runs (from the scenario seed), adapters in and out as plain dicts of numpy arrays.

``DeviceHostCore`` is plain Python (tests and the in-process engine use it directly); ``DeviceHost`` is the
same class as a Ray actor. What crosses the process boundary is builtins and numpy arrays only: programs
travel as (manifest JSON, .npz bytes), never as pickled objects of ours.
"""
from __future__ import annotations

import ctypes
import math
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from compiler.program import Program
from device_runtime import NumpyDevice
from device_runtime.batched import BatchedDevices
from device_runtime.jobs import Evaluated, batchable, run_job, run_jobs_batched
from device_runtime.protocol import BYZANTINE_VALUE, CAUSE_ERROR, Job, JobResult, decode_jobs, encode_results
from fleet.data import DeviceData, device_data
from fleet.runs import state_digest
from fleet.scenario import DataSpec

def _qemu_device(program: Program, name: str):
    from device_runtime.qemu import QemuDevice  # builds with the RISC-V toolchain on first use
    return QemuDevice(program, name=name)


def _gvsoc_device(program: Program, name: str):
    from device_runtime.gvsoc import GvsocDevice  # GVSoC from $EDGEFLEET_GVSOC or PATH (checked at scenario load)
    return GvsocDevice(program, name=name)


RUNTIMES = {"numpy": NumpyDevice, "qemu": _qemu_device, "gvsoc": _gvsoc_device}



DATA_CACHE_BYTES = 1 << 30  # per host
EVALUATED_CACHE = 1 << 20    # devices whose last evaluation a host remembers (~200 bytes each)


def _nbytes(data: DeviceData) -> int:
    return sum(a.nbytes for a in (data.x_train, data.y_train, data.x_test, data.y_test))


def reuse_freed_memory() -> bool:
    """Let this process keep the large blocks it frees (glibc's malloc): by default glibc hands each
    activation-sized temporary back to the kernel and maps fresh zero-filled pages for the next one, and a host
    makes the same temporaries on every pass (~15 % of a LoRA training pass went to those page faults). The
    process's resident memory then stays at its peak. False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 31))
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


class DeviceHostCore:
    def __init__(self, data_spec: Mapping[str, Any], seed: int):
        reuse_freed_memory()
        self.data_spec = DataSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data_spec.items()})
        self.seed = seed
        self.devices: dict[str, NumpyDevice] = {}
        self.batched: dict[str, BatchedDevices] = {}  # key → the same program with a device axis
        self.programs: dict[str, Program] = {}
        self._data: OrderedDict[int, DeviceData] = OrderedDict()  # least recently used first
        self._data_bytes = 0
        # (program key, executor, device) → (digest of the arrays, the device's numbers with them): a train job
        # with the arrays the device was last evaluated with (the previous round's global adapters) reuses them
        self._evaluated: OrderedDict[tuple[str, str, int], tuple[str, Evaluated]] = OrderedDict()

    # ---- set-up ---------------------------------------------------------------------------------------
    def install(self, key: str, manifest: bytes, params: bytes, batched: bool = False,
                runtime: str = "numpy") -> str:
        """Install a program under ``key``; ``batched``: its device-axis form, used for many devices at once;
        ``runtime``: "numpy" (the executor), "qemu" (the RISC-V ELF on qemu-system-riscv32) or "gvsoc" (the
        siracusa ELF on GVSoC)."""
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
    def run(self, key: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Run the jobs of ``payload`` (``encode_jobs``) on program ``key``; their JobResults, one per job in
        order, failures included, as ``encode_results`` sends them. Jobs that one device-axis pass can take
        together run batched."""
        jobs = decode_jobs(payload)
        by_table = self._digests(jobs)
        digests = [by_table[id(job.arrays)] for job in jobs]
        batched = self.batched.get(key)
        together = batched is not None and len(jobs) > 1 and batchable(jobs)
        # numbers are reused only from the same executor (the device-axis program rounds differently)
        where = (key, "batched" if together else "single")
        known = [self._known(where, job.device, digest) for job, digest in zip(jobs, digests)]
        results: list[JobResult] = []
        if together:
            for i in range(0, len(jobs), batched.devices):
                chunk, before = jobs[i:i + batched.devices], known[i:i + batched.devices]
                results += run_jobs_batched(batched, chunk, [self.data(j.device) for j in chunk],
                                            None if None in before else before)
        else:
            device = self.devices[key]
            results = [run_job(device, job, self.data(job.device), k) for job, k in zip(jobs, known)]
        for job, digest, result in zip(jobs, digests, results):
            if result.ok and not job.fault:
                self._remember(where, job.device, digest, Evaluated(result.loss_before, result.metric_before))
        return encode_results([inject_fault(job, result) for job, result in zip(jobs, results)])

    # ---- evaluations a later job can reuse ------------------------------------------------------------
    @staticmethod
    def _digests(jobs: list[Job]) -> dict[int, str]:
        """id(arrays) → the arrays' digest (``runs.state_digest``; jobs decoded from one table share one
        mapping, digested once)."""
        out: dict[int, str] = {}
        for job in jobs:
            if id(job.arrays) not in out:
                out[id(job.arrays)] = state_digest(job.arrays)
        return out

    def _known(self, where: tuple[str, str], device: int, digest: str) -> Evaluated | None:
        entry = self._evaluated.get((*where, device))
        return entry[1] if entry is not None and entry[0] == digest else None

    def _remember(self, where: tuple[str, str], device: int, digest: str, numbers: Evaluated) -> None:
        self._evaluated[(*where, device)] = (digest, numbers)
        self._evaluated.move_to_end((*where, device))
        while len(self._evaluated) > EVALUATED_CACHE:
            self._evaluated.popitem(last=False)


def inject_fault(job: Job, result: JobResult) -> JobResult:
    """Apply a simulated fault to a device's result (fault scenarios and tests)."""
    if not job.fault or not result.ok or job.instruction != "train":
        return result
    if job.fault == "raise":
        return JobResult.failed(job, CAUSE_ERROR, f"DeviceError: device {job.device}: simulated failure")
    params = dict(result.arrays)
    first = next(iter(params))
    if job.fault in ("nan", "inf"):  # what a device whose values overflowed sends: caught by the guard
        params[first] = np.full_like(params[first], np.nan if job.fault == "nan" else np.inf)
    elif job.fault == "byzantine":  # finite, so only a norm bound or a robust strategy keeps it out
        params = {name: np.full_like(value, BYZANTINE_VALUE) for name, value in params.items()}
    elif job.fault == "shape":
        params[first] = params[first][..., :-1]
    return replace(result, arrays=params)


def local_steps(training_steps: int | None, epochs: int | None, samples: int, batch: int) -> int:
    if training_steps is not None:
        return training_steps
    return max(1, int(epochs or 1) * math.ceil(samples / batch))


try:  # the Ray actor form; ray is a dependency, but keep the core importable without it
    import ray

    DeviceHost = ray.remote(num_cpus=1)(DeviceHostCore)
except ImportError:  # pragma: no cover
    DeviceHost = None
