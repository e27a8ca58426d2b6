"""A fleet group on GVSoC beside a numpy group, in the same Flower rounds (runs only where GVSoC is configured:
$EDGEFLEET_GVSOC or gvsoc on PATH; the suite's one accepted skip, README "Tests").

The same scenario runs twice: once with one device on GVSoC and one on the numpy executor, once with both on the
numpy executor. Every device trains from the same global adapters on the same data, so the GVSoC device's numbers
(training loss, loss after training) equal the numpy executor's within 1e-4 relative, and so does the round's
aggregate, a weighted mean with the GVSoC device's adapters in it. The GVSoC device's records carry the cycles
GVSoC measured beside the modelled ones."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from device_runtime.gvsoc import GVSOC_ENV
from fleet.engine import run_scenario
from fleet.runs import RunDir
from tests.fleet.runs_compare import scenario_with

RTOL = 1e-4

pytestmark = pytest.mark.skipif(not (os.environ.get(GVSOC_ENV) or shutil.which("gvsoc")),
                                reason=f"GVSoC is not configured (set {GVSOC_ENV} or put gvsoc on PATH; it is built "
                                       "from its public sources, docs/gvsoc.md)")

BASE = {
    "name": "gvsoc-beside-numpy", "seed": 5,
    "model": {"name": "deep-ae", "pretrain_steps": 20, "pretrain_lr": 0.05},
    "tuning": {"strategy": "lora", "rank": 2, "alpha": 4.0, "targets": ["encoder.*", "decoder.*"]},
    "training": {"rounds": 1, "fraction": 1.0, "local_steps": 2, "batch_size": 4, "lr": 0.05},
    "aggregation": {"strategy": "fedavg"},
    "data": {"kind": "machine-sound", "samples_per_device": 8, "test_samples_per_device": 4},
    "fleet": {"groups": [{"name": "sim", "count": 1, "target": "siracusa"},
                         {"name": "soc", "count": 1, "target": "siracusa", "runtime": "gvsoc"}]},
}


def _trained(run_dir):
    return {r["group"]: r for r in RunDir(run_dir).metrics() if r["type"] == "device" and r["instruction"] == "train"}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def test_gvsoc_devices_train_beside_numpy_devices(tmp_path, ray_local):
    mixed = run_scenario(scenario_with(BASE), tmp_path / "mixed", progress=False)
    numpy_only = scenario_with(BASE, **{"fleet.groups.1.runtime": "numpy"})
    run_scenario(numpy_only, tmp_path / "numpy", progress=False)
    assert mixed["failures"] == {} and mixed["rounds_completed"] == 1
    got, want = _trained(tmp_path / "mixed"), _trained(tmp_path / "numpy")
    soc, reference = got["soc"], want["soc"]
    assert (soc["runtime"], reference["runtime"]) == ("gvsoc", "numpy")
    for key in ("loss", "loss_before", "loss_after"):
        assert _rel(soc[key], reference[key]) <= RTOL, key
    t = soc["telemetry"]
    assert t["measured_cycles"] > 0 and t["instructions"] > 0 and t["modelled_cycles_per_step"] > 0
    assert got["sim"]["telemetry"]["measured_cycles"] == 0          # the numpy executor counts nothing
    after_mixed, _ = RunDir(tmp_path / "mixed").load_checkpoint(1)
    after_numpy, _ = RunDir(tmp_path / "numpy").load_checkpoint(1)
    assert after_mixed.keys() == after_numpy.keys()
    for name in after_numpy:   # the mean of the two devices' adapters: the GVSoC device's enter with weight 1/2
        assert _rel(after_mixed[name], after_numpy[name]) <= RTOL, name
