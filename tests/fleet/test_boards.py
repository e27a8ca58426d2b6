"""Dev boards in the fleet: QEMU-emulated boards on ptys ([[fleet.boards]]) train in the same Flower rounds as
simulated devices, through Ray board-proxy actors placed by the boards' custom resources. Each board's
trained adapter equals the numpy executor's for the same job and data; a killed, stalled or noisy board fails
its jobs by cause, the run goes on, and the board is back once its line is."""
from __future__ import annotations

import numpy as np
import pytest

from device_runtime import NumpyDevice
from device_runtime.jobs import run_job
from device_runtime.serial import framing as fr
from device_runtime.serial.qemu_board import QemuBoard, build_serial_firmware
from device_runtime.serial.relay import Faults, Relay
from fleet.boards import BoardPool
from fleet.data import device_data
from fleet.engine import run_scenario
from fleet.metrics import FleetMetrics
from fleet.programs import ProgramBuilder, pretrain_base
from fleet.runs import RunDir, RunError
from tests.fleet.runs_compare import scenario_with
from tests.fleet.test_metrics import samples

BOARDS = ("b0", "b1")
BASE = {
    "name": "boards", "seed": 5,
    "model": {"name": "cct-digits", "pretrain_steps": 40, "pretrain_lr": 0.05},
    "tuning": {"strategy": "lora", "rank": 2, "alpha": 4.0, "targets": ["*attn*"], "train": ["classifier.*"]},
    "training": {"rounds": 2, "fraction": 1.0, "local_steps": 2, "batch_size": 8, "lr": 0.05},
    "aggregation": {"strategy": "fedit"},
    "data": {"kind": "digits", "dirichlet_alpha": 0.5, "samples_per_device": 8, "test_samples_per_device": 8},
    "fleet": {"groups": [{"name": "sim", "count": 2, "target": "siracusa"}],
              "boards": [{"name": "b0", "qemu": True}, {"name": "b1", "qemu": True}]},
}
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def ray_boards():
    """A real local Ray whose node offers the boards' resources (what `ray start --resources` declares in a
    lab); the session's shared Ray is replaced when it lacks them."""
    import ray
    from fleet.cluster import start_local_ray
    wanted = {f"board:{name}": 1.0 for name in BOARDS}
    if ray.is_initialized() and any(ray.cluster_resources().get(k, 0) < 1 for k in wanted):
        ray.shutdown()
    if not ray.is_initialized():
        start_local_ray(2, resources=wanted)
    yield ray


@pytest.fixture
def board_jobs(monkeypatch):
    """Every (job, result, program) the board pool ran (a pass-through spy on the real dispatch)."""
    seen = []
    real = BoardPool.dispatch

    def spy(self, jobs):
        results = real(self, jobs)
        seen.extend((job, result, self.boards[job.device].program) for job, result in zip(jobs, results))
        return results

    monkeypatch.setattr(BoardPool, "dispatch", spy)
    return seen


def assert_equals_numpy_executor(job, result, program, scenario) -> None:
    """The board's answer to ``job`` against the numpy executor's for the same job and the board's data."""
    want = run_job(NumpyDevice(program), job, device_data(scenario.data, scenario.seed, job.device))
    assert want.ok and result.ok, (want.error, result.error)
    assert set(result.arrays) == set(want.arrays)
    for name, expected in want.arrays.items():
        scale = float(np.max(np.abs(expected))) or 1.0
        assert np.max(np.abs(result.arrays[name] - expected)) <= REL_TOL * scale, name
    assert result.loss == pytest.approx(want.loss, rel=REL_TOL)
    assert result.loss_after == pytest.approx(want.loss_after, rel=REL_TOL)


def records(run_dir, instruction="train"):
    return [r for r in RunDir(run_dir).metrics() if r["type"] == "device" and r["instruction"] == instruction]


