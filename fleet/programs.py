"""From a scenario to compiled programs: the pretrained base model (cached by content hash), one training
program per distinct device kind (target × LoRA rank), and each group's rank from its memory budget."""
from __future__ import annotations

import hashlib
import io
import json
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler import CompileError, TuningSpec
from compiler.autodiff import SGDConfig, optimizer_config
from compiler.frontend import import_onnx
from compiler.pipeline import CompileOptions, compile_graph, load_model
from compiler.program import Program
from device_runtime import NumpyDevice
from fleet.data import global_dataset
from fleet.scenario import DeviceGroup, Scenario

RANK_CANDIDATES = (1, 2, 4, 8, 16, 32)
PRETRAIN_BATCH = 32
PRETRAIN_MOMENTUM = 0.9  # SGD's; Adam has its betas
SPARSE_SEARCH_SAMPLES = 256  # non-personalized samples for a group's contribution analysis (3/4 train, 1/4 held out)
DEFAULT_CLOCK_MHZ = 360.0


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet"))


def _model_bytes(scenario: Scenario) -> tuple[Any, str, str, bytes]:
    source, name, task = load_model(scenario.model.name, scenario.seed)
    raw = source.SerializeToString() if hasattr(source, "SerializeToString") else Path(source).read_bytes()
    return source, name, task, raw


