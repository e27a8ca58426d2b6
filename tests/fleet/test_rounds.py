"""The fleet core's contracts: the round driver, the device protocol, exact resume for every strategy, FedProx
carried out on the device, config keys no device honours, stock and robust Flower strategies (a regression
test for each finding of the fleet-core issue)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import (Bulyan, DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideAdaptiveClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAvg, FedMedian, FedTrimmedAvg,
                                     Krum, MultiKrum)

from compiler import compile_model
from device_runtime import NumpyDevice
from device_runtime.protocol import (CAUSE_NONFINITE, Job, JobResult, ProtocolError, Telemetry, decode_jobs,
                                     decode_results, encode_jobs, encode_results, make_job)
from fleet.arrays import from_record, to_record
from fleet.engine import (HostPool, _dataclass_dict, _initial_arrays, _set_task_identity, build_fleet,
                          run_scenario, scenario_steps, train_config)
from fleet.grid import FleetGrid, JobDefaults
from fleet.programs import ProgramBuilder, pretrain_base
from fleet.roundlog import DeviceRecord, RoundLog
from fleet.rounds import RoundDriver
from fleet.runs import RunDir
from fleet.strategies import Guarded, check_strategy_config
from tests.fleet.runs_compare import comparable, scenario_with

BASE = {
    "name": "rounds", "seed": 5,
    "model": {"name": "cct-digits", "pretrain_steps": 30, "pretrain_lr": 0.05},
    "tuning": {"strategy": "lora", "rank": 2, "alpha": 4.0, "targets": ["*attn*"], "train": ["classifier.*"]},
    "training": {"rounds": 3, "fraction": 0.7, "local_steps": 2, "batch_size": 8, "lr": 0.05},
    "aggregation": {"strategy": "fedavg"},
    "data": {"kind": "digits", "dirichlet_alpha": 0.5, "samples_per_device": 16, "test_samples_per_device": 16},
    "fleet": {"groups": [{"name": "g", "count": 6, "target": "siracusa"}]},
}


def scenario(**changes):
    return scenario_with(BASE, **changes)


def assert_same_run(a_dir, b_dir, rounds):
    a, b = RunDir(a_dir), RunDir(b_dir)
    arrays_a, state_a = a.load_checkpoint(rounds)
    arrays_b, state_b = b.load_checkpoint(rounds)
    assert arrays_a.keys() == arrays_b.keys() and state_a.keys() == state_b.keys()
    for key in arrays_a:
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)
    for key in state_a:
        np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=key)
    assert comparable(a.metrics()) == comparable(b.metrics())


# ---- the protocol --------------------------------------------------------------------------------------

def test_jobs_and_results_cross_as_builtins_and_arrays():
    shared = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    jobs = [make_job("train", i, shared, steps=3, lr=0.1, config={"proximal-mu": 0.5, "server-round": 2},
                     seed=9, round=2) for i in range(3)]
    payload = encode_jobs(jobs)
    assert len(payload["tables"]) == 1  # shared arrays cross once per call
    back = decode_jobs(payload)
    assert [j.device for j in back] == [0, 1, 2] and back[0].proximal_mu == 0.5 and back[0].steps == 3
    np.testing.assert_array_equal(back[2].arrays["w"], shared["w"])
    assert "server-round" not in back[0].config  # informational keys are accepted, not carried
    result = JobResult(4, "train", arrays={"w": np.ones(2, np.float32)}, loss=0.5,
                       telemetry=Telemetry(steps=3, peak_bytes_by_level={"L2": 10}))
    assert JobResult.from_dict(result.to_dict()).telemetry == result.telemetry
    # a call's results: arrays of the same layout travel stacked, one array per name; the rest as they are
    trained = [JobResult(d, "train", arrays={"w": np.full((2, 3), d, np.float32)}, loss=0.1 * d) for d in range(3)]
    mixed = trained + [JobResult(9, "train", arrays={"w": np.ones(4, np.float32)}), JobResult(8, "evaluate")]
    stacked = encode_results(trained + [JobResult(8, "evaluate")])
    assert stacked["stacked"]["arrays"]["w"].shape == (3, 2, 3)
    for sent in (stacked, encode_results(mixed)):
        for a, b in zip(decode_results(sent), trained):
            assert a.device == b.device and a.loss == b.loss
            np.testing.assert_array_equal(a.arrays["w"], b.arrays["w"])
    assert "stacked" not in encode_results(mixed) and decode_results(encode_results(mixed))[3].arrays["w"].shape == (4,)
    with pytest.raises(ProtocolError, match="'clipping_norm'.*no device honours"):
        make_job("train", 0, shared, config={"clipping_norm": 1.0})
    with pytest.raises(ProtocolError, match="instruction 'fly'"):
        Job("fly", 0)


def test_a_reply_and_the_result_it_was_made_from_give_the_same_record():
    """The grid records a device's answer from its JobResult (as the host chunk arrives); a deployment reads
    it back from the reply Message: both give the same DeviceRecord, for every kind of answer."""
    import json
    from flwr.app import Message, RecordDict
    from fleet.messages import record_from_reply, record_from_result, reply_from_result
    _set_task_identity()  # a Message needs a run id, as in a run
    facts = {"group": "g", "target": "siracusa", "runtime": "numpy", "budget_bytes": 5,
             "modelled_cycles_per_step": 7, "peak_bytes_by_level": {"L2": 9}}
    nan, w = float("nan"), {"w": np.ones(2, np.float32)}
    results = [JobResult(3, "train", arrays=w, num_examples=4, loss_before=1.0, metric_before=nan, loss=0.5,
                         loss_after=0.4, metric_after=0.75, telemetry=Telemetry(steps=2, wall_s=0.1, bytes_up=8)),
               JobResult(3, "train", arrays=w, num_examples=4, loss_before=1.0, metric_before=0.5, loss=0.5),
               JobResult(3, "evaluate", num_examples=4, loss_before=nan, metric_before=0.5,
                         telemetry=Telemetry(modelled_cycles_per_step=11)),
               JobResult.failed(Job("train", 3), "timeout", "no answer", Telemetry(wall_s=2.0))]
    for result in results:
        kind = result.instruction
        reply = reply_from_result(Message(RecordDict(), 103, kind), result)
        read = record_from_reply(reply, 2, kind, lambda node: node - 100, lambda index: facts)
        made = record_from_result(result, 2, kind, lambda index: facts)
        assert json.dumps(read.to_dict(), sort_keys=True) == json.dumps(made.to_dict(), sort_keys=True)


def test_the_batched_executor_answers_as_single_devices_do(tmp_path):
    """One device is a batch of one: the device-axis program gives each device the JobResult its own
    single-device run gives (the per-device tensors are marked in the Program, not found by name)."""
    s = scenario()
    builder = ProgramBuilder(s, pretrain_base(s, log=lambda text: None))
    fleet = build_fleet(s, builder)
    initial = _initial_arrays(fleet)
    batched = fleet.batched[fleet.devices[0].program]
    assert set(batched.per_device) == set(initial) and all(batched.tensors[n].per_device for n in initial)
    pool = HostPool(s, fleet.programs, 0, fleet.batched, fleet.runtimes)
    jobs = [make_job("train", i, initial, steps=2, lr=0.05, seed=s.seed) for i in range(4)]
    together = pool.dispatch(fleet.devices[0].program, jobs)
    alone = [pool.dispatch(fleet.devices[0].program, [job])[0] for job in jobs]
    for a, b in zip(together, alone):
        assert a.ok and b.ok and a.device == b.device
        for name in a.arrays:
            np.testing.assert_allclose(a.arrays[name], b.arrays[name], rtol=1e-5, atol=1e-6, err_msg=name)
        assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.metric_after == pytest.approx(b.metric_after)


def test_anomaly_auc_of_many_devices_at_once_equals_the_pairwise_count():
    """task_metrics (all devices at once) gives each device the Mann-Whitney AUC of a direct pairwise count
    (ties half), to the bit; NaN for a device without anomalies; classification is per-device accuracy."""
    from device_runtime.jobs import task_metric, task_metrics
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 12, 6)).astype(np.float32)
    outputs = x + rng.integers(0, 3, (5, 12, 1)).astype(np.float32)  # few distinct errors: many ties
    labels = rng.integers(0, 2, (5, 12))
    labels[4] = 0
    got = task_metrics("anomaly", outputs, x, labels)
    for d in range(4):
        errors = np.mean((outputs[d] - x[d]) ** 2, axis=1)
        pos, neg = errors[labels[d] == 1], errors[labels[d] == 0]
        want = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
        assert got[d] == want == task_metric("anomaly", outputs[d], x[d], labels[d])
    assert np.isnan(got[4])
    logits = rng.standard_normal((3, 7, 4))
    y = rng.integers(0, 4, (3, 7))
    np.testing.assert_array_equal(task_metrics("classification", logits, logits, y),
                                  [np.mean(np.argmax(logits[d], axis=1) == y[d]) for d in range(3)])


def test_train_jobs_told_not_to_evaluate_after(tmp_path):
    """training.evaluate_after = false: the trained arrays are the same to the bit, loss_after/metric_after
    are NaN (not a non-finite failure), batched and single alike; a run records no after-training numbers.
    In a batch, the device whose arrays go non-finite fails alone, and the rest cross as the trained stacks."""
    from device_runtime.jobs import run_jobs_batched
    from fleet.host import DeviceHostCore
    s = scenario()
    fleet = build_fleet(s, ProgramBuilder(s, pretrain_base(s, log=lambda text: None)))
    key, initial = fleet.devices[0].program, _initial_arrays(fleet)
    pool = HostPool(s, fleet.programs, 0, fleet.batched, fleet.runtimes)

    def jobs(after, arrays=None):
        return [make_job("train", i, initial if arrays is None else arrays[i], steps=2, lr=0.05, seed=s.seed,
                         evaluate_after=after) for i in range(4)]

    with_after, without = pool.dispatch(key, jobs(True)), pool.dispatch(key, jobs(False))
    alone = [pool.dispatch(key, [job])[0] for job in jobs(False)]
    for a, b, c in zip(with_after, without, alone):
        assert a.ok and b.ok and c.ok and np.isfinite(a.loss_after) and np.isfinite(a.metric_after)
        assert np.isnan(b.loss_after) and np.isnan(b.metric_after) and np.isnan(c.loss_after)
        assert (a.loss, a.loss_before, a.metric_before) == (b.loss, b.loss_before, b.metric_before)
        for name in a.arrays:
            np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)
    poisoned = [dict(initial) for _ in range(4)]
    poisoned[2] = {**initial, next(iter(initial)): np.full_like(next(iter(initial.values())), np.nan)}
    core = DeviceHostCore(_dataclass_dict(s.data), s.seed)
    results = run_jobs_batched(pool.local.batched[key], jobs(False, poisoned), [core.data(i) for i in range(4)])
    assert [r.ok for r in results] == [True, True, False, True] and results[2].cause == CAUSE_NONFINITE
    clean = run_jobs_batched(pool.local.batched[key], jobs(False), [core.data(i) for i in range(4)])
    sent = encode_results(clean)["stacked"]["arrays"]
    assert all(sent[name] is clean[0].arrays.stacks[name] for name in sent)  # no restacking
    summary = run_scenario(scenario(**{"training.evaluate_after": False, "training.rounds": 1}), tmp_path / "run",
                           progress=False, actors=0)
    trained = [r for r in RunDir(tmp_path / "run").metrics() if r.get("instruction") == "train" and r.get("ok", True)]
    assert trained and all(r["metric_after"] is r["loss_after"] is None and r["metric_before"] > 0 for r in trained)
    assert summary["rounds"][0]["devices_trained"] > 0


def test_a_device_that_goes_nonfinite_is_a_failed_result():
    program = compile_model("deep-ae", {"strategy": "lora", "rank": 2}, batch=4, lr=1e30)
    device = NumpyDevice(program)
    from device_runtime.jobs import run_job

    class Data:
        x_train = np.full((8, 640), 1e3, np.float32)
        y_train = np.zeros(8, np.int64)
        x_test = x_train
        y_test = np.array([0, 1] * 4)

    result = run_job(device, make_job("train", 3, program.adapter_values(), steps=3, lr=1e30), Data())
    assert not result.ok and result.cause == CAUSE_NONFINITE and "not finite" in result.error


# ---- FedProx on the device -----------------------------------------------------------------------------

def test_proximal_step_equals_pytorch():
    """SGD with momentum on loss + μ/2·‖p − p₀‖², p starting away from the anchor p₀: the compiled program
    (anchor tensors, a runtime μ) against PyTorch autograd on the same LoRA model."""
    from tests.compiler.test_training_parity import _data
    from tests.oracle.torch_onnx import LoraFactors, TorchOnnx
    from compiler import zoo
    from compiler.tuning import weight_layer
    mu, lr, momentum, steps = 0.7, 0.05, 0.9, 4
    program = compile_model("deep-ae", {"strategy": "lora", "rank": 2, "init": "random"}, batch=8, lr=lr,
                            momentum=momentum, proximal=True)
    x, _ = _data("deep-ae", 8)
    rng = np.random.default_rng(0)
    start = {n: program.values[n] + 0.05 * rng.standard_normal(program.values[n].shape).astype(np.float32)
             for n in program.trainable}
    anchors = program.adapter_values()
    device = NumpyDevice(program)
    device.set_params(start)
    device.reset_optimizer()
    device.set_proximal(mu, anchors)
    got = device.train(x, None, steps)

    layers = sorted({n.rsplit(".lora_", 1)[0] for n in program.trainable})
    lora = {weight_layer(f"{layer}.weight"): LoraFactors(start[f"{layer}.lora_a"], start[f"{layer}.lora_b"],
                                                         program.tuning["alpha"]) for layer in layers}
    oracle = TorchOnnx(zoo.build("deep-ae"), trainable=set(), lora=lora, dtype=torch.float64)
    params = oracle.parameters()
    assert set(params) == set(program.trainable)
    opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=momentum)
    for step in range(steps):
        idx = (np.arange(8) + step * 8) % len(x)
        xb = torch.as_tensor(x[idx], dtype=torch.float64)
        loss = torch.mean((oracle(x[idx]) - xb) ** 2)
        loss = loss + mu / 2 * sum(((p - torch.as_tensor(anchors[n], dtype=torch.float64)) ** 2).sum()
                                   for n, p in params.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in params.items():
        ref = p.detach().numpy()
        np.testing.assert_allclose(got.params[name], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=name)


def test_a_program_without_the_proximal_option_refuses_mu():
    program = compile_model("deep-ae", {"strategy": "lora", "rank": 2}, batch=4)
    with pytest.raises(Exception, match="without the proximal option"):
        NumpyDevice(program).set_proximal(0.5)


def test_fedprox_mu_reaches_the_devices(tmp_path):
    """Finding 1: proximal_mu was never read on the device, so FedProx equalled FedAvg bit for bit."""
    base = {"training.lr": 0.01, "training.local_steps": 6, "training.rounds": 2}
    run_scenario(scenario(**base), tmp_path / "avg", progress=False, actors=0)
    run_scenario(scenario(**base, **{"aggregation": {"strategy": "fedprox", "proximal_mu": 100.0}}),
                 tmp_path / "prox", progress=False, actors=0)
    start, _ = RunDir(tmp_path / "avg").load_checkpoint(0)
    avg, _ = RunDir(tmp_path / "avg").load_checkpoint(2)
    prox, _ = RunDir(tmp_path / "prox").load_checkpoint(2)
    moved = {n: (np.linalg.norm(avg[n] - start[n]), np.linalg.norm(prox[n] - start[n])) for n in start}
    assert any(a != p for a, p in moved.values())
    total_avg = sum(a for a, _ in moved.values())
    total_prox = sum(p for _, p in moved.values())
    assert total_prox < 0.7 * total_avg, moved  # the pull towards the global adapters holds them back


# ---- exact resume, every strategy ----------------------------------------------------------------------

RESUME_CASES = {
    "fedavg": {}, "fedavgm": {}, "fedadam": {}, "fedyogi": {}, "fedadagrad": {},
    "fedprox": {"proximal_mu": 0.5}, "fedit": {}, "ffa-lora": {}, "flexlora": {}, "hetlora": {},
}


@pytest.mark.parametrize("strategy", sorted(RESUME_CASES))
def test_resume_equals_an_uninterrupted_run(tmp_path, strategy):
    """Finding 2: a resumed run restarted Flower's server_round at 1 (FedAdam's bias correction); now the
    driver continues at the round after the checkpoint with every piece of strategy state restored."""
    s = scenario(aggregation={"strategy": strategy, **RESUME_CASES[strategy]})
    run_scenario(s, tmp_path / "full", progress=False, actors=0)
    assert run_scenario(s, tmp_path / "killed", progress=False, actors=0, stop_after_round=1) == \
        {"stopped_after_round": 1}
    run_scenario(None, tmp_path / "killed", resume=True, progress=False, actors=0)
    assert_same_run(tmp_path / "full", tmp_path / "killed", 3)


def test_a_finished_run_extends_to_more_rounds(tmp_path):
    """Finding 5: `--resume --rounds N` extends a finished run, and ends as an N-round run would."""
    run_scenario(scenario(**{"training.rounds": 3, "aggregation": {"strategy": "fedadam"}}), tmp_path / "long",
                 progress=False, actors=0)
    run_scenario(scenario(**{"training.rounds": 2, "aggregation": {"strategy": "fedadam"}}), tmp_path / "short",
                 progress=False, actors=0)
    assert RunDir(tmp_path / "short").state() == {"rounds_completed": 2, "finished": True}
    out = subprocess.run([sys.executable, "-m", "fleet.cli", "run", "--resume", str(tmp_path / "short"), "--quiet"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "already finished (2 rounds)" in out.stderr and "--rounds N" in out.stderr
    run_scenario(None, tmp_path / "short", resume=True, rounds=3, progress=False, actors=0)
    assert_same_run(tmp_path / "long", tmp_path / "short", 3)
    log = (tmp_path / "short" / "run.log").read_text()
    assert "resumed after round 2 of 3" in log and log.count("finished: ") == 2


# ---- strategies' config keys -----------------------------------------------------------------------------

def test_a_key_no_device_honours_is_refused_before_anything_is_written(tmp_path):
    arrays = {"x.lora_a": np.zeros((2, 2), np.float32)}
    keys = check_strategy_config(Guarded(FedAvg()), arrays, {"lr": 0.1, "local-steps": 2})
    assert keys == {"lr", "local-steps", "server-round"}
    client_dp = DifferentialPrivacyClientSideFixedClipping(FedAvg(), noise_multiplier=0.1, clipping_norm=1.0,
                                                           num_sampled_clients=4)
    with pytest.raises(ProtocolError, match="'clipping_norm' are sent to devices but no device honours"):
        check_strategy_config(client_dp, arrays, {})


# ---- stock, robust and DP strategies through the driver ---------------------------------------------------

def _driver_fleet(tmp_path):
    s = scenario(**{"training.fraction": 1.0, "fleet.groups": [{"name": "g", "count": 9, "target": "siracusa"}]})
    builder = ProgramBuilder(s, pretrain_base(s, log=lambda text: None))
    fleet = build_fleet(s, builder)
    pool = HostPool(s, fleet.programs, 0, fleet.batched, fleet.runtimes)
    grid = FleetGrid(fleet.devices, pool.stream, JobDefaults(scenario_steps(s), s.training.lr, s.seed))
    return s, grid, _initial_arrays(fleet)


ROBUST = {
    "fedmedian": lambda: FedMedian(),
    "fedtrimmedavg": lambda: FedTrimmedAvg(beta=0.2),
    "krum": lambda: Krum(num_malicious_nodes=1),
    "multikrum": lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
    "bulyan": lambda: Bulyan(num_malicious_nodes=1),
    "dp-fixed": lambda: DifferentialPrivacyServerSideFixedClipping(FedAvg(), noise_multiplier=0.01,
                                                                   clipping_norm=10.0, num_sampled_clients=9),
    "dp-adaptive": lambda: DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), noise_multiplier=0.01,
                                                                         num_sampled_clients=9),
}


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_stock_robust_and_dp_strategies_run_unchanged(tmp_path, name):
    s, grid, initial = _driver_fleet(tmp_path)
    _set_task_identity()
    strategy = Guarded(ROBUST[name]())
    logs: list[RoundLog] = []
    sent: list[tuple[int, list[int]]] = []

    class Keep:
        def begin_round(self, round_, total_rounds):
            pass

        def jobs_sent(self, round_, devices):  # optional hook: the exporter's "training" state
            sent.append((round_, list(devices)))

        def device_done(self, record):
            assert isinstance(record, DeviceRecord) and record.group == "g"

        def end_round(self, log):
            logs.append(log)

    driver = RoundDriver(strategy, grid, seed=s.seed, observers=[Keep()], train_config=train_config(s))
    final = from_record(driver.run(to_record(initial), 1, 2))
    assert [log.round for log in logs] == [1, 2]
    assert sent == [(1, list(range(9))), (2, list(range(9)))]
    assert all(len(log.of("train")) == 9 and not log.failures for log in logs)
    assert all(np.isfinite(v).all() for v in final.values())
    assert any(not np.allclose(final[k], initial[k]) for k in initial)


# ---- Ray: RAY_ADDRESS and a two-node cluster -------------------------------------------------------------

def test_ray_address_from_the_environment(tmp_path, monkeypatch):
    """Finding 6: with RAY_ADDRESS set (as `ray job submit` does) and no ray.address, the run joins that
    cluster instead of failing on num_cpus; here a real two-node cluster on this machine."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        s = scenario(**{"ray": {"actors": 2, "devices_per_call": 2}, "training.rounds": 1})
        summary = run_scenario(s, tmp_path / "run", progress=False)
        assert summary["hosts"] == {"actors": 2, "nodes": 2}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_train_job_reuses_the_evaluation_of_the_same_arrays(monkeypatch):
    """A device evaluated with the global adapters (the previous round's evaluate job) does not evaluate
    them again at the start of a train job with the same adapters: the numbers are the ones a fresh host
    computes, to the bit; other adapters, or another executor, are evaluated anew."""
    from device_runtime.batched import BatchedDevices
    from fleet.host import DeviceHostCore
    s = scenario()
    builder = ProgramBuilder(s, pretrain_base(s, log=lambda text: None))
    fleet = build_fleet(s, builder)
    key = fleet.devices[0].program
    initial = _initial_arrays(fleet)
    moved = {k: v + np.float32(0.01) for k, v in initial.items()}

    def host() -> DeviceHostCore:
        core = DeviceHostCore(_dataclass_dict(s.data), s.seed)
        core.install(key, *fleet.programs[key].to_bytes())
        core.install(key, *fleet.batched[key].to_bytes(), batched=True)
        return core

    evaluations = []
    real = BatchedDevices.evaluate_stacked
    monkeypatch.setattr(BatchedDevices, "evaluate_stacked", lambda self, *a: evaluations.append(1) or real(self, *a))

    def run(core, kind, arrays, devices):
        jobs = [make_job(kind, d, arrays, steps=1, lr=0.05, seed=s.seed) for d in devices]
        return decode_results(core.run(key, encode_jobs(jobs)))

    warm, fresh = host(), host()
    evaluated = run(warm, "evaluate", initial, [0, 1, 2])
    evaluations.clear()
    reused = run(warm, "train", initial, [0, 1, 2])
    assert len(evaluations) == 1  # only the evaluation after training
    computed = run(fresh, "train", initial, [0, 1, 2])
    for e, r, c in zip(evaluated, reused, computed):
        assert (r.loss_before, r.metric_before) == (e.loss_before, e.metric_before) == (c.loss_before, c.metric_before)
        assert r.loss_after == c.loss_after
    evaluations.clear()
    run(warm, "train", moved, [0, 1, 2])
    assert len(evaluations) == 2  # new adapters: evaluated before and after
    alone = run(warm, "train", initial, [1])[0]  # the single-device executor does not reuse batched numbers
    assert alone.loss_before == pytest.approx(evaluated[1].loss_before, rel=1e-5)
