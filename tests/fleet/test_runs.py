"""The run directory on its own: checksummed metrics, torn tails, the manifest, the lock, a full disk."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

from fleet.runs import RunDir, RunError, encode_record

TOML = 'name = "t"\nseed = 1\n\n[training]\nrounds = 3\nlr = 0.1\n'


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def _run(tmp_path, rounds=3) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.create(TOML)
    for r in range(rounds + 1):
        run.save_checkpoint(r, {"w": np.full((2, 3), float(r), np.float32)}, {"m_t/w": np.zeros(3)})
        if r:
            run.append_metrics([{"type": "device", "round": r, "device": 0}, {"type": "round", "round": r}])
            run.write_state({"rounds_completed": r, "finished": False})
    return run


def test_non_finite_numbers_are_null_with_a_flag_and_come_back(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create(TOML)
    record = {"type": "device", "round": 1, "loss": math.nan, "t": {"wall_s": math.inf, "levels": [1.0, -math.inf]}}
    run.append_metrics([record])
    line = (tmp_path / "run" / "metrics.jsonl").read_text()
    raw = _strict(line)
    assert raw["loss"] is None and raw["nonfinite"] == {"loss": "nan", "t.wall_s": "inf", "t.levels.1": "-inf"}
    back = run.metrics()[0]
    assert math.isnan(back["loss"]) and back["t"] == {"wall_s": math.inf, "levels": [1.0, -math.inf]}


def test_a_rounds_records_keep_their_non_finite_numbers(tmp_path):
    """fleet.records: a DeviceRecord's own float fields that are NaN (an evaluate job has no training loss)
    or infinite are plain null and read back as NaN; any other non-finite number (telemetry, the round's
    server metrics) is null with a flag and reads back as itself."""
    from device_runtime.protocol import Telemetry
    from fleet.records import read_round_logs, round_log_records
    from fleet.roundlog import DeviceRecord, RoundLog
    run = RunDir(tmp_path / "run")
    run.create(TOML)
    devices = [DeviceRecord(1, "train", 0, cause="nonfinite", loss=math.inf, telemetry=Telemetry(wall_s=math.inf)),
               DeviceRecord(1, "evaluate", 1, num_examples=8, loss_before=0.5, metric_before=0.25)]
    run.append_metrics(round_log_records(RoundLog(1, 10.0, 11.0, [0], devices, {}, {}, {"auc": math.nan})))
    train, evaluate, round_ = [_strict(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert train["loss"] is None and train["nonfinite"] == {"telemetry.wall_s": "inf"}
    assert evaluate["loss"] is evaluate["loss_after"] is evaluate["metric_after"] is None
    assert "nonfinite" not in evaluate and evaluate["loss_before"] == 0.5
    assert round_["server_metrics"] == {"auc": None} and round_["nonfinite"]["server_metrics.auc"] == "nan"
    [log] = read_round_logs(tmp_path / "run")
    back_train, back_evaluate = log.devices
    assert math.isnan(back_train.loss) and back_train.telemetry.wall_s == math.inf
    assert math.isnan(back_evaluate.loss) and back_evaluate.loss_before == 0.5
    assert math.isnan(log.server_metrics["auc"])


def test_a_torn_or_corrupt_tail_is_cut_on_resume(tmp_path):
    run = _run(tmp_path)
    path = tmp_path / "run" / "metrics.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + encode_record({"type": "device", "round": 4})[:17])  # a kill mid-append
    assert len(run.metrics()) == 6
    resumed = run.resume()
    assert resumed.rounds_completed == 3 and path.read_bytes() == whole
    assert any("metrics.jsonl: cut 17 bytes" in p for p in resumed.problems)
    lines = whole.splitlines(keepends=True)  # a flipped byte inside round 2's record: rounds 2.. are dropped
    damaged = bytearray(whole)
    damaged[len(lines[0]) + len(lines[1]) + 12] ^= 1
    path.write_bytes(bytes(damaged))
    assert [r["round"] for r in run.metrics()] == [1, 1]


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "replace", "delete"])
def test_a_bad_checkpoint_is_named_and_the_run_resumes_from_the_previous_one(tmp_path, damage):
    run = _run(tmp_path)
    path = run.checkpoint_path(3)
    if damage == "corrupt":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "replace":  # an older checkpoint copied over the newest: valid npz, wrong content
        path.write_bytes(run.checkpoint_path(1).read_bytes())
    else:
        path.unlink()
    resumed = run.resume()
    assert resumed.rounds_completed == 2
    assert resumed.arrays["w"][0, 0] == 2.0
    assert str(path) in resumed.problems[0]
    assert run.state()["rounds_completed"] == 2
    assert [r["round"] for r in run.metrics()] == [1, 1, 2, 2]  # round 3 runs again


def test_an_undecodable_checkpoint_names_its_path(tmp_path):
    run = _run(tmp_path, rounds=1)
    with pytest.raises(RunError, match=r"round-0007.npz: not in manifest.json"):
        run.load_checkpoint(7)
    path = run.checkpoint_path(1)
    path.write_bytes(b"not a zip")
    manifest = run.manifest()  # even when the manifest agrees (written by hand), decoding names the file
    import hashlib
    manifest["checkpoints"][path.name] = hashlib.sha256(b"not a zip").hexdigest()
    run._write_manifest(manifest)
    with pytest.raises(RunError, match=f"{path}: cannot decode checkpoint"):
        run.load_checkpoint(1)


def test_an_edited_scenario_is_refused_naming_the_keys(tmp_path):
    run = _run(tmp_path)
    scenario = tmp_path / "run" / "scenario.toml"
    scenario.write_text(TOML.replace("seed = 1", "seed = 2").replace("lr = 0.1", "lr = 0.2"))
    with pytest.raises(RunError, match=r"scenario.toml: changed since the run started: seed, training.lr$"):
        run.resume()
    scenario.write_text(TOML.replace("rounds = 3", "rounds = 5"))
    with pytest.raises(RunError, match=r"changed since the run started: training.rounds \(--allow-changes "
                                       r"training.rounds to accept\)"):
        run.resume()
    with pytest.raises(RunError, match="--allow-changes: seed cannot change during a run"):
        run.resume(allow_changes=["seed"])
    assert run.resume(allow_changes=["training.rounds"]).rounds_completed == 3
    assert run.resume().rounds_completed == 3  # accepted: now the recorded scenario


def test_a_changed_base_model_is_refused(tmp_path):
    run = _run(tmp_path, rounds=0)
    base = {"w": np.ones(3, np.float32)}
    run.check_base(base)
    run.check_base({"w": np.ones(3, np.float32)})
    with pytest.raises(RunError, match="manifest.json: the base model differs"):
        run.check_base({"w": np.zeros(3, np.float32)})


HOLDER = textwrap.dedent("""
    import sys
    from fleet.runs import RunDir
    RunDir(sys.argv[1]).lock()
    print("locked", flush=True)
    sys.stdin.readline()