def pretrain_base(scenario: Scenario, log=print) -> dict[str, np.ndarray]:
    """Full training of the model on the non-personalized data with the project's own compiler and executor;
    cached by a hash of everything that determines the result."""
    source, name, task, raw = _model_bytes(scenario)
    spec = {"model": hashlib.sha256(raw).hexdigest(), "data": scenario.to_dict()["data"], "seed": scenario.seed,
            "steps": scenario.model.pretrain_steps, "lr": scenario.model.pretrain_lr,
            "optimizer": scenario.model.pretrain_optimizer, "version": 1}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / f"base-{name}-{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError):
            pass  # a corrupt cache entry is rebuilt
    momentum = PRETRAIN_MOMENTUM if scenario.model.pretrain_optimizer == "sgd" else 0.0
    options = CompileOptions(TuningSpec("full"), PRETRAIN_BATCH, "auto",
                             optimizer_config(scenario.model.pretrain_optimizer, scenario.model.pretrain_lr, momentum))
    program = compile_graph(import_onnx(source, PRETRAIN_BATCH), options, name, task)
    values = {n: np.asarray(program.values[n]) for n in program.trainable}
    if scenario.model.pretrain_steps > 0:
        data = global_dataset(scenario.data, scenario.seed, n_train=max(2048, PRETRAIN_BATCH))
        rng = np.random.default_rng(scenario.seed)
        order = rng.permutation(len(data.x_train))
        device = NumpyDevice(program)
        y = data.y_train[order] if program.task == "classification" else None
        result = device.train(data.x_train[order], y, scenario.model.pretrain_steps)
        values = result.params
        log(f"pretrained {name}: {scenario.model.pretrain_steps} steps, loss {result.losses[:10].mean():.3f} → "
            f"{result.losses[-10:].mean():.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **values)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return values


def tuning_spec(scenario: Scenario, rank: int | None = None, freeze_a: bool = False) -> TuningSpec:
    """The scenario's tuning spec for one kind of device: its LoRA rank, the scenario's seed for the
    adapters' start, and A frozen for FFA-LoRA."""
    spec = scenario.tuning.spec
    if spec.lora is None:
        return spec
    lora = dataclasses.replace(spec.lora, rank=rank or spec.lora.rank, seed=scenario.seed, freeze_a=freeze_a)
    return dataclasses.replace(spec, lora=lora)


@dataclass(frozen=True)
class DeviceKind:
    key: str
    program: Program
    rank: int | None


class ProgramBuilder:
    """Compiles (and caches) the training program for a target and rank, with the base weights in place."""

    def __init__(self, scenario: Scenario, base: dict[str, np.ndarray]):
        self.scenario = scenario
        self.base = base
        self.source, self.name, self.task, _ = _model_bytes(scenario)
        self._cache: dict[tuple, Program] = {}
        self._schemes: dict[int, tuple[tuple[str, str], ...]] = {}
        self.freeze_a = scenario.aggregation.strategy == "ffa-lora"
        self.proximal = scenario.aggregation.strategy == "fedprox"  # devices honour FedProx's proximal-mu

    def program(self, target: str, rank: int | None, devices: int = 1,
                sparse: tuple[tuple[str, str], ...] | None = None) -> Program:
        """The training program for one device (lowered onto ``target``: cost, levels), or with ``devices`` > 1
        the same program with a device axis, which the hosts use to run that many devices at once. ``sparse``:
        a group's own sparse scheme (``sparse_for``)."""
        key = (target, rank, devices, sparse)
        if key not in self._cache:
            t = self.scenario.training
            tuning = tuning_spec(self.scenario, rank, self.freeze_a)
            if sparse is not None:
                tuning = TuningSpec("sparse", train=tuning.train, sparse=sparse)
            options = CompileOptions(tuning, t.batch_size, "auto",
                                     SGDConfig(t.lr, t.momentum, proximal=self.proximal), devices)
            graph = import_onnx(self.source, t.batch_size * devices)
            program = compile_graph(graph, options, self.name, self.task)
            values = dict(program.values)
            values.update({k: v for k, v in self.base.items() if k in values})
            program = program.replace(values=values)
            self._cache[key] = lower(program, target) if devices == 1 else program
        return self._cache[key]

    def batched(self, target: str, rank: int | None, devices: int,
                sparse: tuple[tuple[str, str], ...] | None = None) -> Program | None:
        """The device-axis program, or None where the tuning cannot be batched (it then runs per device)."""
        if devices < 2:
            return None
        try:
            return self.program(target, rank, devices, sparse)
        except CompileError:
            return None

    def sparse_for(self, group: DeviceGroup) -> tuple[tuple[str, str], ...] | None:
        """The group's sparse scheme when the scenario chooses one per memory budget (``sparse_from_memory``):
        ``compiler.sparse_search.choose_sparse`` on the base weights and the scenario's non-personalized data,
        for ``memory_kib`` at the scenario's batch size; None otherwise."""
        if not self.scenario.tuning.sparse_from_memory:
            return None
        budget = int(group.memory_kib) * 1024
        if budget not in self._schemes:
            from compiler.sparse_search import TaskData, choose_sparse
            t = self.scenario.training
            graph = import_onnx(self.source, t.batch_size)
            graph = graph.replace(values={**graph.values, **{k: v for k, v in self.base.items() if k in graph.values}})
            data = global_dataset(self.scenario.data, self.scenario.seed, n_train=SPARSE_SEARCH_SAMPLES)
            y = data.y_train if self.task == "classification" else None
            options = CompileOptions(TuningSpec("full"), t.batch_size, "auto", SGDConfig(t.lr, t.momentum))
            try:
                choice, _ = choose_sparse(graph, options, budget, TaskData.split(data.x_train, y, seed=self.scenario.seed),
                                          self.name, self.task, train=self.scenario.tuning.train)
            except CompileError as exc:
                raise CompileError(f"group {group.name!r}: {exc}") from None
            self._schemes[budget] = choice.tuning.sparse
        return self._schemes[budget]

    def rank_for(self, group: DeviceGroup) -> int | None:
        """The group's LoRA rank: the scenario's, or with rank_from_memory the largest that fits the budget."""
        t = self.scenario.tuning
        if t.strategy != "lora":
            return None
        if not t.rank_from_memory:
            return t.rank or 4
        if group.memory_kib is None:
            raise CompileError(f"group {group.name!r}: rank_from_memory needs memory_kib")
        budget = group.memory_kib * 1024
        best = None
        for rank in RANK_CANDIDATES:
            if t.rank and rank > t.rank:
                break
            try:
                program = self.program(group.target, rank)
            except CompileError:
                break  # rank larger than some layer allows
            if program.report["memory"]["total_bytes"] <= budget:
                best = rank
        if best is None:
            need = self.program(group.target, 1).report["memory"]["total_bytes"]
            raise CompileError(f"group {group.name!r}: memory_kib={group.memory_kib} cannot hold even a rank-1 "
                               f"program ({need / 1024:.0f} KiB needed)")
        return best


def lower(program: Program, target: str) -> Program:
    """Lower onto the device's target when the target model is available (adds cycles and levels)."""
    try:
        from compiler.targets import load_target, lower_to_target
    except ImportError:
        return program
    if target in ("rv32-qemu", "host"):
        return program  # emulated boards: QEMU counts the real instructions; no Siracusa cost model applies
    return lower_to_target(program, load_target(target))


def cycles_per_step(program: Program) -> int:
    perf = program.report.get("perf")
    if perf:
        return int(perf["cycles_per_step"])
    return int(program.report["flops"]["total"] / 2)  # no target model: a nominal 2 FLOP/cycle
