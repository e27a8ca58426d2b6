"""Limits that refuse with one line instead of dying: the fleet's memory need against the machine's available
memory (before anything is built or written), a host job's allocation, actors beyond the cores.

The orchestrator keeps per device: its DeviceInfo and node entry, the round's instruction and reply Messages
(the reply carries the device's adapters), and the per-device records of the round (until the round ends and
they are streamed to metrics.jsonl). The hosts keep device data in a cache bounded by bytes
(``fleet.host.DATA_CACHE_BYTES`` each). So

    need ≈ BASE_BYTES + devices × (PER_DEVICE_BYTES + REPLY_COPIES × adapter_bytes)
           + min(devices × data bytes per device, hosts × DATA_CACHE_BYTES)
           + hosts × devices_per_call × local_steps × 4 (the per-step losses of one host call)

PER_DEVICE_BYTES and BASE_BYTES were measured: peak RSS of one-round Deep-AE rank-4 runs (hosts in process,
64 clips of 640 floats per device = 164 KB of data each) was 757 MB at 1,000 devices and 1,575 MB at 4,000,
a slope of 279 KB per device, of which 164 KB is data and 115 KB the rest (the model gives 16 KB + 2 × 54 KB
of adapters = 124 KB). An estimate above the available memory (MemAvailable, or the
cgroup's limit when lower) is refused with the estimate and the largest device count that fits.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1 << 20
BASE_BYTES = 512 * MIB          # interpreter, numpy/flwr/ray imports, programs, base model (measured ~480 MB)
PER_DEVICE_BYTES = 16 * 1024    # DeviceInfo, node entry, Messages, records (measured; see the module docstring)
REPLY_COPIES = 2                # the reply's Array bytes and its decoded copy
HEADROOM = 0.9                  # refuse above this share of the available memory
DATA_CACHE_BYTES = 1 << 30      # fleet.host.DATA_CACHE_BYTES (kept equal; tests/fleet/test_limits.py checks)


class LimitError(RuntimeError):
    """A run that would not fit; one line with the estimate and what fits."""


@dataclass(frozen=True)
class MemoryEstimate:
    devices: int
    total_bytes: int
    per_device_bytes: int
    fixed_bytes: int
    available_bytes: int

    @property
    def fits(self) -> bool:
        return self.total_bytes <= HEADROOM * self.available_bytes

    @property
    def max_devices(self) -> int:
        room = HEADROOM * self.available_bytes - self.fixed_bytes
        return max(0, int(room // self.per_device_bytes))


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo, or the cgroup v2 limit minus its usage when that is lower."""
    available = math.inf
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return int(available) if available != math.inf else 1 << 62


def sample_bytes(scenario: Any) -> int:
    """Bytes of one device's data (train + test, float32); npz fleets are not estimated (0)."""
    from fleet.data import sample_shape
    shape = sample_shape(scenario.data)
    if shape is None:
        return 0
    samples = (scenario.data.samples_per_device or 0) + (scenario.data.test_samples_per_device or 0)
    return samples * 4 * math.prod(shape)


def estimate_memory(scenario: Any, adapter_bytes: int = 0, actors: int | None = None,
                    available_bytes: int | None = None) -> MemoryEstimate:
    devices = scenario.device_count
    hosts = max(1, scenario.ray.actors if actors is None else actors)
    per_device = PER_DEVICE_BYTES + REPLY_COPIES * adapter_bytes
    data = min(devices * sample_bytes(scenario), hosts * DATA_CACHE_BYTES)
    steps = scenario.training.local_steps or 1
    job = hosts * min(devices, scenario.ray.devices_per_call) * steps * 4
    fixed = BASE_BYTES + data + job
    available = available_memory_bytes() if available_bytes is None else available_bytes
    return MemoryEstimate(devices, fixed + devices * per_device, per_device, fixed, available)


def check_limits(scenario: Any, adapter_bytes: int = 0, actors: int | None = None,
                 available_bytes: int | None = None) -> list[str]:
    """Refuse a fleet that does not fit (LimitError); return warnings (one line each)."""
    estimate = estimate_memory(scenario, adapter_bytes, actors, available_bytes)
    if not estimate.fits:
        fits = (f"at most {estimate.max_devices:,} devices fit" if estimate.max_devices else
                "not even one device fits (lower ray.devices_per_call or training.local_steps)")
        raise LimitError(f"{scenario.device_count:,} devices need about {_gib(estimate.total_bytes)} of memory "
                         f"({_kib(estimate.per_device_bytes)} per device + {_gib(estimate.fixed_bytes)}); "
                         f"{_gib(estimate.available_bytes)} is available: {fits}")
    warnings = []
    actors = scenario.ray.actors if actors is None else actors
    cores = os.cpu_count() or 1
    if actors > cores:
        warnings.append(f"ray.actors = {actors} is more than this machine's {cores} cores: the actors share "
                        f"them (a round is no faster than with {cores})")
    return warnings


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _kib(n: float) -> str:
    return f"{n / 1024:.0f} KiB"


def preflight(scenario: Any, actors: int | None = None, adapter_bytes: int = 0) -> list[str]:
    """Everything checked before a run writes anything: the memory limit (with ``adapter_bytes`` = 0 a lower
    bound, before the programs are compiled) and, for npz data, every device file's shapes."""
    warnings = check_limits(scenario, adapter_bytes, actors)
    if scenario.data.kind == "npz":
        from fleet.data import check_npz_files
        check_npz_files(scenario.data, scenario.device_count)
    return warnings
