"""Hostile devices against every robust choice a scenario can make: a NaN-loss device, an Inf-update device and
a large-finite Byzantine device among honest ones, through Flower's real ``Strategy.start()`` loop (the grid is
the in-process LoopbackGrid of test_strategies: a transport double, the strategies are real)."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import MessageType, MetricRecord, RecordDict

from fleet.scenario import parse_scenario
from fleet.strategies import Guarded, strategy_from_spec, update_norm
from tests.fleet.test_strategies import LoopbackGrid, adapter_state, task_identity, to_record, to_state  # noqa: F401

HONEST = 8
STEP = 0.1


def client(kind: str, index: int):
    def run(message):
        if message.metadata.message_type == MessageType.EVALUATE:
            return RecordDict({"metrics": MetricRecord({"num-examples": 10, "eval-loss": 1.0})})
        state = to_state(message.content["arrays"])
        loss = 1.0
        if kind == "honest":
            out = {k: v + STEP * (1 + 0.01 * index) for k, v in state.items()}
        elif kind == "nan-loss":
            out, loss = {k: v * np.nan for k, v in state.items()}, float("nan")
        elif kind == "inf-update":
            out = {k: np.full_like(v, np.inf) for k, v in state.items()}
        else:  # Byzantine: finite but large, every value 3.0 (what poisoned FedIT in the issue)
            out = {k: np.full_like(v, 3.0) for k, v in state.items()}
        return RecordDict({"arrays": to_record(out), "metrics": MetricRecord({"num-examples": 10, "train-loss": loss})})
    return run


def fleet():
    kinds = ["honest"] * HONEST + ["nan-loss", "inf-update", "byzantine"]
    return LoopbackGrid({100 + i: client(kind, i) for i, kind in enumerate(kinds)})


def aggregation(strategy: str, **keys):
    raw = {"name": "t", "model": {"name": "cct-digits"}, "tuning": {"strategy": "lora"},
           "aggregation": {"strategy": strategy, **keys}, "fleet": {"groups": [{"count": 11}]}}
    return parse_scenario(raw, source="test.toml").aggregation


def run(spec, rounds=2):
    initial = adapter_state(2, n_in=6, n_out=5)
    strategy = strategy_from_spec(spec, fraction=1.0, devices=11)
    result = strategy.start(grid=fleet(), initial_arrays=to_record(initial), num_rounds=rounds)
    return strategy, initial, to_state(result.arrays)


def honest_drift(initial, final, rounds=2):
    """How far the global state is from what the honest devices alone would give (per element, max)."""
    expected = {k: v + rounds * STEP * (1 + 0.01 * np.mean(range(HONEST))) for k, v in initial.items()}
    return max(float(np.max(np.abs(final[k] - expected[k]))) for k in initial)


def test_without_a_defence_the_byzantine_device_poisons_fedavg():
    strategy, initial, final = run(aggregation("fedit"))
    assert strategy.rejected_total == {"nan": 4}  # NaN-loss and Inf-update, each round: counted by cause
    assert honest_drift(initial, final) > 0.3      # the large-finite device moved everything


def test_fedavg_with_a_norm_bound_leaves_the_byzantine_device_out():
    strategy, initial, final = run(aggregation("fedit", max_update_norm=1.0))
    assert strategy.rejected_total == {"nan": 4, "norm": 2}
    assert honest_drift(initial, final) < 0.01


@pytest.mark.parametrize("name,keys,tolerance", [
    ("fedmedian", {}, 0.01),
    ("fedtrimmedavg", {"beta": 0.2}, 0.01),
    ("krum", {"num_malicious_nodes": 1}, 0.02),
    ("multikrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 3}, 0.02),
    ("bulyan", {"num_malicious_nodes": 1}, 0.02),
])
def test_each_robust_strategy_blocks_the_byzantine_device(name, keys, tolerance):
    strategy, initial, final = run(aggregation(name, **keys))
    assert type(strategy.strategy).__name__.lower() == name
    assert strategy.rejected_total == {"nan": 4}
    assert all(np.isfinite(v).all() for v in final.values())
    assert honest_drift(initial, final) < tolerance


def test_dp_fixed_clipping_bounds_the_byzantine_device():
    spec = aggregation("fedavg", dp={"clipping": "fixed", "noise_multiplier": 0.0, "clipping_norm": 0.05})
    strategy, initial, final = run(spec)
    inner = strategy.strategy
    assert type(inner).__name__ == "DifferentialPrivacyServerSideFixedClipping"
    assert inner.num_sampled_clients == 11
    step = update_norm(final, initial)
    assert step <= 2 * 0.05 + 1e-9  # every update clipped to 0.05, two rounds


def test_dp_adaptive_clipping_by_name():
    spec = aggregation("fedmedian", dp={"clipping": "adaptive", "noise_multiplier": 0.0,
                                        "initial_clipping_norm": 0.5})
    strategy, _, final = run(spec)
    assert type(strategy.strategy).__name__ == "DifferentialPrivacyServerSideAdaptiveClipping"
    assert all(np.isfinite(v).all() for v in final.values())


def test_the_norm_bound_is_checked_before_the_strategy_sees_a_reply():
    seen = []


    spec = aggregation("fedavg", max_update_norm=1.0)
    strategy = strategy_from_spec(spec, fraction=1.0, devices=11)
    inner_aggregate = strategy.strategy.aggregate_train
    strategy.strategy.aggregate_train = lambda rnd, replies: (seen.append(list(replies)), inner_aggregate(rnd, seen[-1]))[1]
    strategy.start(grid=fleet(), initial_arrays=to_record(adapter_state(2, 6, 5)), num_rounds=1)
    assert len(seen[0]) == HONEST


def test_scenario_refuses_unknown_or_misplaced_robust_keys():
    from fleet.scenario import ScenarioError
    with pytest.raises(ScenarioError, match=r'aggregation.num_malicious_nodes: only used when strategy is "krum", '
                                            r'"multikrum", "bulyan"'):
        aggregation("fedavg", num_malicious_nodes=1)
    with pytest.raises(ScenarioError, match=r"aggregation.dp.clipping_norm: missing required key"):
        aggregation("fedavg", dp={"clipping": "fixed", "noise_multiplier": 1.0})
    with pytest.raises(ScenarioError, match=r"aggregation.max_update_norm: expected a number > 0"):
        aggregation("fedavg", max_update_norm=-1)
    spec = aggregation("multikrum", num_malicious_nodes=2, max_update_norm=5.0,
                       dp={"clipping": "fixed", "noise_multiplier": 0.5, "clipping_norm": 1.0})
    assert spec.num_nodes_to_select == 1 and spec.dp.clipping_norm == 1.0


# ---- the same devices in a whole run (the engine, its fault injection and the run directory) -----------------

HOSTILE_RUN = {
    "name": "hostile", "seed": 2,
    "model": {"name": "cct-digits", "pretrain_steps": 20},
    "tuning": {"strategy": "lora", "rank": 2, "targets": ["*attn*"], "train": ["classifier.*"]},
    "training": {"rounds": 2, "fraction": 1.0, "local_steps": 2, "batch_size": 8, "lr": 0.05},
    "aggregation": {"strategy": "fedavg"},
    "data": {"kind": "digits", "samples_per_device": 16, "test_samples_per_device": 16},
    "fleet": {"groups": [{"name": "honest", "count": 6},
                         {"name": "nan", "count": 1, "faults": {"kind": "nan"}},
                         {"name": "inf", "count": 1, "faults": {"kind": "inf"}},
                         {"name": "byzantine", "count": 1, "faults": {"kind": "byzantine"}}]},
}


def _engine_run(tmp_path, name, **changes):
    from fleet.engine import run_scenario
    from fleet.runs import RunDir
    from tests.fleet.runs_compare import scenario_with
    run_scenario(scenario_with(HOSTILE_RUN, **changes), tmp_path / name, progress=False, actors=0)
    run = RunDir(tmp_path / name)
    final, _ = run.load_checkpoint(2)
    return final, [r for r in run.metrics() if r["type"] == "round"]


def _distance(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.fixture(scope="module")
def honest_only(tmp_path_factory):
    """The six honest devices alone: what a defence should give back."""
    groups = [HOSTILE_RUN["fleet"]["groups"][0]]
    return _engine_run(tmp_path_factory.mktemp("honest"), "run", **{"fleet.groups": groups})[0]


def test_engine_fedavg_with_a_norm_bound_equals_the_honest_devices_alone(tmp_path, honest_only):
    final, rounds = _engine_run(tmp_path, "bounded", **{"aggregation.max_update_norm": 5.0})
    for r in rounds:  # NaN and Inf never reach a strategy; the Byzantine update fails the bound
        assert r["rejected"] == {"nan": 2, "norm": 1}, r["rejected"]
    for k in honest_only:
        np.testing.assert_allclose(final[k], honest_only[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_engine_without_a_bound_the_byzantine_device_poisons_fedavg_and_fedmedian_resists(tmp_path, honest_only):
    poisoned, rounds = _engine_run(tmp_path, "plain")
    assert all(r["rejected"] == {"nan": 2} for r in rounds), rounds
    assert all(np.isfinite(v).all() for v in poisoned.values())
    median, _ = _engine_run(tmp_path, "median", **{"aggregation.strategy": "fedmedian"})
    assert _distance(poisoned, honest_only) > 0.3  # every value pulled a seventh of the way to 3.0
    assert _distance(median, honest_only) < 0.1 * _distance(poisoned, honest_only)
