"""`edgefleet run`: a scenario end to end.

    scenario → base model (pretrained, cached) → programs per device kind → Ray host actors
             → Flower strategy.start() over a FleetGrid → per-round metrics + checkpoint → personalization
             → summary.json
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
import tomllib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from device_runtime.protocol import (LOCAL_STEPS_KEY, LR_KEY, Job, JobResult, decode_results, encode_jobs,
                                     make_job)
from fleet.arrays import from_record, to_record
from fleet.boards import RUNTIME as BOARD_RUNTIME, Board, BoardPool, Dispatcher, board_group, plan_boards
from fleet.cluster import start_ray
from fleet.grid import NODE_BASE, DeviceInfo, FleetGrid, JobDefaults
from fleet.host import DeviceHost, DeviceHostCore, local_steps
from fleet.programs import DEFAULT_CLOCK_MHZ, ProgramBuilder, cycles_per_step, pretrain_base
from fleet.progress import RunProgress
from fleet.records import round_log_records
from fleet.roundlog import DeviceRecord, RoundLog, mean, merge_counts
from fleet.rounds import RoundDriver, restore_strategy_state, strategy_state
from fleet.runs import RunDir, RunError
from fleet.scenario import AVAILABLE_RUNTIMES, DeviceGroup, Dropout, Periodic, Scenario, load_scenario, parse_scenario



@dataclass
class Fleet:
    """Everything the run needs besides the strategy: programs by key, devices, dispatch."""
    programs: dict[str, Any]
    devices: list[DeviceInfo]
    batched: dict[str, Any] = field(default_factory=dict)  # key → device-axis program
    ranks: dict[int, int] = field(default_factory=dict)    # node id → LoRA rank
    runtimes: dict[str, str] = field(default_factory=dict)  # key → device runtime
    boards: list[Board] = field(default_factory=list)      # [[fleet.boards]], run by board proxies

    def hosted_programs(self) -> dict[str, Any]:
        """The programs the host pool runs (boards' programs run on the boards)."""
        return {k: p for k, p in self.programs.items() if self.runtimes.get(k) != BOARD_RUNTIME}


class HostPool:
    """A bounded pool of device hosts (Ray actors, or in-process for ``actors=0``)."""

    def __init__(self, scenario: Scenario, programs: Mapping[str, Any], actors: int,
                 batched: Mapping[str, Any] | None = None, runtimes: Mapping[str, str] | None = None):
        self.scenario = scenario
        self.per_call = scenario.ray.devices_per_call
        self._first_actor: dict[str, int] = {}
        data_spec = _dataclass_dict(scenario.data)
        runtimes = dict(runtimes or {})
        payloads = [(k, False, runtimes.get(k, "numpy"), *p.to_bytes()) for k, p in programs.items()]
        payloads += [(k, True, "numpy", *p.to_bytes()) for k, p in (batched or {}).items()]
        if actors <= 0:
            self.local = DeviceHostCore(data_spec, scenario.seed)
            self.actors = []
            self.nodes = ["local"]
            for key, is_batched, runtime, manifest, params in payloads:
                self.local.install(key, manifest, params, is_batched, runtime)
            return
        import ray
        self.local = None
        self.actors = [DeviceHost.remote(data_spec, scenario.seed) for _ in range(actors)]
        refs = [(k, b, r, ray.put(m), ray.put(p)) for k, b, r, m, p in payloads]
        ray.get([a.install.remote(k, m, p, b, r) for a in self.actors for k, b, r, m, p in refs])
        self.nodes = ray.get([a.node.remote() for a in self.actors])

    def dispatch(self, key: str, jobs: Sequence[Job]) -> list[JobResult]:
        """Run jobs on program ``key``; their results, in order."""
        results: list[JobResult] = []
        for offset, chunk in sorted(self.stream(key, jobs), key=lambda item: item[0]):
            results += chunk
        return results

    def stream(self, key: str, jobs: Sequence[Job]) -> Iterator[tuple[int, list[JobResult]]]:
        """Run jobs on program ``key`` in chunks of ``devices_per_call``, spread over the actors (submitted
        now); the returned iterator gives (the chunk's offset in ``jobs``, its results) as each chunk completes,
        so the caller handles one chunk's results while the hosts compute the others."""
        offsets = range(0, len(jobs), self.per_call)
        if self.local is not None:
            return ((offset, decode_results(self.local.run(key, encode_jobs(jobs[offset:offset + self.per_call]))))
                    for offset in offsets)
        actors = self.actors
        first = self._first_actor.setdefault(key, len(self._first_actor))  # programs start on different actors;
        pending = {actors[(first + i) % len(actors)].run.remote(  # a device's chunk stays on one actor (its data)
            key, encode_jobs(jobs[offset:offset + self.per_call])): offset for i, offset in enumerate(offsets)}
        return _as_completed(pending)


def _as_completed(pending: dict[Any, int]) -> Iterator[tuple[int, list[JobResult]]]:
    import ray
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(ref), decode_results(ray.get(ref))


def _dataclass_dict(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}


def build_fleet(scenario: Scenario, builder: ProgramBuilder) -> Fleet:
    programs: dict[str, Any] = {}
    batched_programs: dict[str, Any] = {}
    devices: list[DeviceInfo] = []
    ranks: dict[int, int] = {}
    runtimes: dict[str, str] = {}
    rng = np.random.default_rng([scenario.seed, 7])
    for group, indices in scenario.fleet.group_ranges():
        key, rank, program = group_program(builder, group)
        programs[key] = program
        runtimes[key] = group.runtime
        if key not in batched_programs and group.runtime == "numpy":
            chunk = min(scenario.ray.devices_per_call, group.count)
            batched_programs[key] = builder.batched(group.target, rank, chunk, builder.sparse_for(group))
        availability = group.availability
        for index in indices:
            periodic = None
            if isinstance(availability, Periodic):
                cycle = availability.on_rounds + availability.off_rounds
                phase = int(rng.integers(cycle)) if availability.phase == "random" else int(availability.phase)
                periodic = (availability.on_rounds, availability.off_rounds, phase)
            fault = getattr(group, "faults", None)
            devices.append(DeviceInfo(
                index=index, group=group.name, program=key, clock_hz=clock_hz(group, program),
                link_bps=group.link_kbps * 1e3, deadline_s=group.deadline_s,
                cycles_per_step=cycles_per_step(program), peak_bytes_by_level=peak_memory(program),
                dropout_p=availability.p if isinstance(availability, Dropout) else 0.0, periodic=periodic,
                fault=fault.kind if fault else "", fault_p=fault.p if fault else 0.0, target=group.target,
                runtime=group.runtime, budget_bytes=(group.memory_kib or 0) * 1024))
            if rank:
                ranks[NODE_BASE + index] = rank
    boards = plan_boards(scenario, builder)
    for board in boards:  # numbered after the groups; their own program key, run by board proxies
        programs[board.key], runtimes[board.key] = board.program, BOARD_RUNTIME
        devices.append(DeviceInfo(
            index=board.index, group=board.spec.name, program=board.key,
            clock_hz=clock_hz(board_group(board.spec), board.program), link_bps=float(board.spec.baud),
            deadline_s=None, cycles_per_step=cycles_per_step(board.program),
            peak_bytes_by_level=peak_memory(board.program), target=board.spec.target, runtime=BOARD_RUNTIME))
        if board.rank:
            ranks[NODE_BASE + board.index] = board.rank
    return Fleet(programs, devices, {k: v for k, v in batched_programs.items() if v is not None}, ranks, runtimes,
                 boards)


def peak_memory(program: Any) -> tuple[tuple[str, int], ...]:
    """Bytes resident per memory level on the target (or the total, for an unlowered program)."""
    levels = program.report.get("memory_by_level")
    if levels:
        return tuple((k, int(v)) for k, v in levels.items())
    return (("total", int(program.report["memory"]["total_bytes"])),)


def group_program(builder: ProgramBuilder, group: DeviceGroup) -> tuple[str, int | None, Any]:
    """A group's program, its key (target and LoRA rank) and its rank."""
    rank, sparse = builder.rank_for(group), builder.sparse_for(group)
    if group.runtime not in AVAILABLE_RUNTIMES:
        raise RunError(f"fleet group {group.name!r}: runtime {group.runtime!r} is not available in fleet runs yet "
                       f"(available: {', '.join(AVAILABLE_RUNTIMES)})")
    key = f"{group.target}-r{rank}" if rank else group.target
    if sparse is not None:
        key += f"-sparse{group.memory_kib}k"
    if group.runtime != "numpy":
        key += f"-{group.runtime}"
    return key, rank, builder.program(group.target, rank, sparse=sparse)


def clock_hz(group: DeviceGroup, program: Any) -> float:
    """The devices' clock: the group's, else the target's, else a default."""
    return (group.clock_mhz or program.target.get("clock_mhz") or DEFAULT_CLOCK_MHZ) * 1e6


def make_fleet_strategy(scenario: Scenario, fleet: Fleet):
    """The scenario's [aggregation] strategy (any Flower strategy by name, DP clipping, a norm bound),
    guarded; mixed-rank strategies get each node's rank."""
    from fleet.strategies import strategy_from_spec
    return strategy_from_spec(scenario.aggregation, fraction=scenario.training.fraction,
                              devices=scenario.device_count, node_ranks=dict(fleet.ranks))


def scenario_steps(scenario: Scenario) -> int:
    t = scenario.training
    return local_steps(t.local_steps, t.local_epochs, scenario.data.samples_per_device or 32, t.batch_size)


def train_config(scenario: Scenario) -> dict[str, Any]:
    """What every train instruction carries besides the strategy's own keys."""
    return {LR_KEY: float(scenario.training.lr), LOCAL_STEPS_KEY: int(scenario_steps(scenario))}


def validate(scenario: Scenario) -> None:
    """What can be refused before anything is written: the strategy must send only keys devices honour."""
    from fleet.strategies import check_strategy_config
    _set_task_identity()
    strategy = make_fleet_strategy(scenario, Fleet({}, []))
    check_strategy_config(strategy, {"probe": np.zeros(1, np.float32)}, train_config(scenario))


class RunRecorder:
    """The run directory as an observer: after each round, its device and round records, the checkpoint of
    the aggregated arrays with the strategy's state, then the state file (in that order, so a crash between
    them leaves a run that resumes at the last round whose state was written).

    The writing happens on one writer thread, in round order, while the next round runs (its hosts compute,
    the driver mostly waits): what is written is a snapshot taken at the round's end. ``flush`` waits for it
    (and raises what it raised); the run reads its directory only after a flush."""

    def __init__(self, run: RunDir, stop_after_round: int | None = None):
        self.run = run
        self.stop_after_round = stop_after_round
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgefleet-run-writer")
        self._pending: list[Future] = []

    def begin_round(self, round_: int, total_rounds: int) -> None:
        pass

    def device_done(self, record: DeviceRecord) -> None:
        pass

    def end_round(self, log: RoundLog) -> None:
        self._submit(lambda: self.run.append_metrics(round_log_records(log)))

    def __call__(self, log: RoundLog, arrays: Any, state: Mapping[str, np.ndarray]) -> None:
        """``state``: the strategy's state as the round left it (``rounds.strategy_state``, a copy)."""
        line = (f"round {log.round}: {len(log.of('train'))} trained, failures {log.failures or 0}, "
                f"{log.duration_s:.2f} s")

        def write() -> None:
            self.run.save_checkpoint(log.round, from_record(arrays), state)
            self.run.write_state({"rounds_completed": log.round, "finished": False})
            self.run.log(line)
        self._submit(write)
        if self.stop_after_round is not None and log.round >= self.stop_after_round:
            self.flush()
            raise _Stop()

    def _submit(self, work: Callable[[], None]) -> None:
        for done in [f for f in self._pending if f.done()]:
            done.result()  # raises an earlier write's error: the run stops with it
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._writer.submit(work))

    def flush(self) -> None:
        """Wait until everything submitted is written; raise the first error a write raised."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._writer.shutdown(wait=True)


def run_scenario(scenario: Scenario | None, run_dir: str | os.PathLike | None = None, *, resume: bool = False,
                 rounds: int | None = None, allow_changes: Sequence[str] = (), progress: bool = True,
                 actors: int | None = None, log: Callable[[str], None] | None = None,
                 stop_after_round: int | None = None, observers: Sequence[Any] = ()) -> dict[str, Any]:
    """Run (or resume) a scenario; returns the summary. With ``resume``, the run in ``run_dir`` continues
    after its newest valid checkpoint (``allow_changes``: edited scenario keys to accept, fleet.runs);
    ``rounds`` then extends it (also a finished run) to that many rounds. The run directory is locked for
    the whole call. ``stop_after_round`` simulates a kill (tests); ``observers`` (RoundObservers) are told of
    each round after the run directory, the progress display and the exporter."""
    run = RunDir(run_dir if run_dir is not None else scenario.run_dir)
    try:
        return _run_scenario(scenario, run, resume, rounds, allow_changes, progress, actors, log,
                             stop_after_round, observers)
    finally:
        run.unlock()


def _run_scenario(scenario: Scenario | None, run: RunDir, resume: bool, rounds: int | None,
                  allow_changes: Sequence[str], progress: bool, actors: int | None,
                  log: Callable[[str], None] | None, stop_after_round: int | None,
                  extra_observers: Sequence[Any] = ()) -> dict[str, Any]:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)  # our own progress line says what matters
    if not progress:
        logging.getLogger("fleet").setLevel(logging.ERROR)
    log = log or (lambda text: print(text, file=sys.stderr))
    if not resume:
        validate(scenario)
    checkpoint: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
    if resume:
        resumed = run.resume(allow_changes)  # lock, verify, newest valid checkpoint, metrics cut back to it
        for problem in resumed.problems:
            log(f"edgefleet: {problem}")
        state = run.state()
        scenario = parse_scenario(tomllib.loads(resumed.scenario_toml), source=str(run.path / "scenario.toml"))
        done = resumed.rounds_completed
        checkpoint = (resumed.arrays, resumed.strategy_state) if done else None
        if rounds is not None:
            if rounds < done:
                raise RunError(f"run {run.path} has {done} rounds already; --rounds {rounds} would shorten it")
            scenario = scenario.with_overrides(rounds=rounds)
            run.write_scenario(scenario.to_toml())
        elif state.get("finished"):
            raise RunError(f"run {run.path} already finished ({done} rounds); extend it with --resume "
                           f"{run.path} --rounds N")
        run.log(f"resumed after round {done} of {scenario.training.rounds}")
    else:
        run.create(scenario.to_toml())
        done = 0
        run.log(f"started scenario {scenario.name!r}: {scenario.training.rounds} rounds, "
                f"{scenario.device_count} devices")
    wall_start = time.perf_counter()
    base = pretrain_base(scenario, log=log)
    run.check_base(base)  # a resumed run trains on the base it started with
    builder = ProgramBuilder(scenario, base)
    fleet = build_fleet(scenario, builder)
    actors = scenario.ray.actors if actors is None else actors
    start_ray(scenario, actors)
    hosts = HostPool(scenario, fleet.hosted_programs(), actors, fleet.batched, fleet.runtimes)
    boards = BoardPool(scenario, fleet.boards, actors, log)
    try:
        return _run_rounds(scenario, run, fleet, hosts, boards, done, checkpoint, progress, stop_after_round,
                           extra_observers, wall_start)
    finally:
        boards.close()


def _run_rounds(scenario: Scenario, run: RunDir, fleet: Fleet, hosts: HostPool, boards: BoardPool, done: int,
                checkpoint: Any, progress: bool, stop_after_round: int | None, extra_observers: Sequence[Any],
                wall_start: float) -> dict[str, Any]:
    board_status = boards.start()
    pool = Dispatcher(hosts, boards)
    first = fleet.programs[fleet.devices[0].program]
    steps = scenario_steps(scenario)
    grid = FleetGrid(fleet.devices, pool.stream, JobDefaults(steps, scenario.training.lr, scenario.seed,
                                                           scenario.training.evaluate_after),
                     ahead=not fleet.boards)  # a board's jobs run when submitted: nothing to gain, order to keep
    strategy = make_fleet_strategy(scenario, fleet)
    initial = _initial_arrays(fleet)
    if checkpoint is not None:
        arrays, server_state = checkpoint
        restore_strategy_state(strategy, server_state)
    else:
        arrays = initial
        run.save_checkpoint(0, initial, {})
    bar = RunProgress(scenario.training.rounds, enabled=progress)
    recorder = RunRecorder(run, stop_after_round)
    watchers: list[Any] = [recorder, bar]
    exporter = _exporter(scenario, run, fleet, watchers)
    watchers += list(extra_observers)  # the caller's, told after the run directory, progress and exporter
    driver = RoundDriver(strategy, grid, seed=scenario.seed, observers=watchers, checkpoint=recorder,
                         train_config=train_config(scenario))
    _set_task_identity()
    try:
        with bar, fewer_collections():
            driver.run(to_record(arrays), done + 1, scenario.training.rounds)
        recorder.flush()
    except _Stop:
        return {"stopped_after_round": stop_after_round}
    finally:
        recorder.close()
        if exporter is not None:
            exporter.close()
    rounds_completed = run.state()["rounds_completed"]
    final, _ = run.load_checkpoint(rounds_completed)
    personal = personalize(pool, fleet, initial, final, steps, scenario)
    summary = _summary(scenario, run, fleet, first, personal, driver.round_seconds,
                       rounds_completed, time.perf_counter() - wall_start)
    summary["hosts"] = {"actors": len(hosts.nodes), "nodes": len(set(hosts.nodes))}
    if board_status:
        summary["boards"] = boards.report()
    run.write_summary(summary)
    run.write_state({"rounds_completed": rounds_completed, "finished": True})
    run.log(f"finished: {rounds_completed} rounds")
    return summary


class _Stop(Exception):
    pass


ROUND_GC_THRESHOLDS = (100_000, 50, 100)


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """The rounds with the cyclic garbage collector run rarely. A round makes hundreds of thousands of
    short-lived containers (messages, records, arrays' wrappers) that reference counting frees; at the default
    thresholds (700, 10, 10) the collector rescans the live ones thousands of times a round — 3.2 of the
    driver's 7.9 CPU-seconds per round at 10,000 devices. What the set-up made is frozen out of the scans."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*ROUND_GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _exporter(scenario: Scenario, run: RunDir, fleet: Fleet, observers: list[Any]) -> Any:
    """The run's metrics exporter when the scenario's [metrics] table enables it (an observer of the
    driver; counters restored from the run directory on resume)."""
    if not scenario.metrics.enabled:
        return None
    from fleet.exporter import serve_run
    from fleet.metrics import FleetMetrics
    metrics = FleetMetrics()
    for info in fleet.devices:
        metrics.register_device(info.index, info.group, info.target, info.runtime, info.budget_bytes,
                                dict(info.peak_bytes_by_level))
    exporter = serve_run(run.path, scenario.metrics.address, scenario.training.rounds, metrics)
    observers.append(metrics)
    run.log(f"metrics served at {exporter.url}")
    return exporter


def _initial_arrays(fleet: Fleet) -> dict[str, np.ndarray]:
    """The global adapters: the initial per-device tensors of the highest-rank program (FFA-LoRA's frozen A
    included: it is part of the adapter every device receives)."""
    best = max(fleet.programs.values(), key=lambda p: sum(p.tensors[n].nbytes for n in p.per_device))
    arrays = best.adapter_values()
    for program in fleet.programs.values():  # groups with their own sparse schemes: every one's parameters
        if program.tuning.get("strategy") == "sparse":   # (a device returns those it does not train as received)
            arrays.update({k: v for k, v in program.adapter_values().items() if k not in arrays})
    return arrays


def personalize(pool: HostPool | Dispatcher, fleet: Fleet, initial: Mapping[str, np.ndarray],
                final: Mapping[str, np.ndarray], steps: int, scenario: Scenario) -> dict[str, list[float]]:
    """Per device: the base model, the global adapter, and the global adapter after local fine-tuning."""
    from fleet.strategies import truncate_state
    by_program: dict[str, list[DeviceInfo]] = {}
    for info in fleet.devices:
        by_program.setdefault(info.program, []).append(info)
    out: dict[str, list] = {"device": [], "base": [], "global": [], "personalized": []}
    lr = scenario.training.lr
    for key, infos in by_program.items():
        rank = fleet.ranks.get(NODE_BASE + infos[0].index)
        start, end = (truncate_state(a, rank) if rank else dict(a) for a in (initial, final))
        base = pool.dispatch(key, [make_job("evaluate", i.index, start, seed=scenario.seed) for i in infos])
        tuned = pool.dispatch(key, [make_job("personalize", i.index, end, steps=steps, lr=lr, seed=scenario.seed)
                                    for i in infos])
        for info, b, t in zip(infos, base, tuned):
            out["device"].append(info.index)
            out["base"].append(b.metric_before)
            out["global"].append(t.metric_before)
            out["personalized"].append(t.metric_after)
    return out


def _distribution(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if not len(v):
        return {}
    q = np.percentile(v, [10, 25, 50, 75, 90])
    return {"mean": float(v.mean()), "std": float(v.std()), "p10": q[0], "p25": q[1], "median": q[2],
            "p75": q[3], "p90": q[4]}


def _summary(scenario: Scenario, run: RunDir, fleet: Fleet, program: Any, personal: Mapping[str, list],
             round_times: Sequence[float], rounds_completed: int, wall_s: float) -> dict[str, Any]:
    metric = "accuracy" if program.task == "classification" else "auc"
    rounds = [r for r in run.metrics() if r.get("type") == "round"]
    failures = merge_counts([r["failures"] for r in rounds])
    improved = [p - b for p, b in zip(personal["personalized"], personal["base"]) if np.isfinite(p - b)]
    # the *_accuracy_mean keys hold the task's metric ("metric" says which); AUC runs also get *_auc_mean
    means = {f"{stage}_{name}_mean": mean(personal[stage]) for stage in ("base", "global", "personalized")
             for name in {"accuracy", metric}}
    return {
        "scenario": scenario.name, "rounds_completed": rounds_completed, "devices": len(fleet.devices),
        "metric": metric, "task": program.task,
        "personalization": {
            **means,
            "improvement_mean": mean(improved),
            "share_of_devices_improved": float(np.mean(np.asarray(improved) > 0)) if improved else float("nan"),
            "distributions": {k: _distribution(personal[k]) for k in ("base", "global", "personalized")},
            "per_device": {k: personal[k] for k in ("device", "base", "global", "personalized")},
        },
        "rounds": [{k: r[k] for k in ("round", "train_loss", "global_metric", "devices_trained", "failures")}
                   for r in rounds],
        "failures": failures,
        "unavailable": merge_counts([r.get("unavailable", {}) for r in rounds]),
        "rejected": merge_counts([r.get("rejected", {}) for r in rounds]),
        "cost": {"program": {k: program.report[k] for k in ("params", "memory", "flops") if k in program.report},
                 "perf": program.report.get("perf", {}), "programs": sorted(fleet.programs)},
        "timing": {"seconds_per_round": float(np.mean(round_times)) if round_times else float("nan"),
                   "wall_seconds": wall_s},
    }


def _set_task_identity() -> None:
    """What Flower's own ServerApp runtime sets before a strategy builds Messages."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def run_file(path: str, **kwargs: Any) -> dict[str, Any]:
    return run_scenario(load_scenario(path), **kwargs)
