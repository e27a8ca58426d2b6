"""`edgefleet run`: a scenario end to end.

    scenario → base model (pretrained, cached) → programs per device kind → Ray host actors
             → Flower strategy.start() over a FleetGrid → per-round metrics + checkpoint → personalization
             → summary.json
"""
from __future__ import annotations

import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fleet.arrays import from_record, to_record
from fleet.grid import NODE_BASE, DeviceInfo, FleetGrid
from fleet.host import DeviceHost, DeviceHostCore, local_steps
from fleet.programs import DEFAULT_CLOCK_MHZ, ProgramBuilder, cycles_per_step, pretrain_base
from fleet.runs import RunDir, RunError
from fleet.scenario import DeviceGroup, Dropout, Periodic, Scenario, load_scenario, parse_scenario

FLEET_RUNTIMES = ("numpy", "qemu")  # gvsoc and serial boards plug in through device_runtime in later work
STATEFUL_ATTRS = ("m_t", "v_t", "momentum_vector")  # Flower FedOpt / FedAvgM server state


@dataclass
class Fleet:
    """Everything the run needs besides the strategy: programs by key, devices, dispatch."""
    programs: dict[str, Any]
    devices: list[DeviceInfo]
    batched: dict[str, Any] = field(default_factory=dict)  # key → device-axis program
    ranks: dict[int, int] = field(default_factory=dict)    # node id → LoRA rank
    runtimes: dict[str, str] = field(default_factory=dict)  # key → device runtime


class HostPool:
    """A bounded pool of device hosts (Ray actors, or in-process for ``actors=0``)."""

    def __init__(self, scenario: Scenario, programs: Mapping[str, Any], actors: int,
                 batched: Mapping[str, Any] | None = None, runtimes: Mapping[str, str] | None = None):
        self.scenario = scenario
        self.per_call = scenario.ray.devices_per_call
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

    def dispatch(self, key: str, kind: str, jobs: Sequence[dict[str, Any]],
                 arrays: Mapping[str, Mapping[str, np.ndarray]]) -> list[dict[str, Any]]:
        if self.local is not None:
            return self.local.run(key, kind, jobs, arrays)
        import ray
        chunks = [jobs[i:i + self.per_call] for i in range(0, len(jobs), self.per_call)]
        arrays_ref = ray.put(dict(arrays))
        refs = [self.actors[i % len(self.actors)].run.remote(key, kind, chunk, arrays_ref)
                for i, chunk in enumerate(chunks)]
        return [r for chunk in ray.get(refs) for r in chunk]


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
            batched_programs[key] = builder.batched(group.target, rank, chunk)
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
                fault=fault.kind if fault else "", fault_p=fault.p if fault else 0.0))
            if rank:
                ranks[NODE_BASE + index] = rank
    return Fleet(programs, devices, {k: v for k, v in batched_programs.items() if v is not None}, ranks, runtimes)


def peak_memory(program: Any) -> tuple[tuple[str, int], ...]:
    """Bytes resident per memory level on the target (or the total, for an unlowered program)."""
    levels = program.report.get("memory_by_level")
    if levels:
        return tuple((k, int(v)) for k, v in levels.items())
    return (("total", int(program.report["memory"]["total_bytes"])),)


def group_program(builder: ProgramBuilder, group: DeviceGroup) -> tuple[str, int | None, Any]:
    """A group's program, its key (target and LoRA rank) and its rank."""
    rank = builder.rank_for(group)
    if group.runtime not in FLEET_RUNTIMES:
        raise RunError(f"fleet group {group.name!r}: runtime {group.runtime!r} is not available in fleet runs yet "
                       f"(available: {', '.join(FLEET_RUNTIMES)})")
    key = f"{group.target}-r{rank}" if rank else group.target
    if group.runtime != "numpy":
        key += f"-{group.runtime}"
    return key, rank, builder.program(group.target, rank)


def clock_hz(group: DeviceGroup, program: Any) -> float:
    """The devices' clock: the group's, else the target's, else a default."""
    return (group.clock_mhz or program.target.get("clock_mhz") or DEFAULT_CLOCK_MHZ) * 1e6


