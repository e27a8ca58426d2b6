"""The fleet as a Flower App, for ``flwr run`` against a SuperLink with real SuperNodes.

``client_app``: one SuperNode is one device. Its index is ``node_config["partition-id"]``; the scenario is
``run_config["scenario"]`` (a TOML path, relative to the working directory or to this app's directory). Each
process compiles the device's program once (the cached base model, then ``ProgramBuilder``) and runs jobs on
a ``DeviceHostCore`` — the code the simulation's host actors run — and builds the reply with
``fleet.messages``, as ``FleetGrid`` does. Adapters a node receives at a higher LoRA rank than its program's
are cut to that rank (what FlexLoRA/HetLoRA send a node whose rank they have not yet seen).

``server_app``: the scenario's strategy and initial adapters, exactly as ``edgefleet run`` builds them,
driven by Flower's own Grid for ``training.rounds`` rounds; the final adapters go to ``run_config["out"]``
(an .npz) when it is set. ``run_config["min-nodes"]`` makes it wait (at most ``NODE_WAIT_S``) until that
many SuperNodes are connected before the first round.

What only a simulation can do stays in ``FleetGrid``: availability, drop-outs, stragglers, injected faults.
See docs/flower.md for the commands.
"""
from __future__ import annotations

import dataclasses
import io
import os
import time
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from device_runtime.protocol import LOCAL_STEPS_KEY, LR_KEY, decode_results, encode_jobs
from fleet.arrays import to_record
from fleet.engine import RunRecorder, _initial_arrays, build_fleet, clock_hz, group_program, make_fleet_strategy
from fleet.host import DeviceHostCore, local_steps
from fleet.messages import instruction, instruction_arrays, job_from_message, modelled_seconds, reply_from_result
from fleet.programs import ProgramBuilder, cycles_per_step, pretrain_base
from fleet.rounds import NodeMap, RoundDriver
from fleet.runs import RunDir
from fleet.scenario import DeviceGroup, Scenario, load_scenario
from fleet.strategies import truncate_state

APP_DIR = Path(__file__).resolve().parents[1]  # the repository root, or the installed FAB's directory
PARTITION_ID_KEY = "partition-id"
SCENARIO_KEY, OUT_KEY, MIN_NODES_KEY, ROUNDS_KEY, RUN_DIR_KEY = ("scenario", "out", "min-nodes", "num-server-rounds",
                                                                 "run-dir")
NODE_WAIT_S = 120.0
NODE_POLL_S = 0.5


def scenario_path(run_config: Mapping[str, Any]) -> Path:
    """``run_config["scenario"]``: absolute, or relative to the working directory, else to the app."""
    raw = Path(str(run_config.get(SCENARIO_KEY, "")))
    for path in (raw,) if raw.is_absolute() else (Path.cwd() / raw, APP_DIR / raw):
        if path.is_file():
            return path
    raise FileNotFoundError(f"run config scenario={str(raw)!r}: no such file in {Path.cwd()} or {APP_DIR}")


# ---- ClientApp: one device per SuperNode -----------------------------------------------------------------

@dataclass(frozen=True)
class NodeDevice:
    group: DeviceGroup
    key: str                     # program key, as in the simulation (target and LoRA rank)
    rank: int | None
    cycles_per_step: int
    clock_hz: float


@dataclass
class LoadedScenario:
    """A scenario's compiled programs and the host that runs its devices, kept for the life of a process."""
    scenario: Scenario
    builder: ProgramBuilder
    host: DeviceHostCore
    steps: int
    kinds: dict[str, NodeDevice] = field(default_factory=dict)  # group name → its device kind

    def device(self, index: int) -> NodeDevice:
        for group, indices in self.scenario.fleet.group_ranges():
            if index in indices:
                return self.kinds.get(group.name) or self._compile(group)
        for board, board_index in self.scenario.fleet.board_indices():
            if index == board_index:
                raise ValueError(f"{PARTITION_ID_KEY}={index}: device {index} is the board {board.name!r}; boards "
                                 f"join runs of edgefleet run (board proxies), not a Flower deployment's SuperNodes")
        raise ValueError(f"{PARTITION_ID_KEY}={index}: scenario {self.scenario.name!r} has "
                         f"{self.scenario.device_count} devices (0..{self.scenario.device_count - 1})")

    def _compile(self, group: DeviceGroup) -> NodeDevice:
        key, rank, program = group_program(self.builder, group)
        self.host.install(key, *program.to_bytes(), batched=False, runtime=group.runtime)
        kind = NodeDevice(group, key, rank, cycles_per_step(program), clock_hz(group, program))
        self.kinds[group.name] = kind
        return kind


_LOADED: dict[Path, LoadedScenario] = {}


def load(path: Path) -> LoadedScenario:
    path = path.resolve()
    if path not in _LOADED:
        scenario = load_scenario(path)
        builder = ProgramBuilder(scenario, pretrain_base(scenario, log=lambda text: log(INFO, text)))
        data_spec = {k: getattr(scenario.data, k) for k in scenario.data.__dataclass_fields__}
        t = scenario.training
        steps = local_steps(t.local_steps, t.local_epochs, scenario.data.samples_per_device or 32, t.batch_size)
        _LOADED[path] = LoadedScenario(scenario, builder, DeviceHostCore(data_spec, scenario.seed), steps)
    return _LOADED[path]


