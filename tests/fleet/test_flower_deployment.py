"""The fleet as a Flower App: the ClientApp answers as the simulated fleet does, and `flwr run` trains the
adapters on a real SuperLink with two real SuperNodes (all listeners on 127.0.0.1, FLWR_HOME in tmp)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fleet.engine import HostPool, _initial_arrays, _set_task_identity, build_fleet
from fleet.flower_app import client_app, wait_for_nodes
from fleet.grid import NODE_BASE, FleetGrid, JobDefaults
from fleet.host import local_steps
from fleet.programs import ProgramBuilder, pretrain_base
from fleet.scenario import load_scenario

REPO = Path(__file__).resolve().parents[2]
CONNECTION = "edgefleet-test"
STARTUP_S = 60.0      # SuperLink and SuperNodes up and registered
RUN_S = 420.0         # `flwr run --stream` returns when the run ends
CLI_S = 30.0          # any other flwr CLI call
STOP_S = 10.0         # a process exits after SIGTERM

TINY = """\
name = "flower-tiny"
seed = 0

[model]
name = "cct-digits"
pretrain_steps = 20

[tuning]
strategy = "lora"
rank = 2
alpha = 4.0
targets = ["*attn*"]
train = ["classifier.*"]

[training]
rounds = 2
fraction = 1.0
local_steps = 2
batch_size = 8
lr = 0.05

[aggregation]
strategy = "fedit"

[data]
kind = "digits"
samples_per_device = 16
test_samples_per_device = 16

