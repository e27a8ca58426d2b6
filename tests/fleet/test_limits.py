"""Limits refuse with one line: the fleet's memory need against what is available, a host call's allocation,
actors beyond the cores."""
from __future__ import annotations

import os
import re

import pytest

from fleet import host, limits
from fleet.limits import LimitError, check_limits, estimate_memory
from fleet.scenario import parse_scenario

GIB = 1 << 30


def scenario(count=1000, actors=2, local_steps=10, devices_per_call=256):
    return parse_scenario({"name": "l", "model": {"name": "deep-ae"},
                           "training": {"local_steps": local_steps, "batch_size": 16},
                           "data": {"kind": "machine-sound"}, "ray": {"actors": actors,
                                                                      "devices_per_call": devices_per_call},
                           "fleet": {"groups": [{"count": count}]}}, source="l.toml")


def test_a_fleet_that_does_not_fit_is_refused_with_the_estimate_and_what_fits():
    with pytest.raises(LimitError) as error:
        check_limits(scenario(count=100_000_000), adapter_bytes=53_504, available_bytes=16 * GIB)
    message = str(error.value)
    assert "\n" not in message
    match = re.fullmatch(r"100,000,000 devices need about ([\d.]+) GiB of memory \((\d+) KiB per device \+ "
                         r"[\d.]+ GiB\); 16.0 GiB is available: at most ([\d,]+) devices fit", message)
    assert match, message
    assert float(match.group(1)) > 10_000 and int(match.group(2)) == (16 * 1024 + 2 * 53_504) // 1024 + 0
    largest = int(match.group(3).replace(",", ""))
    check_limits(scenario(count=largest), adapter_bytes=53_504, available_bytes=16 * GIB)  # the count it names fits
    with pytest.raises(LimitError):
        check_limits(scenario(count=largest + 1000), adapter_bytes=53_504, available_bytes=16 * GIB)


def test_the_estimate_grows_with_devices_and_adapters_and_bounds_the_data_cache():
    small, large = estimate_memory(scenario(1000), 0), estimate_memory(scenario(2000), 0)
    assert large.total_bytes - small.total_bytes == 1000 * limits.PER_DEVICE_BYTES + 1000 * 64 * 640 * 4
    assert estimate_memory(scenario(1000), 50_000).per_device_bytes == limits.PER_DEVICE_BYTES + 100_000
    huge = estimate_memory(scenario(10_000_000), 0)
    assert huge.fixed_bytes <= limits.BASE_BYTES + 2 * host.DATA_CACHE_BYTES + 2 * 256 * 10 * 4
    assert limits.DATA_CACHE_BYTES == host.DATA_CACHE_BYTES


def test_a_host_call_that_cannot_be_allocated_is_refused():
    with pytest.raises(LimitError, match="not even one device fits"):
        check_limits(scenario(count=10, local_steps=10**9, devices_per_call=10), available_bytes=16 * GIB)


def test_actors_beyond_the_cores_warn():
    cores = os.cpu_count() or 1
    assert check_limits(scenario(actors=cores), available_bytes=16 * GIB) == []
    (warning,) = check_limits(scenario(actors=cores + 22), available_bytes=16 * GIB)
    assert f"ray.actors = {cores + 22} is more than this machine's {cores} cores" in warning


def test_available_memory_is_read_from_the_machine():
    available = limits.available_memory_bytes()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < available <= total