def run_device(message: Message, context: Context) -> Message:
    """Run the instruction on this node's device; the reply is what ``FleetGrid`` would give for it."""
    loaded = load(scenario_path(context.run_config))
    index = int(context.node_config[PARTITION_ID_KEY])
    device = loaded.device(index)
    arrays = instruction_arrays(message)
    down_bytes = sum(a.nbytes for a in arrays.values())
    if device.rank:
        arrays = truncate_state(arrays, device.rank)
    job = job_from_message(message, index, arrays, steps=loaded.steps, lr=float(loaded.scenario.training.lr),
                           seed=loaded.scenario.seed, evaluate_after=loaded.scenario.training.evaluate_after)
    modelled_s = modelled_seconds(instruction(message), cycles_per_step=device.cycles_per_step, steps=job.steps,
                                  clock_hz=device.clock_hz, link_bps=device.group.link_kbps * 1e3,
                                  down_bytes=down_bytes)
    (result,) = decode_results(loaded.host.run(device.key, encode_jobs([job])))
    if result.ok:
        compute_s = device.cycles_per_step * job.steps / device.clock_hz if job.trains else 0.0
        result = result.with_telemetry(modelled_s=compute_s, link_s=max(0.0, modelled_s - compute_s))
    return reply_from_result(message, result)


client_app = ClientApp()


@client_app.train()
def train(message: Message, context: Context) -> Message:
    return run_device(message, context)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return run_device(message, context)


# ---- ServerApp: the scenario's strategy over Flower's Grid -----------------------------------------------

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    scenario = load_scenario(scenario_path(context.run_config))
    builder = ProgramBuilder(scenario, pretrain_base(scenario, log=lambda text: log(INFO, text)))
    fleet = build_fleet(scenario, builder)
    # a deployment's node ids are the SuperNodes' own: mixed-rank strategies learn each rank from its replies
    strategy = make_fleet_strategy(scenario, dataclasses.replace(fleet, ranks={}))
    initial = _initial_arrays(fleet)
    rounds = int(context.run_config.get(ROUNDS_KEY, 0) or scenario.training.rounds)
    scenario = scenario.with_overrides(rounds=rounds)
    run = RunDir(_run_dir(context.run_config, scenario))
    run.create(scenario.to_toml())
    run.save_checkpoint(0, initial, {})
    run.log(f"started scenario {scenario.name!r} under flwr run: {rounds} rounds")
    wait_for_nodes(grid, int(context.run_config.get(MIN_NODES_KEY, 0)))
    log(INFO, "edgefleet: scenario %r, %s, %d rounds, run directory %s", scenario.name,
        scenario.aggregation.strategy, rounds, run.path)
    t = scenario.training
    steps = local_steps(t.local_steps, t.local_epochs, scenario.data.samples_per_device or 32, t.batch_size)
    by_index = {d.index: d for d in fleet.devices}
    recorder = RunRecorder(run)
    driver = RoundDriver(strategy, grid, NodeMap(lambda i: by_index[i].facts() if i in by_index else {}),
                         seed=scenario.seed, observers=[recorder, FlowerLog()], checkpoint=recorder,
                         train_config={LR_KEY: float(t.lr), LOCAL_STEPS_KEY: int(steps)})
    try:
        final = driver.run(to_record(initial), 1, rounds)
    finally:
        recorder.close()
    run.write_state({"rounds_completed": rounds, "finished": True})
    run.log(f"finished: {rounds} rounds")
    out = str(context.run_config.get(OUT_KEY, ""))
    if out:
        save_npz(Path(out), {k: v.numpy() for k, v in final.items()})
        log(INFO, "edgefleet: final adapters written to %s", out)


class FlowerLog:
    """Round lines in the ServerApp's log, as Flower's own ``Strategy.start()`` writes them."""

    def begin_round(self, round_: int, total_rounds: int) -> None:
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", round_, total_rounds)

    def device_done(self, record) -> None:
        pass

    def end_round(self, round_log) -> None:
        s = round_log.summary()
        log(INFO, "edgefleet: round %d: %d trained, train loss %.4f, global metric %.3f, failures %s",
            s["round"], s["devices_trained"], s["train_loss"], s["global_metric"], s["failures"] or 0)


def _run_dir(run_config: Mapping[str, Any], scenario: Scenario) -> str:
    """``run_config["run-dir"]``, else the scenario's run_dir with ``-flower`` (a new ``-N`` when taken)."""
    from fleet.run_cli import _free_dir
    given = str(run_config.get(RUN_DIR_KEY, ""))
    return given or _free_dir(scenario.run_dir + "-flower")


def wait_for_nodes(grid: Grid, count: int, timeout_s: float = NODE_WAIT_S, clock=time.monotonic,
                   sleep=time.sleep) -> list[int]:
    """The connected node ids once there are at least ``count``; raises after ``timeout_s``."""
    deadline = clock() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < count:
        if clock() >= deadline:
            raise TimeoutError(f"{len(nodes)} of {count} SuperNodes connected after {timeout_s:.0f} s")
        sleep(NODE_POLL_S)
    return nodes


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
