"""The fault matrix, end to end through `python -m fleet.cli run` in subprocesses: kill -9 of the orchestrator
at seeded random points then --resume ends bit-identical to an uninterrupted run; a killed host actor; an
edited scenario; two processes on one run directory; a corrupted, truncated, replaced or deleted last
checkpoint; a full disk (a real tmpfs) during the metrics append and during a checkpoint, in the engine
itself. (The run directory's own cases are in test_runs.py; hostile devices in test_hostile.py; limits in
test_limits.py; listeners in test_cluster.py.)"""
from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fleet.cluster import descendants
from tests.fleet.runs_compare import comparable
from fleet.runs import RunDir

SCENARIO = """
name = "faults"
seed = 5

[model]
name = "cct-digits"
pretrain_steps = 20

[tuning]
strategy = "lora"
rank = 2
targets = ["*attn*"]
train = ["classifier.*"]

[training]
rounds = 4
fraction = 0.5
local_steps = 2
batch_size = 8
lr = 0.05

[aggregation]
strategy = "fedavgm"

[data]
kind = "digits"
samples_per_device = 16
test_samples_per_device = 16

[[fleet.groups]]
name = "g"
count = 10
"""
TIMEOUT_S = 300


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.getcwd(), "FLWR_TELEMETRY_ENABLED": "0"}


def _cli(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fleet.cli", "run", *args, "--quiet"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, err


def _same_run(a: Path, b: Path, rounds: int = 4) -> None:
    ra, rb = RunDir(a), RunDir(b)
    assert ra.state() == rb.state() == {"rounds_completed": rounds, "finished": True}
    for r in range(rounds + 1):
        xa, sa = ra.load_checkpoint(r)
        xb, sb = rb.load_checkpoint(r)
        assert xa.keys() == xb.keys() and sa.keys() == sb.keys()
        for key in xa:
            np.testing.assert_array_equal(xa[key], xb[key], err_msg=f"round {r} {key}")
        for key in sa:
            np.testing.assert_array_equal(sa[key], sb[key], err_msg=f"round {r} strategy {key}")
    assert comparable(ra.metrics()) == comparable(rb.metrics())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    (root / "scenario.toml").write_text(SCENARIO)
    start = time.perf_counter()
    code, err = _finish(_cli(str(root / "scenario.toml"), "--run-dir", str(root / "full"), "--actors", "0"))
    assert code == 0, err
    return root, time.perf_counter() - start


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_kill_9_at_random_points_then_resume_is_bit_identical(uninterrupted):
    """The first kill falls in the rounds (checkpoint 0 to the end, as long as the uninterrupted run took over
    them); each later one anywhere in a resumed run. A run that ends before its first kill (a faster machine
    than the uninterrupted run's) starts over in a new directory with a four times shorter bound."""
    root, full_s = uninterrupted
    full = root / "full"
    rounds_s = (full / "state.json").stat().st_mtime - (full / "checkpoints" / "round-0000.npz").stat().st_mtime
    rng = random.Random(9)
    kills = 0
    for start in range(4):
        run_dir = root / f"killed-{start}"
        proc = _cli(str(root / "scenario.toml"), "--run-dir", str(run_dir), "--actors", "0")
        _wait_for(run_dir / "checkpoints" / "round-0000.npz", proc)
        bound_s = rounds_s / 4 ** start
        for attempt in range(3):
            time.sleep(rng.uniform(0.0, bound_s))
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            if RunDir(run_dir).state().get("finished"):  # killed while shutting down, its work all written
                proc = None
                break
            proc = _cli("--resume", str(run_dir), "--actors", "0")
            bound_s = full_s  # a resumed run: its start-up, its rounds or past its end
        if proc is not None:
            code, err = _finish(proc)
            assert code == 0, err
        if kills:
            break
    assert kills >= 1
    _same_run(full, run_dir)


def test_a_killed_host_actor_stops_with_one_line_then_resumes_identical(uninterrupted):
    root, _ = uninterrupted
    run_dir = root / "actor"
    proc = _cli(str(root / "scenario.toml"), "--run-dir", str(run_dir), "--actors", "1")
    _wait_for(run_dir / "checkpoints" / "round-0000.npz", proc)  # written once the host actors are up
    proc.send_signal(signal.SIGSTOP)  # hold the orchestrator so a fast run cannot finish before the kill
    try:
        hosts = [p for p in descendants(proc.pid) if b"DeviceHost" in _cmdline(p)]
        assert hosts, "no host actor process found"
        os.kill(hosts[0], signal.SIGKILL)
    finally:
        proc.send_signal(signal.SIGCONT)
    code, err = _finish(proc)
    if code != 0:  # stopped: one line naming the cause
        lines = [ln for ln in err.splitlines() if ln.startswith("edgefleet: error:")]
        assert len(lines) == 1 and ("actor" in lines[0].lower() or "died" in lines[0].lower()), err
        code, err = _finish(_cli("--resume", str(run_dir), "--actors", "1"))
        assert code == 0, err
    _same_run(root / "full", run_dir)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_an_edited_scenario_is_refused_and_two_processes_cannot_share_a_run(uninterrupted):
    root, _ = uninterrupted
    run_dir = root / "edited"
    first = _cli(str(root / "scenario.toml"), "--run-dir", str(run_dir), "--actors", "0")
    _wait_for(run_dir / "checkpoints" / "round-0000.npz", first)
    first.send_signal(signal.SIGSTOP)  # alive, holding the run, but not finishing while we look
    second = _cli("--resume", str(run_dir), "--actors", "0")
    code, err = _finish(second)
    assert code == 2 and f"in use by process {first.pid}" in err, err
    first.send_signal(signal.SIGKILL)
    first.wait()
    scenario = run_dir / "scenario.toml"
    scenario.write_text(scenario.read_text().replace("seed = 5", "seed = 6"))
    code, err = _finish(_cli("--resume", str(run_dir), "--actors", "0"))
    assert code == 2 and err.strip().endswith("changed since the run started: seed"), err


def test_a_fleet_beyond_memory_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "scenario.toml").write_text(SCENARIO)
    proc = _cli(str(tmp_path / "scenario.toml"), "--run-dir", str(tmp_path / "run"), "--devices", "100000000")
    code, err = _finish(proc)
    lines = [ln for ln in err.splitlines() if ln.startswith("edgefleet:")]
    assert code == 2 and len(lines) == 1, err
    assert "100,000,000 devices need about" in lines[0] and "devices fit" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["corrupted", "truncated", "replaced", "deleted"])
