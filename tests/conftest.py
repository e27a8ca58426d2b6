"""Shared fixtures: an isolated cache and Ray temp dir per session; one local Ray instance for fleet tests."""
from __future__ import annotations

import os
import tempfile

import pytest

_SESSION_TMP = tempfile.mkdtemp(prefix="edgefleet-tests-")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("EDGEFLEET_CACHE", os.path.join(_SESSION_TMP, "cache"))
os.environ.setdefault("RAY_TMPDIR", os.path.join(_SESSION_TMP, "ray"))
os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance (2 CPUs, loopback, token authentication), shared by the fleet tests of this
    session."""
    import ray
    from fleet.cluster import start_local_ray
    if not ray.is_initialized():
        start_local_ray(2)
    yield ray
    # left running for later tests in the session; tests that need another cluster shut it down
