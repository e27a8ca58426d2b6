"""The fleet end to end: Flower strategies driving Ray-hosted devices, checkpoints, resume, faults, and
personalization that helps."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fleet.engine import run_scenario
from fleet.runs import RunDir, RunError
from fleet.scenario import load_scenario
from tests.fleet.runs_compare import comparable, scenario_with

BASE = {
    "name": "tiny", "seed": 3,
    "model": {"name": "cct-digits", "pretrain_steps": 40, "pretrain_lr": 0.05},
    "tuning": {"strategy": "lora", "rank": 2, "alpha": 4.0, "targets": ["*attn*"], "train": ["classifier.*"]},
    "training": {"rounds": 3, "fraction": 0.5, "local_steps": 3, "batch_size": 8, "lr": 0.05},
    "aggregation": {"strategy": "fedit"},
    "data": {"kind": "digits", "dirichlet_alpha": 0.5, "samples_per_device": 16, "test_samples_per_device": 16},
    "fleet": {"groups": [{"name": "g", "count": 10, "target": "siracusa"}]},
}


def scenario(**changes):
    return scenario_with(BASE, **changes)


def device_records(run_dir):
    return [r for r in RunDir(run_dir).metrics() if r["type"] == "device"]


def test_run_writes_the_run_directory(tmp_path, ray_local):
    summary = run_scenario(scenario(), tmp_path / "run", progress=False)
    run = RunDir(tmp_path / "run")
    assert run.state() == {"rounds_completed": 3, "finished": True}
    for key in ("rounds_completed", "devices", "timing"):
        assert key in summary
    p = summary["personalization"]
    for key in ("base_accuracy_mean", "global_accuracy_mean", "personalized_accuracy_mean"):
        assert 0.0 <= p[key] <= 1.0
    assert summary["rounds_completed"] == 3 and summary["devices"] == 10
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds_completed"] == 3
    rounds = [r for r in run.metrics() if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    trained = [r for r in device_records(tmp_path / "run") if r["instruction"] == "train"]
    assert {r["round"] for r in trained} == {1, 2, 3}
    for record in trained:  # per device per round: loss and accuracy before/after, time, traffic
        for key in ("loss_before", "loss_after", "metric_before", "metric_after", "loss", "num_examples",
                    "group", "target", "runtime"):
            assert record[key] is not None, key
        t = record["telemetry"]
        assert t["bytes_up"] > 0 and t["bytes_down"] > 0 and t["link_s"] > 0 and t["wall_s"] > 0
        assert t["modelled_cycles_per_step"] > 0 and t["steps"] == 3 and t["samples"] == 3 * 8
        assert set(t["peak_bytes_by_level"]) >= {"L1", "L2"}
    for r in range(4):
        assert run.checkpoint_path(r).exists()
    with pytest.raises(RunError, match="already holds a run"):
        run_scenario(scenario(), tmp_path / "run", progress=False)
    assert run.state()["finished"]  # the finished run is untouched


def test_resume_equals_uninterrupted(tmp_path, ray_local):
    s = scenario(**{"training.rounds": 4, "aggregation.strategy": "fedavgm"})
    run_scenario(s, tmp_path / "full", progress=False)
    stopped = run_scenario(s, tmp_path / "killed", progress=False, stop_after_round=2)
    assert stopped == {"stopped_after_round": 2}
    assert RunDir(tmp_path / "killed").state()["rounds_completed"] == 2
    run_scenario(None, tmp_path / "killed", resume=True, progress=False)
    full, resumed = RunDir(tmp_path / "full"), RunDir(tmp_path / "killed")
    a, _ = full.load_checkpoint(4)
    b, _ = resumed.load_checkpoint(4)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert comparable(full.metrics()) == comparable(resumed.metrics())
    sa = json.loads((tmp_path / "full" / "summary.json").read_text())["personalization"]
    sb = json.loads((tmp_path / "killed" / "summary.json").read_text())["personalization"]
    assert sa["per_device"] == sb["per_device"]


def test_stock_flower_strategy_on_adapters(tmp_path, ray_local):
    summary = run_scenario(scenario(**{"aggregation.strategy": "fedadam", "training.rounds": 2}),
                           tmp_path / "run", progress=False)
    assert summary["rounds_completed"] == 2
    arrays0, _ = RunDir(tmp_path / "run").load_checkpoint(0)
    arrays2, state = RunDir(tmp_path / "run").load_checkpoint(2)
    assert any(not np.allclose(arrays0[k], arrays2[k]) for k in arrays0)
    assert any(k.startswith("strategy.m_t:dict/") for k in state)  # FedAdam's moments are checkpointed


def test_personalization_beats_the_base_model_on_digits(tmp_path, ray_local):
    s = scenario(**{"training.rounds": 3, "training.fraction": 1.0, "training.local_steps": 8,
                    "model.pretrain_steps": 150})
    summary = run_scenario(s, tmp_path / "run", progress=False, actors=0)
    p = summary["personalization"]
    assert p["personalized_accuracy_mean"] > p["base_accuracy_mean"] + 0.02, p


def test_deep_ae_anomaly_scenario_shows_its_point_at_its_own_settings(tmp_path, ray_local):
    """The shipped anomaly scenario, unchanged: federated LoRA and then local fine-tuning raise the mean AUC
    over the base model (with SGD pretraining the base sat at the mean predictor and nothing moved)."""
    summary = run_scenario(load_scenario(Path(__file__).parents[2] / "scenarios/deep-ae-anomaly.toml"), tmp_path / "run", progress=False,
                           actors=0)
    p = summary["personalization"]
    assert p["global_auc_mean"] > p["base_auc_mean"] + 0.01, p
    assert p["personalized_auc_mean"] > p["base_auc_mean"] + 0.015, p
    assert p["personalized_auc_mean"] >= p["global_auc_mean"], p


def test_two_node_ray_cluster(tmp_path):
    """A real two-node Ray cluster on this machine (two raylets); the host actors land on both nodes."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        s = scenario(**{"ray": {"address": cluster.address, "actors": 2, "devices_per_call": 3},
                        "training.rounds": 2})
        summary = run_scenario(s, tmp_path / "run", progress=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        assert summary["hosts"] == {"actors": 2, "nodes": 2}
        assert summary["rounds_completed"] == 2
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_every_fault_kind_is_left_out_and_counted(tmp_path, ray_local):
    groups = [{"name": "ok", "count": 4, "target": "siracusa"},
              {"name": "raises", "count": 2, "target": "siracusa", "faults": {"kind": "raise"}},
              {"name": "nan", "count": 2, "target": "siracusa", "faults": {"kind": "nan"}},
              {"name": "shape", "count": 2, "target": "siracusa", "faults": {"kind": "shape"}},
              {"name": "flaky", "count": 2, "target": "siracusa", "availability": {"kind": "dropout", "p": 0.999}},
              {"name": "slow", "count": 2, "target": "siracusa", "deadline_s": 1e-6}]
    s = scenario(**{"fleet.groups": groups, "training.fraction": 1.0, "training.rounds": 2})
    summary = run_scenario(s, tmp_path / "run", progress=False)
    assert summary["rounds_completed"] == 2
    rounds = [r for r in RunDir(tmp_path / "run").metrics() if r["type"] == "round"]
    for r in rounds:
        assert r["failures"] == {"error": 2, "straggler": 2}
        assert r["unavailable"] == {"dropout": 2}  # expected in a fleet: not a failure
        assert r["rejected"] == {"nan": 2, "shape": 2}  # the replies arrive, then the guard leaves them out
        assert r["devices_trained"] == 4 + 2 + 2
    arrays0, _ = RunDir(tmp_path / "run").load_checkpoint(0)
    arrays2, _ = RunDir(tmp_path / "run").load_checkpoint(2)
    assert all(np.isfinite(v).all() for v in arrays2.values())
    assert all(arrays0[k].shape == arrays2[k].shape for k in arrays0)
    assert any(not np.allclose(arrays0[k], arrays2[k]) for k in arrays0)  # the good devices were aggregated
    assert summary["failures"]["straggler"] == 4


def test_bad_scenario_key_is_one_line(tmp_path):
    import subprocess
    import sys
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[trainng]\nrounds = 3\n')
    out = subprocess.run([sys.executable, "-m", "fleet.cli", "run", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainng" in lines[0] and "did you mean" in lines[0], out.stderr


@pytest.mark.parametrize("aggregation", ["hetlora", "flexlora"])
def test_ranks_from_memory_budgets(tmp_path, ray_local, aggregation):
    """Each group's LoRA rank is the largest whose compiled program fits its memory budget."""
    from compiler.pipeline import compile_model
    totals = {r: compile_model("cct-digits", {"strategy": "lora", "rank": r, "alpha": 4.0, "targets": ["*attn*"],
                                              "train": ["classifier.*"]}, batch=8).report["memory"]["total_bytes"]
              for r in (1, 2, 4)}
    groups = [{"name": "small", "count": 3, "target": "siracusa", "memory_kib": (totals[1] + 1023) // 1024},
              {"name": "large", "count": 3, "target": "siracusa", "memory_kib": (totals[4] + 1023) // 1024}]
    s = scenario(**{"fleet.groups": groups, "tuning.rank": 4, "tuning.rank_from_memory": True,
                    "aggregation.strategy": aggregation, "training.rounds": 2, "training.fraction": 1.0})
    summary = run_scenario(s, tmp_path / "run", progress=False)
    assert summary["cost"]["programs"] == ["siracusa-r1", "siracusa-r4"]
    assert summary["failures"] == {}
    arrays, _ = RunDir(tmp_path / "run").load_checkpoint(2)
    assert all(v.shape[-1] == 4 or v.shape[0] == 4 for k, v in arrays.items() if ".lora_" in k)
    assert np.isfinite(summary["personalization"]["personalized_accuracy_mean"])


def test_a_qemu_group_runs_in_the_fleet(tmp_path, ray_local):
    """One group runs the RISC-V ELF on QEMU, the other the numpy executor, in the same Flower round (QEMU
    against numpy number for number is tests/codegen/test_qemu.py)."""
    groups = [{"name": "sim", "count": 2, "target": "siracusa"},
              {"name": "emu", "count": 2, "target": "siracusa", "runtime": "qemu"}]
    s = scenario(**{"fleet.groups": groups, "training.rounds": 1, "training.fraction": 1.0,
                    "training.local_steps": 2, "data.samples_per_device": 8, "data.test_samples_per_device": 8})
    summary = run_scenario(s, tmp_path / "run", progress=False)
    assert summary["failures"] == {} and summary["rounds_completed"] == 1
    assert summary["cost"]["programs"] == ["siracusa-r2", "siracusa-r2-qemu"]
    trained = [r for r in device_records(tmp_path / "run") if r["instruction"] == "train"]
    assert {r["group"] for r in trained} == {"sim", "emu"}
    assert {r["runtime"] for r in trained} == {"numpy", "qemu"}
    assert all(np.isfinite(r["loss_after"]) for r in trained)


def test_sparse_schemes_from_group_memory_budgets(tmp_path, ray_local):
    """strategy = "sparse" with sparse_from_memory: each group's scheme is chosen for its memory_kib by
    compiler.sparse_search.choose_sparse; both groups train in the same round and their programs fit."""
    groups = [{"name": "small", "count": 2, "target": "siracusa", "memory_kib": 140},
              {"name": "large", "count": 2, "target": "siracusa", "memory_kib": 380}]
    tuning = {"strategy": "sparse", "sparse_from_memory": True}
    s = scenario(**{"fleet.groups": groups, "tuning": tuning, "aggregation.strategy": "fedavg", "training.rounds": 1,
                    "training.fraction": 1.0, "training.local_steps": 2})
    summary = run_scenario(s, tmp_path / "run", progress=False)
    assert summary["failures"] == {} and summary["rounds_completed"] == 1
    assert summary["cost"]["programs"] == ["siracusa-sparse140k", "siracusa-sparse380k"]
    from fleet.engine import build_fleet
    from fleet.programs import ProgramBuilder, pretrain_base
    builder = ProgramBuilder(s, pretrain_base(s, log=lambda *_: None))
    fleet = build_fleet(s, builder)
    small, large = (fleet.programs[k] for k in summary["cost"]["programs"])
    assert small.report["memory"]["total_bytes"] <= 140 * 1024 < large.report["memory"]["total_bytes"] <= 380 * 1024
    assert small.report["params"]["trainable"] < large.report["params"]["trainable"]
    arrays, _ = RunDir(tmp_path / "run").load_checkpoint(1)
    assert set(small.trainable) | set(large.trainable) == set(arrays)
    trained = [r for r in device_records(tmp_path / "run") if r["instruction"] == "train"]
    assert {r["group"] for r in trained} == {"small", "large"} and all(np.isfinite(r["loss_after"]) for r in trained)