def make_fleet_strategy(scenario: Scenario, fleet: Fleet):
    from fleet.strategies import make_strategy
    a = scenario.aggregation
    options: dict[str, Any] = {"fraction_train": scenario.training.fraction,
                               "fraction_evaluate": scenario.training.fraction,
                               "min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": 1}
    extra = {"proximal_mu": a.proximal_mu, "eta": a.server_lr, "beta_1": a.beta_1, "beta_2": a.beta_2,
             "tau": a.tau}
    if a.strategy == "fedavgm":
        extra = {"server_learning_rate": a.server_lr, "server_momentum": a.server_momentum}
    options.update({k: v for k, v in extra.items() if v is not None})
    if a.strategy in ("flexlora", "hetlora"):
        options["node_ranks"] = dict(fleet.ranks)
    return make_strategy(a.strategy, **options)


def _inner(strategy: Any) -> Any:
    return getattr(strategy, "strategy", strategy)


def strategy_state(strategy: Any) -> dict[str, np.ndarray]:
    inner, state = _inner(strategy), {}
    for attr in STATEFUL_ATTRS:
        value = getattr(inner, attr, None)
        if isinstance(value, dict):
            state.update({f"{attr}/{k}": np.asarray(v) for k, v in value.items()})
        elif isinstance(value, list):
            state.update({f"{attr}/{i}": np.asarray(v) for i, v in enumerate(value)})
    return state


def restore_strategy_state(strategy: Any, state: Mapping[str, np.ndarray]) -> None:
    inner = _inner(strategy)
    for attr in STATEFUL_ATTRS:
        items = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(attr + "/")}
        if not items:
            continue
        if attr == "momentum_vector":
            setattr(inner, attr, [items[str(i)] for i in range(len(items))])
        else:
            setattr(inner, attr, dict(items))


class Progress:
    """One live line on a terminal (round, devices done, loss); a line per round otherwise."""

    def __init__(self, total_rounds: int, stream=sys.stderr, enabled: bool = True):
        self.total = total_rounds
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.round = 0
        self.done = 0
        self.losses: list[float] = []

    def device(self, record: Mapping[str, Any]) -> None:
        self.done += 1
        if "train_loss" in record:
            self.losses.append(record["train_loss"])
        if self.tty and self.done % 16 == 0:
            self._draw()

    def _draw(self, end: str = "") -> None:
        loss = f"{np.mean(self.losses):.4f}" if self.losses else "-"
        filled = int(20 * self.round / max(self.total, 1))
        line = f"[{'#' * filled}{'.' * (20 - filled)}] round {self.round}/{self.total}  devices {self.done}  loss {loss}"
        self.stream.write(("\r" + line + end) if self.tty else line + "\n")
        self.stream.flush()

    def start_round(self, round_: int) -> None:
        self.round, self.done, self.losses = round_, 0, []

    def end_round(self, extra: str = "") -> None:
        if self.enabled:
            self._draw(end=f"  {extra}\n" if self.tty else "")
            if not self.tty and extra:
                self.stream.write(f"  {extra}\n")