def test_a_damaged_last_checkpoint_is_named_and_its_round_runs_again(uninterrupted, damage):
    root, _ = uninterrupted
    run_dir = root / f"damaged-{damage}"
    shutil.copytree(root / "full", run_dir)
    last = run_dir / "checkpoints" / "round-0004.npz"
    if damage == "corrupted":
        data = bytearray(last.read_bytes())
        data[len(data) // 2] ^= 0xFF
        last.write_bytes(bytes(data))
    elif damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "replaced":  # by an older checkpoint of the same run: a valid file, the wrong content
        shutil.copyfile(run_dir / "checkpoints" / "round-0002.npz", last)
    else:
        last.unlink()
    proc = _cli("--resume", str(run_dir), "--actors", "0")
    code, err = _finish(proc)
    assert code == 0, err
    if damage != "deleted":
        assert "round-0004.npz" in err, err  # the damaged file is named before the run falls back
    _same_run(root / "full", run_dir)


def _fill(path: Path) -> None:
    """Write ``path`` until the file system is full (then it holds every free byte)."""
    with open(path, "ab", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error


class _FillDiskAt:
    """An observer of the round driver that fills the disk at one moment of round 2: before it (so the round's
    metrics append fails) or after its metrics (so its checkpoint fails)."""

    def __init__(self, moment: str, filler: Path):
        self.moment, self.filler = moment, filler

    def begin_round(self, round_: int, total_rounds: int) -> None:
        if self.moment == "metrics" and round_ == 2:
            _fill(self.filler)

    def device_done(self, record) -> None:
        pass

    def end_round(self, log) -> None:
        if self.moment == "checkpoint" and log.round == 2:
            _fill(self.filler)


@pytest.mark.parametrize("moment,named", [("metrics", "metrics.jsonl"), ("checkpoint", "round-0002.npz")])
def test_a_full_disk_stops_the_run_with_one_line_and_resume_is_identical(uninterrupted, moment, named):
    from fleet.engine import run_scenario
    from fleet.runs import RunError
    from fleet.scenario import load_scenario
    from tests.fleet.test_runs import small_tmpfs
    root, _ = uninterrupted
    with small_tmpfs(4096) as mount:
        run_dir, filler = Path(mount) / "run", Path(mount) / "filler"
        with pytest.raises(RunError) as error:
            run_scenario(load_scenario(root / "scenario.toml"), run_dir, progress=False, actors=0,
                         observers=[_FillDiskAt(moment, filler)])
        message = str(error.value)
        assert "No space left on device" in message and named in message and "\n" not in message, message
        assert RunDir(run_dir).state()["rounds_completed"] == 1
        filler.unlink()  # space freed, as whoever fills a disk eventually does
        run_scenario(None, run_dir, resume=True, progress=False, actors=0)
        _same_run(root / "full", run_dir)