""")


def test_two_processes_on_one_run_directory(tmp_path):
    run = _run(tmp_path)
    run.unlock()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"run: in use by process {holder.pid} \(lock file .*lock\)"):
            RunDir(tmp_path / "run").resume()
        before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
        holder.send_signal(signal.SIGKILL)  # a dead holder: its lock is taken over
        holder.wait(timeout=10)
        assert RunDir(tmp_path / "run").resume().rounds_completed == 3
        assert (tmp_path / "run" / "lock").read_text().strip() == str(os.getpid())
        assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


@contextlib.contextmanager
def small_tmpfs(size_kib: int):
    """A real full disk: a tmpfs of ``size_kib`` (needs root, as CI runs)."""
    mount = tempfile.mkdtemp(prefix="ef-full-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", mount], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", mount], check=True)
        os.rmdir(mount)


def test_a_full_disk_during_metrics_and_checkpoints_loses_nothing_written(tmp_path):
    with small_tmpfs(64) as mount:
        run = RunDir(os.path.join(mount, "run"))
        run.create(TOML)
        run.save_checkpoint(0, {"w": np.zeros(4, np.float32)}, {})
        big = {"type": "device", "round": 1, "blob": "x" * 3000}
        with pytest.raises(RunError, match=r"metrics.jsonl: cannot (append|write) \(No space left on device\)"):
            for _ in range(100):
                run.append_metrics([big] * 4)
        assert run.state()["rounds_completed"] == 0
        with pytest.raises(RunError, match=r"round-0001.npz: cannot write \(No space left on device\)"):
            run.save_checkpoint(1, {"w": np.zeros(200_000, np.float32)}, {})
        assert not run.checkpoint_path(1).exists()
        assert not [p for p in os.listdir(os.path.join(mount, "run", "checkpoints")) if ".tmp" in p]
        resumed = run.resume()  # after a crash here: round 1 runs again from checkpoint 0
        assert resumed.rounds_completed == 0 and resumed.arrays["w"].shape == (4,)
        assert run.metrics() == [] and os.path.getsize(os.path.join(mount, "run", "metrics.jsonl")) == 0


def test_metrics_written_before_checksums_are_still_read(tmp_path):
    run = RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"type": "round", "round": 1}\n{"type": "round", "round": 2}\n{"ty')
    assert [r["round"] for r in run.metrics()] == [1, 2]