def test_two_qemu_boards_train_in_the_same_rounds_as_simulated_devices(tmp_path, ray_boards, board_jobs):
    s = scenario_with(BASE)
    metrics = FleetMetrics()
    summary = run_scenario(s, tmp_path / "run", progress=False, observers=[metrics])
    assert summary["failures"] == {} and summary["rounds_completed"] == 2

    # the proxies ran on the node offering each board's resource, and found the program they were given
    nodes = {n["NodeID"] for n in ray_boards.nodes() if n["Alive"]}
    for status, name in zip(summary["boards"], BOARDS):
        assert (status["name"], status["resource"], status["error"]) == (name, f"board:{name}", "")
        assert status["node"] in nodes and status["url"].startswith("/dev/pts/") and status["opened"] == 1
        assert status["hello"]["target"] == "rv32-qemu" and status["hello"]["model"] == "cct-digits"

    # one round, one record: boards and simulated devices trained side by side in every round
    trained = records(tmp_path / "run")
    for round_ in (1, 2):
        assert sorted((r["device"], r["runtime"]) for r in trained if r["round"] == round_) == [
            (0, "numpy"), (1, "numpy"), (2, "serial"), (3, "serial")]
    for r in trained:
        t = r["telemetry"]
        if r["runtime"] == "serial":   # counted on the board, and the link measured
            assert t["measured_cycles"] > 0 and t["instructions"] > 0 and t["link_s"] > 0
            assert t["link_bytes"] > t["bytes_up"] + t["bytes_down"]   # + batches, commands, framing
            assert r["group"] in BOARDS and r["target"] == "siracusa" and t["modelled_cycles_per_step"] > 0
        else:
            assert t["measured_cycles"] == 0 and t["link_bytes"] == 0

    # each board's trained adapter is the numpy executor's for the same job and data
    board_trains = [(j, r, p) for j, r, p in board_jobs if j.instruction == "train"]
    assert sorted((j.round, j.device) for j, _, _ in board_trains) == [(1, 2), (1, 3), (2, 2), (2, 3)]
    for job, result, program in board_trains:
        assert_equals_numpy_executor(job, result, program, s)
    assert not np.allclose(board_trains[0][1].arrays["classifier.bias"], board_trains[0][0].arrays["classifier.bias"])

    # the exporter's per-board link counters are the records' sums
    got = samples(metrics.render())
    for device, name in ((2, "b0"), (3, "b1")):
        labels = tuple(sorted({"device": str(device), "group": name, "target": "siracusa",
                               "runtime": "serial"}.items()))
        mine = [r["telemetry"] for r in RunDir(tmp_path / "run").metrics()
                if r["type"] == "device" and r["device"] == device]
        assert got[("edgefleet_device_link_bytes_total", labels)] == sum(t["link_bytes"] for t in mine)
        assert got[("edgefleet_device_link_seconds_total", labels)] == pytest.approx(sum(t["link_s"] for t in mine))
        assert got[("edgefleet_device_measured_step_cycles", labels)] > 0


class LineTrouble:
    """A round observer that makes trouble on the boards' lines when a round's jobs have been sent: round 2
    stalls b0's line and kills b1's board, round 3 clears b0's line, round 4 makes it noisy."""

    def __init__(self, relay: Relay, killed: QemuBoard):
        self.relay, self.killed = relay, killed

    def jobs_sent(self, round_: int, sampled) -> None:
        if round_ == 2:
            self.relay.stall()
            self.killed.kill()
        elif round_ == 3:
            self.relay.stall(False)
        elif round_ == 4:
            self.relay.faults.bit_error_rate, self.relay.faults.drop_rate = 1e-4, 2e-5

    def begin_round(self, round_, total_rounds) -> None:
        pass

    def device_done(self, record) -> None:
        pass

    def end_round(self, log) -> None:
        if log.round == 4:
            self.relay.faults.bit_error_rate = self.relay.faults.drop_rate = 0.0