def run_scenario(scenario: Scenario, run_dir: str | os.PathLike | None = None, *, resume: bool = False,
                 progress: bool = True, actors: int | None = None, log: Callable[[str], None] | None = None,
                 stop_after_round: int | None = None) -> dict[str, Any]:
    """Run (or resume) a scenario; returns the summary. ``stop_after_round`` simulates a kill (tests)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)  # our own progress line says what matters
    log = log or (lambda text: print(text, file=sys.stderr))
    run = RunDir(run_dir if run_dir is not None else scenario.run_dir)
    if resume:
        state = run.state()
        if state.get("finished"):
            raise RunError(f"run {run.path} already finished ({state['rounds_completed']} rounds)")
        scenario = parse_scenario(_read_toml(run.path / "scenario.toml"), source=str(run.path / "scenario.toml"))
        done = int(state["rounds_completed"])
        run.truncate_metrics(done)
    else:
        run.create(scenario.to_toml())
        done = 0
    wall_start = time.perf_counter()
    base = pretrain_base(scenario, log=log)
    builder = ProgramBuilder(scenario, base)
    fleet = build_fleet(scenario, builder)
    actors = scenario.ray.actors if actors is None else actors
    _ray_init(scenario, actors)
    pool = HostPool(scenario, fleet.programs, actors, fleet.batched, fleet.runtimes)
    first = fleet.programs[fleet.devices[0].program]
    steps = local_steps(scenario.training.local_steps, scenario.training.local_epochs,
                        scenario.data.samples_per_device or 32, scenario.training.batch_size)
    grid = FleetGrid(fleet.devices, pool.dispatch, {"local_steps": steps, "lr": scenario.training.lr},
                     scenario.seed)
    strategy = make_fleet_strategy(scenario, fleet)
    initial = _initial_arrays(fleet)
    if done:
        arrays, server_state = run.load_checkpoint(done)
        restore_strategy_state(strategy, server_state)
    else:
        arrays = initial
        run.save_checkpoint(0, initial, {})
    remaining = scenario.training.rounds - done
    bar = Progress(scenario.training.rounds, enabled=progress)
    grid.on_device = bar.device
    round_times: list[float] = []
    t_round = [time.perf_counter()]

    def after_round(server_round: int, record) -> None:
        actual = done + server_round
        if server_round > 0:
            _finish_round(run, grid, strategy, actual, from_record(record), bar)
            round_times.append(time.perf_counter() - t_round[0])
            if stop_after_round is not None and actual >= stop_after_round:
                raise _Stop()
        grid.round = actual + 1
        random.seed(f"{scenario.seed}-{grid.round}")  # Flower samples nodes with the random module
        bar.start_round(grid.round)
        t_round[0] = time.perf_counter()
        return None

    _set_task_identity()
    try:
        if remaining > 0:
            strategy.start(grid=grid, initial_arrays=to_record(arrays),
                           num_rounds=remaining, evaluate_fn=after_round)
    except _Stop:
        return {"stopped_after_round": stop_after_round}
    rounds_completed = run.state()["rounds_completed"]
    final, _ = run.load_checkpoint(rounds_completed)
    personal = personalize(grid, pool, fleet, initial, final, steps, scenario)
    summary = _summary(scenario, run, fleet, first, personal, round_times, rounds_completed,
                       time.perf_counter() - wall_start)
    summary["hosts"] = {"actors": len(pool.nodes), "nodes": len(set(pool.nodes))}
    run.write_summary(summary)
    run.write_state({"rounds_completed": rounds_completed, "finished": True})
    return summary


class _Stop(Exception):
    pass


def _finish_round(run: RunDir, grid: FleetGrid, strategy: Any, round_: int, arrays: Mapping[str, np.ndarray],
                  bar: Progress) -> None:
    logs = [entry for entry in grid.logs if entry.round == round_]
    devices = [d for entry in logs for d in entry.devices]
    failures: dict[str, int] = {}
    for entry in logs:
        for cause, count in entry.failures.items():
            failures[cause] = failures.get(cause, 0) + count
    rejected = getattr(strategy, "rejected", {}) or {}
    for cause, count in dict(rejected).items():  # error replies are already counted by their grid-side cause
        if cause != "error":
            failures[f"rejected_{cause}"] = failures.get(f"rejected_{cause}", 0) + int(count)
    train = [d for d in devices if d["kind"] == "train" and "error" not in d]
    evals = [d for d in devices if d["kind"] == "evaluate" and "error" not in d]
    record = {"type": "round", "round": round_,
              "devices_trained": len(train), "devices_evaluated": len(evals), "failures": failures,
              "train_loss": _mean([d["train_loss"] for d in train]),
              "metric_before": _mean([d["metric_before"] for d in train]),
              "metric_after": _mean([d["metric_after"] for d in train]),
              "global_metric": _mean([d["metric_before"] for d in evals]),
              "modelled_s_max": max([d["modelled_s"] for d in train], default=0.0),
              "bytes_up": sum(d["bytes_up"] for d in train), "bytes_down": sum(d.get("bytes_down", 0) for d in devices)}
    run.append_metrics([{"type": "device", **d} for d in devices] + [record])
    run.save_checkpoint(round_, arrays, strategy_state(strategy))
    run.write_state({"rounds_completed": round_, "finished": False})
    bar.end_round(f"train loss {record['train_loss']:.4f}  global metric {record['global_metric']:.3f}  "
                  f"failures {failures or 0}")


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _initial_arrays(fleet: Fleet) -> dict[str, np.ndarray]:
    """The global adapters: the initial trainables of the highest-rank program."""
    best = max(fleet.programs.values(), key=lambda p: sum(p.tensors[n].nbytes for n in p.trainable))
    arrays = best.initial_parameters()
    for name, t in best.tensors.items():  # FFA-LoRA: A is frozen on the device but still part of the adapter
        if name.endswith(".lora_a") and name not in arrays and name in best.values:
            arrays[name] = np.array(best.values[name])
    return arrays


def personalize(grid: FleetGrid, pool: HostPool, fleet: Fleet, initial: Mapping[str, np.ndarray],
                final: Mapping[str, np.ndarray], steps: int, scenario: Scenario) -> dict[str, list[float]]:
    """Per device: the base model, the global adapter, and the global adapter after local fine-tuning."""
    from fleet.strategies import truncate_state
    by_program: dict[str, list[DeviceInfo]] = {}
    for info in fleet.devices:
        by_program.setdefault(info.program, []).append(info)
    out = {"device": [], "base": [], "global": [], "personalized": []}
    for key, infos in by_program.items():
        rank = fleet.ranks.get(NODE_BASE + infos[0].index)
        arrays = {"initial": dict(initial), "final": dict(final)}
        if rank:
            arrays = {k: truncate_state(v, rank) for k, v in arrays.items()}
        base_jobs = [{"device": i.index, "arrays": "initial", "steps": 0, "lr": 0.0} for i in infos]
        tune_jobs = [{"device": i.index, "arrays": "final", "steps": steps, "lr": scenario.training.lr}
                     for i in infos]
        base = pool.dispatch(key, "evaluate", base_jobs, arrays)
        tuned = pool.dispatch(key, "train", tune_jobs, arrays)
        for info, b, t in zip(infos, base, tuned):
            out["device"].append(info.index)
            out["base"].append(b.get("metric_before", float("nan")))
            out["global"].append(t.get("metric_before", float("nan")))
            out["personalized"].append(t.get("metric_after", float("nan")))
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
    failures: dict[str, int] = {}
    for r in rounds:
        for cause, count in r["failures"].items():
            failures[cause] = failures.get(cause, 0) + count
    improved = [p - b for p, b in zip(personal["personalized"], personal["base"]) if np.isfinite(p - b)]
    # the *_accuracy_mean keys hold the task's metric ("metric" says which); AUC runs also get *_auc_mean
    means = {f"{stage}_{name}_mean": _mean(personal[stage]) for stage in ("base", "global", "personalized")
             for name in {"accuracy", metric}}
    return {
        "scenario": scenario.name, "rounds_completed": rounds_completed, "devices": len(fleet.devices),
        "metric": metric, "task": program.task,
        "personalization": {
            **means,
            "improvement_mean": _mean(improved),
            "share_of_devices_improved": float(np.mean(np.asarray(improved) > 0)) if improved else float("nan"),
            "distributions": {k: _distribution(personal[k]) for k in ("base", "global", "personalized")},
            "per_device": {k: personal[k] for k in ("device", "base", "global", "personalized")},
        },
        "rounds": [{k: r[k] for k in ("round", "train_loss", "global_metric", "devices_trained", "failures")}
                   for r in rounds],
        "failures": failures,
        "cost": {"program": {k: program.report[k] for k in ("params", "memory", "flops") if k in program.report},
                 "perf": program.report.get("perf", {}), "programs": sorted(fleet.programs)},
        "timing": {"seconds_per_round": float(np.mean(round_times)) if round_times else float("nan"),
                   "wall_seconds": wall_s},
    }


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing; not an edgefleet run directory") from None


def _ray_init(scenario: Scenario, actors: int) -> None:
    if actors <= 0:
        return
    import ray
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "logging_level": "ERROR", "configure_logging": False}
    if scenario.ray.address:
        ray.init(address=scenario.ray.address, **kwargs)
    else:
        ray.init(num_cpus=max(actors, os.cpu_count() or 1), _node_ip_address="127.0.0.1", **kwargs)


def _set_task_identity() -> None:
    """What Flower's own ServerApp runtime sets before a strategy builds Messages."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def run_file(path: str, **kwargs: Any) -> dict[str, Any]:
    return run_scenario(load_scenario(path), **kwargs)