[[fleet.groups]]
name = "g"
count = 2
target = "siracusa"
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The scenario file, its fleet and initial adapters; builds the cached base model the apps load."""
    path = tmp_path_factory.mktemp("flower") / "tiny.toml"
    path.write_text(TINY)
    scenario = load_scenario(path)
    builder = ProgramBuilder(scenario, pretrain_base(scenario, log=lambda text: None))
    fleet = build_fleet(scenario, builder)
    return path, scenario, fleet, _initial_arrays(fleet)


# ---- the ClientApp in-process ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
def test_client_app_replies_as_the_fleet_grid(tiny, kind):
    path, scenario, fleet, initial = tiny
    _set_task_identity()  # what a ServerApp process has before it builds instructions
    t = scenario.training
    steps = local_steps(t.local_steps, t.local_epochs, scenario.data.samples_per_device or 32, t.batch_size)
    pool = HostPool(scenario, fleet.programs, 0, fleet.batched, fleet.runtimes)
    grid = FleetGrid(fleet.devices, pool.stream, JobDefaults(steps, t.lr, scenario.seed))
    grid.begin_round(1)
    device = 1

    def instruction(node_id: int) -> Message:
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in initial.items()}),
                              "config": ConfigRecord({"server-round": 1})})
        message = Message(content, node_id, kind, group_id="1")
        message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as a Grid does on push
        return message

    [expected] = grid.send_and_receive([instruction(NODE_BASE + device)])
    context = Context(run_id=1, node_id=7, node_config={"partition-id": device, "num-partitions": 2},
                      state=RecordDict(), run_config={"scenario": str(path), "out": "", "min-nodes": 0})
    got = client_app(instruction(7), context)

    assert not expected.has_error() and not got.has_error()
    assert set(got.content.array_records) == set(expected.content.array_records)
    for name, record in expected.content.array_records.items():
        assert set(got.content[name]) == set(record)
        for key, array in record.items():
            np.testing.assert_allclose(got.content[name][key].numpy(), array.numpy(), rtol=1e-6, atol=1e-7)
    want, have = dict(expected.content["metrics"]), dict(got.content["metrics"])
    assert set(have) == set(want)
    assert have["device"] == device
    for key, value in want.items():
        if key != "wall-s":  # the one number that depends on the wall clock
            assert have[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    if kind == MessageType.TRAIN:
        assert any(not np.allclose(got.content["arrays"][k].numpy(), v) for k, v in initial.items())


def test_wait_for_nodes_has_a_deadline():
    class Nodes:
        def __init__(self, counts):
            self.counts = iter(counts)

        def get_node_ids(self):
            return list(range(next(self.counts)))

    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    assert wait_for_nodes(Nodes([0, 1, 2]), 2, timeout_s=10, clock=lambda: now[0], sleep=sleep) == [0, 1]
    with pytest.raises(TimeoutError, match="1 of 2 SuperNodes connected after 3 s"):
        wait_for_nodes(Nodes([1] * 100), 2, timeout_s=3, clock=lambda: now[0], sleep=sleep)


# ---- a real deployment ----------------------------------------------------------------------------------

def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively (Linux /proc): the SuperExec and app processes Flower starts."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _stop(processes: list[subprocess.Popen]) -> None:
    pids = [pid for p in processes if p.poll() is None for pid in _descendants(p.pid)]
    for p in processes:
        if p.poll() is None:
            p.terminate()
    for pid in pids:
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
    for p in processes:
        try:
            p.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=STOP_S)
    deadline = time.monotonic() + STOP_S
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def _flwr(*args: str, env: dict[str, str], timeout_s: float = CLI_S) -> subprocess.CompletedProcess:
    return subprocess.run(["flwr", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)


def _online_nodes(env: dict[str, str]) -> int:
    result = _flwr("supernode", "ls", CONNECTION, "--format", "json", env=env)
    if result.returncode != 0:
        return 0
    nodes = json.loads(result.stdout).get("nodes", [])
    return sum(node.get("status") == "online" for node in nodes)


@pytest.mark.skipif(shutil.which("flower-superlink") is None or not Path("/proc").is_dir(),
                    reason="needs the Flower CLI and Linux /proc")
def test_flwr_run_on_superlink_with_two_supernodes(tiny, tmp_path):
    path, scenario, fleet, initial = tiny
    link_port, *node_ports = _free_ports(3)
    env = _flower_env(tmp_path, link_port)
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("superlink", "node0", "node1")}
    commands = {
        "superlink": ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
                      "--database", str(tmp_path / "state.db"), "--disable-runtime-dependency-installation"],
        **{f"node{i}": ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                        "--host", "127.0.0.1", "--port", str(port),
                        "--node-config", f"partition-id={i} num-partitions=2"]
           for i, port in enumerate(node_ports)},
    }
    out = tmp_path / "final.npz"
    run_dir = tmp_path / "run"
    processes: list[subprocess.Popen] = []
    start = time.monotonic()
    try:
        for name, command in commands.items():
            processes.append(subprocess.Popen(command, env=env, cwd=tmp_path, stdout=logs[name],
                                              stderr=subprocess.STDOUT))
        deadline = time.monotonic() + STARTUP_S
        while _online_nodes(env) < 2:
            assert all(p.poll() is None for p in processes), _tails(tmp_path)
            assert time.monotonic() < deadline, f"SuperNodes not online after {STARTUP_S:.0f} s\n{_tails(tmp_path)}"
            time.sleep(0.5)
        started = time.monotonic()
        run = _flwr("run", str(REPO), CONNECTION, "--stream", "--run-config",
                    f"scenario='{path}' out='{out}' min-nodes=2 num-server-rounds=2 run-dir='{run_dir}'",
                    env=env, timeout_s=RUN_S)
        assert run.returncode == 0, run.stdout + run.stderr + _tails(tmp_path)
        runs = json.loads(_flwr("ls", CONNECTION, "--format", "json", env=env).stdout)["runs"]
        timings = f"startup {started - start:.1f} s, run {time.monotonic() - started:.1f} s"
    finally:
        _stop(processes)
        for log in logs.values():
            log.close()
    assert [r["status"] for r in runs] == ["finished:completed"], (runs, run.stdout[-3000:])
    assert "[ROUND 2/2]" in run.stdout and "Received 2 results and 0 failures" in run.stdout, run.stdout[-3000:]
    with np.load(out) as npz:
        final = {k: npz[k] for k in npz.files}
    assert set(final) == set(initial)
    assert all(final[k].shape == initial[k].shape for k in initial)
    assert any(not np.allclose(final[k], initial[k]) for k in initial), "the adapters did not change"
    # the ServerApp wrote the same run directory as `edgefleet run`: round records with device indices
    from fleet.runs import RunDir
    records = RunDir(run_dir).metrics()
    assert [r["round"] for r in records if r["type"] == "round"] == [1, 2]
    trained = [r for r in records if r["type"] == "device" and r["instruction"] == "train"]
    assert sorted(r["device"] for r in trained) == [0, 0, 1, 1] and all(r["group"] == "g" for r in trained)
    assert RunDir(run_dir).state() == {"rounds_completed": 2, "finished": True}
    print(timings, file=sys.stderr)


@pytest.mark.skipif(shutil.which("flower-superlink") is None or not Path("/proc").is_dir(),
                    reason="needs the Flower CLI and Linux /proc")
def test_flwr_run_in_flowers_own_simulation(tiny, tmp_path):
    """What `flwr run .` does with its `local` connection: a SuperLink in simulation mode runs the virtual
    SuperNodes' ClientApps on Flower's Ray backend. Here on free loopback ports and with the environment as it
    is (the managed local SuperLink would first `uv sync` the app's dependencies into a new environment)."""
    path, scenario, fleet, initial = tiny
    [link_port] = _free_ports(1)
    env = _flower_env(tmp_path, link_port)
    log = open(tmp_path / "superlink.log", "w")
    superlink = subprocess.Popen(
        ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess", "--host", "127.0.0.1",
         "--port", str(link_port), "--database", str(tmp_path / "state.db"), "--disable-runtime-dependency-installation"],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    run_dir = tmp_path / "run"
    try:
        deadline = time.monotonic() + STARTUP_S
        while not _healthy(link_port):
            assert superlink.poll() is None, _tails(tmp_path)
            assert time.monotonic() < deadline, f"SuperLink not up after {STARTUP_S:.0f} s\n{_tails(tmp_path)}"
            time.sleep(0.5)
        run = _flwr("run", str(REPO), CONNECTION, "--stream", "--federation-config", "num-supernodes=2",
                    "--run-config", f"scenario='{path}' num-server-rounds=2 run-dir='{run_dir}'",
                    env=env, timeout_s=RUN_S)
        assert run.returncode == 0, run.stdout + run.stderr + _tails(tmp_path)
    finally:
        _stop([superlink])
        log.close()
    assert "[ROUND 2/2]" in run.stdout and "Received 2 results and 0 failures" in run.stdout, run.stdout[-3000:]
    from fleet.runs import RunDir
    records = RunDir(run_dir).metrics()
    trained = [r for r in records if r["type"] == "device" and r["instruction"] == "train"]
    assert sorted(r["device"] for r in trained) == [0, 0, 1, 1]
    assert RunDir(run_dir).state() == {"rounds_completed": 2, "finished": True}


def _healthy(port: int) -> bool:
    """The SuperLink's HTTP API answers (what `flwr` itself probes)."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _flower_env(tmp_path: Path, link_port: int) -> dict[str, str]:
    """FLWR_HOME in tmp with one connection to the SuperLink on ``link_port`` (Flower 1.41 serves its Fleet,
    Control and Runtime APIs on that one port)."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}


def _tails(directory: Path, lines: int = 30) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
                     for p in sorted(directory.glob("*.log")))