def test_killed_stalled_and_noisy_boards_fail_by_cause_and_the_run_goes_on(tmp_path, ray_boards, board_jobs):
    s = scenario_with(BASE, **{"training.rounds": 4})
    program = ProgramBuilder(s, pretrain_base(s, log=lambda _: None)).program("siracusa", 2)
    firmware = build_serial_firmware(program)
    with QemuBoard(firmware) as stalled, QemuBoard(firmware) as killed, Relay(stalled.url, seed=1) as relay:
        s = scenario_with(BASE, **{"training.rounds": 4, "fleet.boards": [
            {"name": "b0", "port": relay.url, "step_timeout_s": 5.0},
            {"name": "b1", "port": killed.url, "step_timeout_s": 5.0}]})
        summary = run_scenario(s, tmp_path / "run", progress=False, observers=[LineTrouble(relay, killed)])
        flipped = relay.to_board.bits_flipped + relay.to_host.bits_flipped
        altered = relay.to_board.altered() + relay.to_host.altered()
    assert summary["rounds_completed"] == 4

    outcome = {(r["round"], r["device"]): r["cause"] for r in records(tmp_path / "run")}
    assert [outcome[(round_, d)] for round_ in (1, 2, 3, 4) for d in (0, 1)] == [""] * 8  # simulated: untouched
    assert (outcome[(1, 2)], outcome[(1, 3)]) == ("", "")
    assert (outcome[(2, 2)], outcome[(2, 3)]) == ("timeout", "disconnected")
    assert (outcome[(3, 2)], outcome[(3, 3)]) == ("", "disconnected")     # b0 is back, b1 stays dead
    assert outcome[(4, 2)] in ("", "timeout", "error")                    # noisy: exact, or failed cleanly
    rounds = {r["round"]: r for r in RunDir(tmp_path / "run").metrics() if r["type"] == "round"}
    assert rounds[2]["failures"] == {"timeout": 2, "disconnected": 2}     # train and evaluate jobs
    assert rounds[2]["devices_trained"] == 2 and rounds[3]["devices_trained"] == 3
    b0 = next(b for b in summary["boards"] if b["name"] == "b0")
    assert b0["opened"] >= 2                                               # the proxy reconnected

    # nothing partial or corrupt was taken: every answer b0 gave is the numpy executor's for its job
    answered = [(j, r, p) for j, r, p in board_jobs if j.instruction == "train" and j.device == 2 and r.ok]
    assert {j.round for j, _, _ in answered} >= {1, 3}
    for job, result, program in answered:
        assert_equals_numpy_executor(job, result, program, s)
    assert flipped > 0 and altered
    for packet in altered:                                                 # and every altered frame was refused
        with pytest.raises(fr.FrameError):
            fr.decode_frame(packet)


def test_a_board_resource_no_node_offers_is_named(tmp_path, ray_boards):
    s = scenario_with(BASE, **{"fleet.boards": [{"name": "b9", "qemu": True}], "training.rounds": 1})
    with pytest.raises(RunError, match=r"^board 'b9': no Ray node offers the resource 'board:b9'; declare it on "
                                       r"the node the board is plugged into: ray start --resources="):
        run_scenario(s, tmp_path / "run", progress=False)


def test_a_flashed_program_of_another_layout_is_refused(tmp_path):
    s = scenario_with(BASE)
    other = ProgramBuilder(scenario_with(BASE, **{"tuning.rank": 4}), pretrain_base(s, log=lambda _: None))
    other.program("siracusa", 4).save(tmp_path / "flashed")
    s = scenario_with(BASE, **{"fleet.boards": [{"name": "b0", "port": "/dev/null",
                                                 "program": str(tmp_path / "flashed")}]})
    with pytest.raises(RunError, match=r"^fleet\.boards\[0\]\.program: .*flashed \(model 'cct-digits', hash "
                                       r"[0-9a-f]{8}\) is not the fleet's program for target 'siracusa'"):
        run_scenario(s, tmp_path / "run", progress=False, actors=0)
