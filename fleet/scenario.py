"""The scenario file: its TOML schema, its validation, and the typed ``Scenario`` every later stage reads.

``load_scenario(path)`` reads a TOML file, ``parse_scenario(raw)`` validates an already-parsed dict. Both
return a tree of frozen dataclasses; nothing after this module sees the raw dict. Every key, its type, range
and default is listed in docs/scenarios.md.

Any problem raises ``ScenarioError`` with one line that names the file, the key path, what was expected and
what was found::

    scenario.toml: fleet.groups[1].memory_kib: expected an integer >= 1, got "big"
    scenario.toml: unknown key 'trainng.rounds' (did you mean 'training.rounds'?)

Paths inside the file (a model ``.onnx``, a target ``.toml``, ``data.path``) are resolved against the
scenario file's directory by ``load_scenario``, so a scenario and its data can move together and the
resolved scenario written into a run directory still points at the same files. ``run_dir`` is relative to
the working directory.

``Scenario.to_dict()`` gives the resolved scenario as plain TOML/JSON values (``parse_scenario`` of it
returns an equal Scenario); ``Scenario.to_toml()`` writes it as a TOML document.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from compiler.autodiff import OPTIMIZERS
from compiler.ir import CompileError
from compiler.tuning import LORA_INITS, LoraConfig
from device_runtime.protocol import FAULT_KINDS
from compiler.tuning import STRATEGIES as COMPILER_STRATEGIES
from compiler.tuning import TuningSpec as CompilerTuning


class ScenarioError(ValueError):
    """An invalid scenario; the message is one line naming the file, the key path and the problem."""


# ---- the choices the schema accepts ----------------------------------------------------------------------

# Built-in models: the names of compiler.zoo.ZOO, kept here so reading a scenario does not import onnx
# (tests/fleet/test_scenario.py checks that the two agree).
ZOO_MODELS = ("cct-digits", "cct-2-3x2", "deep-ae", "ds-cnn")
TUNING_STRATEGIES = COMPILER_STRATEGIES
AGGREGATION_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
                          "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan",
                          "fedit", "ffa-lora", "flexlora", "hetlora")
LORA_AGGREGATIONS = ("fedit", "ffa-lora", "flexlora", "hetlora")       # need tuning.strategy = "lora"
MIXED_RANK_AGGREGATIONS = ("flexlora", "hetlora")                     # can combine adapters of different rank
DATA_KINDS = ("digits", "machine-sound", "npz")
RUNTIMES = ("numpy", "qemu", "gvsoc")  # simulated groups; boards on serial lines are [[fleet.boards]]
AVAILABLE_RUNTIMES = ("numpy", "qemu", "gvsoc")  # the others are refused at load until their device backends land
METRICS_AVAILABLE = True                # the exporter (fleet.exporter) has landed
AVAILABILITY_KINDS = ("always", "dropout", "periodic")

# The data kinds a zoo model can learn from (zoo models not listed take any kind).
MODEL_DATA_KINDS = {"cct-digits": ("digits", "npz"), "deep-ae": ("machine-sound", "npz")}
# The models that can learn from a data kind (an .onnx path is always allowed).
DATA_KIND_MODELS = {"machine-sound": ("deep-ae",)}

# The optional [tuning] keys each strategy reads.
TUNING_KEYS = {
    "full": (),
    "selective": ("train", "last_k", "bias_only"),
    "lora": ("rank", "alpha", "targets", "train", "last_k", "bias_only", "init", "rank_from_memory"),
    "sparse": ("sparse", "sparse_from_memory", "train"),
}
# The optional [aggregation] keys each strategy reads, with their defaults (Flower's, except FedAvgM's
# momentum: 0.0 would make it plain FedAvg).
AGGREGATION_DEFAULTS: dict[str, dict[str, float | int]] = {
    "fedavg": {},
    "fedprox": {"proximal_mu": 0.01},
    "fedadam": {"server_lr": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-9},
    "fedyogi": {"server_lr": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedadagrad": {"server_lr": 0.1, "tau": 1e-9},
    "fedavgm": {"server_lr": 1.0, "server_momentum": 0.9},
    "fedmedian": {},
    "fedtrimmedavg": {"beta": 0.2},
    "krum": {"num_malicious_nodes": 0},
    "multikrum": {"num_malicious_nodes": 0, "num_nodes_to_select": 1},
    "bulyan": {"num_malicious_nodes": 0},
    "fedit": {},
    "ffa-lora": {},
    "flexlora": {},
    "hetlora": {},
}
# Server-side differential privacy ([aggregation.dp]): Flower's wrappers, the keys each reads (None: required).
DP_CLIPPING = ("fixed", "adaptive")
DP_KEYS: dict[str, dict[str, float | None]] = {
    "fixed": {"noise_multiplier": None, "clipping_norm": None},
    "adaptive": {"noise_multiplier": None, "initial_clipping_norm": 0.1, "target_clipped_quantile": 0.5,
                 "clip_norm_lr": 0.2, "clipped_count_stddev": None},
}
_DP_TABLE_KEYS = ("clipping", "noise_multiplier", "clipping_norm", "num_sampled_clients", "initial_clipping_norm",
                  "target_clipped_quantile", "clip_norm_lr", "clipped_count_stddev")
# The optional [data] keys each kind reads.
DATA_KEYS = {
    "digits": ("dirichlet_alpha", "samples_per_device", "test_samples_per_device", "writer_strength"),
    "machine-sound": ("samples_per_device", "test_samples_per_device", "writer_strength", "anomaly_fraction"),
    "npz": ("path",),
}
# The keys each availability kind reads.
AVAILABILITY_KEYS = {"always": (), "dropout": ("p",), "periodic": ("on_rounds", "off_rounds", "phase")}

DEFAULT_METRICS_ADDRESS = "127.0.0.1:9464"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ADDRESS_PATTERN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_MAX_SEED = 2**63 - 1

# Every key of the schema, per table, in the order to_dict writes them.
_TOP_KEYS = ("name", "seed", "run_dir", "model", "tuning", "training", "aggregation", "data", "fleet", "ray",
             "metrics")
_SECTION_KEYS = {
    "model": ("name", "pretrain_steps", "pretrain_lr", "pretrain_optimizer"),
    "tuning": ("strategy", "rank", "alpha", "targets", "train", "last_k", "bias_only", "init",
               "rank_from_memory", "sparse", "sparse_from_memory"),
    "training": ("rounds", "fraction", "local_steps", "local_epochs", "batch_size", "lr", "momentum",
                 "evaluate_after"),
    "aggregation": ("strategy", "proximal_mu", "server_lr", "server_momentum", "beta_1", "beta_2", "tau", "beta",
                    "num_malicious_nodes", "num_nodes_to_select", "max_update_norm", "dp"),
    "data": ("kind", "path", "dirichlet_alpha", "samples_per_device", "test_samples_per_device",
             "writer_strength", "anomaly_fraction"),
    "fleet": ("groups", "boards"),
    "ray": ("address", "actors", "devices_per_call", "dashboard"),
    "metrics": ("address", "enabled"),
}
_GROUP_KEYS = ("name", "count", "target", "memory_kib", "clock_mhz", "availability", "link_kbps", "deadline_s",
               "runtime", "faults")
_BOARD_KEYS = ("name", "port", "qemu", "target", "memory_kib", "program", "baud", "resource", "step_timeout_s")
BAUD_RATES = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600, 1000000, 2000000, 3000000)
DEFAULT_BAUD = 115200
DEFAULT_STEP_TIMEOUT_S = 60.0
_RESOURCE_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]+$")
_FAULT_TABLE_KEYS = ("kind", "p")
_AVAILABILITY_TABLE_KEYS = ("kind", "p", "on_rounds", "off_rounds", "phase")


# ---- the typed scenario ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    name: str                   # a zoo model name, or an absolute/relative path ending .onnx
    pretrain_steps: int = 200   # optimizer steps on the non-personalized data before federated tuning
    pretrain_lr: float = 0.05
    pretrain_optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adam" (compiler.pipeline.OPTIMIZERS)

    @property
    def is_onnx(self) -> bool:
        return self.name.endswith(".onnx")


@dataclass(frozen=True)
class TuningSpec:
    """What the devices train: the compiler's own tuning spec (``compiler.tuning.TuningSpec``, one schema
    for `edgefleet compile` and scenarios) plus what only a fleet has: ranks chosen from memory budgets."""
    spec: CompilerTuning = field(default_factory=lambda: CompilerTuning("lora"))
    rank_from_memory: bool = False       # each device's rank chosen from its memory budget
    # each group's sparse scheme chosen for its memory_kib (compiler.sparse_search.choose_sparse); ``spec`` then
    # holds only the strategy's train patterns (strategy "selective" with them, or "full" without)
    sparse_from_memory: bool = False

    @property
    def strategy(self) -> str:
        return "sparse" if self.sparse_from_memory else self.spec.strategy

    @property
    def lora(self) -> LoraConfig | None:
        return self.spec.lora

    @property
    def rank(self) -> int | None:
        return self.spec.lora.rank if self.spec.lora else None

    @property
    def alpha(self) -> float | None:
        return self.spec.lora.alpha if self.spec.lora else None

    @property
    def targets(self) -> tuple[str, ...]:
        return self.spec.lora.targets if self.spec.lora else ()

    @property
    def init(self) -> str | None:
        return self.spec.lora.init if self.spec.lora else None

    @property
    def train(self) -> tuple[str, ...]:
        return self.spec.train

    @property
    def last_k(self) -> int | None:
        return self.spec.last_k

    @property
    def bias_only(self) -> bool:
        return self.spec.bias_only


@dataclass(frozen=True)
class TrainingSpec:
    rounds: int = 10
    fraction: float = 1.0                # share of the fleet asked to train each round, 0 < f <= 1
    local_steps: int | None = 10         # exactly one of local_steps and local_epochs is set
    local_epochs: int | None = None
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.0
    evaluate_after: bool = True          # train jobs evaluate the trained adapters (loss_after, metric_after)


@dataclass(frozen=True)
class AggregationSpec:
    """Server-side aggregation. Options the strategy does not read are None."""
    strategy: str = "fedavg"
    proximal_mu: float | None = None     # fedprox
    server_lr: float | None = None       # fedadam, fedyogi, fedadagrad, fedavgm
    server_momentum: float | None = None  # fedavgm
    beta_1: float | None = None          # fedadam, fedyogi
    beta_2: float | None = None          # fedadam, fedyogi
    tau: float | None = None             # fedadam, fedyogi, fedadagrad
    beta: float | None = None            # fedtrimmedavg: share cut from each end
    num_malicious_nodes: int | None = None  # krum, multikrum, bulyan
    num_nodes_to_select: int | None = None  # multikrum
    max_update_norm: float | None = None  # any: replies whose update (reply - sent) is longer are left out
    dp: "DPSpec | None" = None           # any: Flower's server-side DP clipping wrapper around the strategy


@dataclass(frozen=True)
class DPSpec:
    """Central differential privacy with server-side clipping (Flower's DifferentialPrivacyServerSide*)."""
    clipping: str                        # fixed | adaptive
    noise_multiplier: float
    clipping_norm: float | None = None   # fixed
    num_sampled_clients: int | None = None  # None: the devices sampled per round (fraction x devices)
    initial_clipping_norm: float | None = None  # adaptive
    target_clipped_quantile: float | None = None
    clip_norm_lr: float | None = None
    clipped_count_stddev: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _DP_TABLE_KEYS if getattr(self, k) is not None}


@dataclass(frozen=True)
class DataSpec:
    """Where each device's data comes from. Keys the kind does not read are None."""
    kind: str = "digits"
    path: str | None = None                     # npz: directory of device_<i>.npz
    dirichlet_alpha: float | None = 0.5         # digits: label skew (small = few labels per device)
    samples_per_device: int | None = 32
    test_samples_per_device: int | None = 32
    writer_strength: float | None = 1.0         # digits: writer transforms; machine-sound: machine signature
    anomaly_fraction: float | None = None       # machine-sound: share of anomalies in each test set


@dataclass(frozen=True)
class AlwaysAvailable:
    kind: ClassVar[str] = "always"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclass(frozen=True)
class Dropout:
    """Each round, each device is independently unavailable with probability p."""
    p: float
    kind: ClassVar[str] = "dropout"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "p": self.p}


@dataclass(frozen=True)
class Periodic:
    """On for on_rounds rounds, then off for off_rounds; phase is the offset into that cycle (or "random",
    drawn per device from the scenario seed)."""
    on_rounds: int
    off_rounds: int
    phase: int | str = "random"
    kind: ClassVar[str] = "periodic"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "on_rounds": self.on_rounds, "off_rounds": self.off_rounds,
                "phase": self.phase}


Availability = AlwaysAvailable | Dropout | Periodic


@dataclass(frozen=True)
class Faults:
    """Injected device faults (for studying robustness): each selected device, with probability p, raises
    ("raise"), returns NaN or Inf parameters ("nan", "inf"), a large finite update ("byzantine": every value
    3.0) or a wrongly shaped one ("shape"); device_runtime.protocol.FAULT_KINDS."""
    kind: str
    p: float = 1.0


@dataclass(frozen=True)
class DeviceGroup:
    name: str
    count: int
    target: str = "siracusa"             # a built-in target name, or a path ending .toml
    memory_kib: int | None = None        # device memory budget; None = the target's
    clock_mhz: float | None = None       # None = the target's
    availability: Availability = AlwaysAvailable()
    link_kbps: float = 1000.0            # link bandwidth, each direction
    deadline_s: float | None = None      # straggler deadline per round; None = wait for every device
    runtime: str = "numpy"
    faults: Faults | None = None         # injected faults (robustness studies, tests)


@dataclass(frozen=True)
class BoardSpec:
    """A dev board on a serial line (one device; fleet.boards drives it through a Ray board proxy)."""
    name: str
    port: str | None = None              # pyserial URL or path; None when qemu = true
    qemu: bool = False                   # edgefleet starts a QEMU board with the program on a pty
    target: str = "siracusa"             # the program (and cost model) is the fleet's for this target
    memory_kib: int | None = None        # budget for tuning.rank_from_memory; None = the target's
    program: str | None = None           # the program directory the board was flashed with (checked)
    baud: int = DEFAULT_BAUD
    resource: str | None = None          # the Ray custom resource of the board's node; None = "board:<name>"
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S  # per training / evaluation step on the board

    @property
    def ray_resource(self) -> str:
        return self.resource or f"board:{self.name}"


@dataclass(frozen=True)
class FleetSpec:
    groups: tuple[DeviceGroup, ...]
    boards: tuple[BoardSpec, ...] = ()

    @property
    def device_count(self) -> int:
        return sum(group.count for group in self.groups) + len(self.boards)

    def board_indices(self) -> tuple[tuple[BoardSpec, int], ...]:
        """Each board with its device index: boards are numbered after every group's devices."""
        start = sum(group.count for group in self.groups)
        return tuple((board, start + i) for i, board in enumerate(self.boards))

    def group_ranges(self) -> tuple[tuple[DeviceGroup, range], ...]:
        """Each group with its device indices; devices are numbered group after group from 0."""
        ranges, start = [], 0
        for group in self.groups:
            ranges.append((group, range(start, start + group.count)))
            start += group.count
        return tuple(ranges)


@dataclass(frozen=True)
class RaySpec:
    address: str | None = None           # None = start a local Ray instance
    actors: int = 2                      # device-host actors
    devices_per_call: int = 256          # devices one actor trains in one call
    dashboard: bool = False              # start Ray's dashboard (local runs; on 127.0.0.1)


@dataclass(frozen=True)
class MetricsSpec:
    enabled: bool = False                # serve Prometheus metrics
    address: str | None = None           # host:port; set whenever enabled


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    run_dir: str
    model: ModelSpec
    tuning: TuningSpec
    training: TrainingSpec
    aggregation: AggregationSpec
    data: DataSpec
    fleet: FleetSpec
    ray: RaySpec = RaySpec()
    metrics: MetricsSpec = MetricsSpec()

    @property
    def device_count(self) -> int:
        return self.fleet.device_count

    def to_dict(self) -> dict[str, Any]:
        """The resolved scenario as TOML/JSON values; ``parse_scenario`` of it gives back an equal Scenario."""
        return _scenario_to_dict(self)

    def to_toml(self) -> str:
        return _toml_document(self.to_dict())

    def with_overrides(self, rounds: int | None = None, devices: int | None = None,
                       run_dir: str | None = None) -> "Scenario":
        """A copy with command-line overrides applied. ``devices`` rescales the group counts in proportion
        (largest remainder, every group keeps at least one device) so they total exactly ``devices``;
        boards ([[fleet.boards]]) are physical and stay, and count towards ``devices``."""
        return _with_overrides(self, rounds, devices, run_dir)


# ---- reading ---------------------------------------------------------------------------------------------

def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ScenarioError(f"{source}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ScenarioError(f"{source}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(f"{source}: not valid TOML: {error}") from None
    return parse_scenario(raw, source=source, base_dir=path.resolve().parent)


def parse_scenario(raw: Mapping[str, Any], source: str = "<dict>", base_dir: str | Path | None = None) -> Scenario:
    """Validate a parsed scenario. Relative file paths are resolved against ``base_dir`` when given."""
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"{source}: expected a table of scenario keys, got {_show(raw)}")
    top = _Table(raw, "", source, _TOP_KEYS)
    base = Path(base_dir) if base_dir is not None else None

    name = top.string("name", pattern=_NAME_PATTERN, what="a name of letters, digits, '_', '.' or '-'")
    seed = top.integer("seed", default=0, minimum=0, maximum=_MAX_SEED)
    run_dir = top.string("run_dir", default=f"runs/{name}")
    model = _parse_model(top.table("model", required=True), base)
    tuning = _parse_tuning(top.table("tuning"))
    data = _parse_data(top.table("data"), base)
    training = _parse_training(top.table("training"), data)
    aggregation = _parse_aggregation(top.table("aggregation"))
    fleet = _parse_fleet(top.table("fleet", required=True), base)
    ray = _parse_ray(top.table("ray"))
    metrics = _parse_metrics(top.table("metrics"))
    scenario = Scenario(name=name, seed=seed, run_dir=run_dir, model=model, tuning=tuning, training=training,
                        aggregation=aggregation, data=data, fleet=fleet, ray=ray, metrics=metrics)
    _check_across_sections(scenario, source)
    return scenario


def _parse_model(t: _Table, base: Path | None) -> ModelSpec:
    name = t.string("name", what=f"a zoo model ({', '.join(ZOO_MODELS)}) or a path ending .onnx")
    if name.endswith(".onnx"):
        name = _resolve(name, base)
    elif name not in ZOO_MODELS:
        t.fail_value("name", f"a zoo model ({', '.join(ZOO_MODELS)}) or a path ending .onnx", name, ZOO_MODELS)
    return ModelSpec(name=name,
                     pretrain_steps=t.integer("pretrain_steps", default=ModelSpec.pretrain_steps, minimum=0),
                     pretrain_lr=t.number("pretrain_lr", default=ModelSpec.pretrain_lr, above=0),
                     pretrain_optimizer=t.choice("pretrain_optimizer", OPTIMIZERS, default=ModelSpec.pretrain_optimizer))


def _parse_tuning(t: _Table) -> TuningSpec:
    """Each key's type is checked here (errors name the key path); the values then go to the compiler's
    ``TuningSpec``, whose rules and defaults are the only ones."""
    strategy = t.choice("strategy", TUNING_STRATEGIES, default="lora")
    t.only_for("strategy", strategy, TUNING_KEYS)
    raw: dict[str, Any] = {"strategy": strategy}
    if strategy != "full":
        raw.update(train=t.patterns("train", default=()), last_k=t.integer("last_k", default=None, minimum=1),
                   bias_only=t.boolean("bias_only", default=False))
        if strategy == "selective" and not (raw["train"] or raw["last_k"] or raw["bias_only"]):
            t.fail("train", 'strategy "selective" needs at least one of train, last_k or bias_only = true')
    rank_from_memory = False
    if strategy == "lora":
        raw.update(rank=t.integer("rank", default=LoraConfig.rank, minimum=1),
                   alpha=t.number("alpha", default=None, above=0),
                   targets=t.patterns("targets", default=LoraConfig.targets, non_empty=True),
                   init=t.choice("init", LORA_INITS, default=LoraConfig.init))
        rank_from_memory = t.boolean("rank_from_memory", default=False)
    sparse_from_memory = False
    if strategy == "sparse":
        sparse_from_memory = t.boolean("sparse_from_memory", default=False)
        raw.pop("last_k"), raw.pop("bias_only")
        if sparse_from_memory == t.given("sparse"):
            t.fail("sparse", 'strategy "sparse" needs either a sparse table (layer = "bias" | "1/8" | "1/4" | "1/2" | '
                             '"all" | k) or sparse_from_memory = true (each group\'s scheme chosen for its memory_kib)')
        if sparse_from_memory:  # the scheme comes per group; the spec keeps the train patterns
            raw = {"strategy": "selective", "train": raw["train"]} if raw["train"] else {"strategy": "full"}
        else:
            table = t.raw["sparse"]
            if not isinstance(table, dict) or not all(isinstance(v, (str, int)) for v in table.values()):
                t.fail_value("sparse", 'a table of layer = "bias" | "1/8" | "1/4" | "1/2" | "all" | k', table)
            raw["sparse"] = {k: str(v) for k, v in table.items()}
    try:
        spec = CompilerTuning.parse({k: v for k, v in raw.items() if v is not None})
    except CompileError as exc:
        t.fail("sparse" if strategy == "sparse" else "strategy", str(exc))
    return TuningSpec(spec, rank_from_memory, sparse_from_memory)


def _parse_training(t: _Table, data: DataSpec) -> TrainingSpec:
    if t.given("local_steps") and t.given("local_epochs"):
        t.fail("local_epochs", "set exactly one of local_steps and local_epochs, got both")
    local_epochs = t.integer("local_epochs", default=None, minimum=1)
    local_steps = t.integer("local_steps", default=None if local_epochs else 10, minimum=1)
    batch_size = t.integer("batch_size", default=16, minimum=1)
    if data.samples_per_device is not None and batch_size > data.samples_per_device:
        t.fail("batch_size", f"expected an integer <= data.samples_per_device ({data.samples_per_device}), "
                             f"got {batch_size}")
    return TrainingSpec(rounds=t.integer("rounds", default=10, minimum=1),
                        fraction=t.number("fraction", default=1.0, above=0, maximum=1),
                        local_steps=local_steps, local_epochs=local_epochs, batch_size=batch_size,
                        lr=t.number("lr", default=0.01, above=0),
                        momentum=t.number("momentum", default=0.0, minimum=0, below=1),
                        evaluate_after=t.boolean("evaluate_after", default=True))


def _parse_aggregation(t: _Table) -> AggregationSpec:
    strategy = t.choice("strategy", AGGREGATION_STRATEGIES, default="fedavg")
    defaults = AGGREGATION_DEFAULTS[strategy]
    common = ("max_update_norm", "dp")
    t.only_for("strategy", strategy, {name: tuple(options) + common for name, options in AGGREGATION_DEFAULTS.items()})
    limits = {"proximal_mu": {"minimum": 0}, "server_lr": {"above": 0}, "server_momentum": {"minimum": 0, "below": 1},
              "beta_1": {"minimum": 0, "below": 1}, "beta_2": {"minimum": 0, "below": 1}, "tau": {"above": 0},
              "beta": {"minimum": 0, "below": 0.5}, "num_malicious_nodes": {"minimum": 0},
              "num_nodes_to_select": {"minimum": 1}}
    options = {key: (t.integer if isinstance(default, int) else t.number)(key, default=default, **limits[key])
               for key, default in defaults.items()}
    return AggregationSpec(strategy=strategy, **options,
                           max_update_norm=t.number("max_update_norm", default=None, above=0),
                           dp=_parse_dp(t.table("dp")) if t.given("dp") else None)


def _parse_dp(t: _Table) -> DPSpec:
    clipping = t.choice("clipping", DP_CLIPPING)
    t.only_for("clipping", clipping, {k: tuple(keys) + ("num_sampled_clients",) for k, keys in DP_KEYS.items()})
    limits = {"noise_multiplier": {"minimum": 0}, "clipping_norm": {"above": 0}, "initial_clipping_norm": {"above": 0},
              "target_clipped_quantile": {"minimum": 0, "maximum": 1}, "clip_norm_lr": {"above": 0},
              "clipped_count_stddev": {"minimum": 0}}
    required = ("noise_multiplier", "clipping_norm")
    values = {key: t.number(key, **({} if key in required else {"default": default}), **limits[key])
              for key, default in DP_KEYS[clipping].items()}
    return DPSpec(clipping=clipping, num_sampled_clients=t.integer("num_sampled_clients", default=None, minimum=1),
                  **values)


def _parse_data(t: _Table, base: Path | None) -> DataSpec:
    kind = t.choice("kind", DATA_KINDS, default="digits")
    t.only_for("kind", kind, DATA_KEYS)
    if kind == "npz":
        return DataSpec(kind="npz", path=_resolve(t.string("path", what="a directory of device_<i>.npz files"), base),
                        dirichlet_alpha=None, samples_per_device=None, test_samples_per_device=None,
                        writer_strength=None)
    return DataSpec(
        kind=kind,
        dirichlet_alpha=t.number("dirichlet_alpha", default=0.5, above=0) if kind == "digits" else None,
        samples_per_device=t.integer("samples_per_device", default=32, minimum=1),
        test_samples_per_device=t.integer("test_samples_per_device", default=32, minimum=1),
        writer_strength=t.number("writer_strength", default=1.0, minimum=0, maximum=3),
        anomaly_fraction=(t.number("anomaly_fraction", default=0.5, minimum=0, maximum=1)
                          if kind == "machine-sound" else None))


def _parse_fleet(t: _Table, base: Path | None) -> FleetSpec:
    tables = t.table_list("groups")
    groups = tuple(_parse_group(group, index, base) for index, group in enumerate(tables))
    seen: dict[str, int] = {}
    for index, group in enumerate(groups):
        if group.name in seen:
            raise ScenarioError(f"{t.source}: fleet.groups[{index}].name: expected a unique group name, got "
                                f"{_show(group.name)} (also fleet.groups[{seen[group.name]}])")
        seen[group.name] = index
    boards = tuple(_parse_board(board, base) for board in (t.table_list("boards", required=False)))
    for index, board in enumerate(boards):
        path = f"fleet.boards[{index}]"
        if board.name in seen:
            raise ScenarioError(f"{t.source}: {path}.name: expected a name no group or other board has, got "
                                f"{_show(board.name)} (also fleet.groups[{seen[board.name]}])")
        for other, earlier in enumerate(boards[:index]):
            for key in ("name", "port", "ray_resource"):
                value = getattr(board, key)
                if value is not None and value == getattr(earlier, key):
                    shown = "resource" if key == "ray_resource" else key
                    raise ScenarioError(f"{t.source}: {path}.{shown}: expected one board per {shown}, got "
                                        f"{_show(value)} (also fleet.boards[{other}])")
    return FleetSpec(groups=groups, boards=boards)


def _parse_board(t: _Table, base: Path | None) -> BoardSpec:
    name = t.string("name", pattern=_NAME_PATTERN, what="a name of letters, digits, '_', '.' or '-'")
    qemu = t.boolean("qemu", default=False)
    port = t.string("port", default=None, what='a port path or pyserial URL ("/dev/ttyUSB0", "socket://host:port")')
    if qemu and port is not None:
        t.fail("port", "not used with qemu = true (edgefleet starts the QEMU board and opens its pty)")
    if not qemu and port is None:
        t.fail("port", 'missing required key, expected the board\'s port ("/dev/ttyUSB0", "socket://host:port"), '
                       "or qemu = true for an emulated board")
    target = t.string("target", default="siracusa", pattern=re.compile(r"^([a-z0-9][a-z0-9_-]*|.+\.toml)$"),
                      what='a target name such as "siracusa" or a path ending .toml')
    program = t.string("program", default=None, what="a program directory (edgefleet compile -o DIR)")
    baud = t.integer("baud", default=DEFAULT_BAUD, minimum=1)
    if baud not in BAUD_RATES:
        t.fail_value("baud", f"a standard baud rate ({', '.join(map(str, BAUD_RATES))})", baud)
    return BoardSpec(name=name, port=port, qemu=qemu,
                     target=_resolve(target, base) if target.endswith(".toml") else target,
                     memory_kib=t.integer("memory_kib", default=None, minimum=1),
                     program=_resolve(program, base) if program is not None else None, baud=baud,
                     resource=t.string("resource", default=None, pattern=_RESOURCE_PATTERN,
                                       what="a Ray resource name of letters, digits, '_', '.', ':' or '-'"),
                     step_timeout_s=t.number("step_timeout_s", default=DEFAULT_STEP_TIMEOUT_S, above=0))


def _parse_group(t: _Table, index: int, base: Path | None) -> DeviceGroup:
    name = t.string("name", default=f"group{index}", pattern=_NAME_PATTERN,
                    what="a name of letters, digits, '_', '.' or '-'")
    count = t.integer("count", minimum=1)
    target = t.string("target", default="siracusa", pattern=re.compile(r"^([a-z0-9][a-z0-9_-]*|.+\.toml)$"),
                      what='a target name such as "siracusa" or a path ending .toml')
    if target.endswith(".toml"):
        target = _resolve(target, base)
    if t.raw.get("runtime") == "serial":
        t.fail("runtime", "boards on serial lines are listed as [[fleet.boards]] (one table per board, with its "
                          "port), not as a group")
    runtime = t.choice("runtime", RUNTIMES, default="numpy")
    if runtime not in AVAILABLE_RUNTIMES:
        t.fail("runtime", f'"{runtime}" devices are not available in fleet runs yet (available: '
                          f'{_choices(AVAILABLE_RUNTIMES)})')
    if runtime == "gvsoc":
        _check_gvsoc(t, target)
    return DeviceGroup(name=name, count=count, target=target,
                       memory_kib=t.integer("memory_kib", default=None, minimum=1),
                       clock_mhz=t.number("clock_mhz", default=None, above=0),
                       availability=_parse_availability(t.table("availability")),
                       link_kbps=t.number("link_kbps", default=DeviceGroup.link_kbps, above=0),
                       deadline_s=t.number("deadline_s", default=None, above=0),
                       runtime=runtime, faults=_parse_faults(t))


def _check_gvsoc(t: _Table, target: str) -> None:
    """A GVSoC group runs the siracusa firmware: a siracusa target, and a GVSoC to run it on (found now, so that a
    run does not fail at its first round)."""
    from device_runtime.device import DeviceError
    from device_runtime.gvsoc import find_gvsoc
    if not Path(target).stem.startswith("siracusa"):
        t.fail("target", f'runtime = "gvsoc" runs the siracusa firmware: expected a siracusa target, got "{target}"')
    try:
        find_gvsoc()
    except DeviceError as exc:
        t.fail("runtime", str(exc))


def _parse_faults(group: _Table) -> "Faults | None":
    if "faults" not in group.raw:
        return None
    t = group.table("faults")
    return Faults(kind=t.choice("kind", FAULT_KINDS), p=t.number("p", default=1.0, minimum=0, maximum=1))


def _parse_availability(t: _Table) -> Availability:
    kind = t.choice("kind", AVAILABILITY_KINDS, default="always")
    t.only_for("kind", kind, AVAILABILITY_KEYS)
    if kind == "always":
        return AlwaysAvailable()
    if kind == "dropout":
        return Dropout(p=t.number("p", minimum=0, below=1))
    on_rounds = t.integer("on_rounds", minimum=1)
    off_rounds = t.integer("off_rounds", minimum=0)
    phase = t.raw.get("phase", "random")
    if phase != "random" and not (_is_int(phase) and 0 <= phase < on_rounds + off_rounds):
        t.fail("phase", f'expected "random" or an integer in [0, {on_rounds + off_rounds - 1}], got {_show(phase)}')
    return Periodic(on_rounds=on_rounds, off_rounds=off_rounds, phase=phase)


def _parse_ray(t: _Table) -> RaySpec:
    return RaySpec(address=t.string("address", default=None),
                   actors=t.integer("actors", default=RaySpec.actors, minimum=1),
                   devices_per_call=t.integer("devices_per_call", default=RaySpec.devices_per_call, minimum=1),
                   dashboard=t.boolean("dashboard", default=False))


def _parse_metrics(t: _Table) -> MetricsSpec:
    address = t.string("address", default=None, pattern=_ADDRESS_PATTERN, what='a "host:port" address')
    if address is not None and int(_ADDRESS_PATTERN.match(address).group(2)) > 65535:
        t.fail("address", f"expected a port in [0, 65535], got {_show(address)}")
    enabled = t.boolean("enabled", default=address is not None)
    if enabled and not METRICS_AVAILABLE:
        t.fail("enabled" if t.given("enabled") else "address",
               "the metrics exporter is not available yet: remove the [metrics] table")
    if enabled and address is None:
        address = DEFAULT_METRICS_ADDRESS
    return MetricsSpec(enabled=enabled, address=address)


def _check_across_sections(s: Scenario, source: str) -> None:
    def fail(path: str, message: str) -> None:
        raise ScenarioError(f"{source}: {path}: {message}")

    strategy = s.aggregation.strategy
    if strategy in LORA_AGGREGATIONS and s.tuning.strategy != "lora":
        fail("aggregation.strategy", f'"{strategy}" aggregates LoRA adapters and needs tuning.strategy = "lora", '
                                     f'got "{s.tuning.strategy}"')
    if s.tuning.sparse_from_memory:
        for i, group in enumerate(s.fleet.groups):
            if group.memory_kib is None:
                fail(f"fleet.groups[{i}].memory_kib", "tuning.sparse_from_memory chooses each group's sparse scheme "
                                                      "for its memory budget: give memory_kib")
    if s.tuning.rank_from_memory and strategy not in MIXED_RANK_AGGREGATIONS:
        fail("tuning.rank_from_memory", "devices of different rank need aggregation.strategy "
                                        f'"flexlora" or "hetlora", got "{strategy}"')
    if s.aggregation.dp is not None and strategy in MIXED_RANK_AGGREGATIONS:
        fail("aggregation.dp", f'DP clipping compares each reply with the global adapters and needs one rank for '
                               f'every device; "{strategy}" mixes ranks')
    if strategy == "ffa-lora" and s.tuning.init == "random":
        fail("tuning.init", f'"ffa-lora" keeps A frozen at its random start and needs B to start at zero '
                            f'(init = "zero_b" or "gaussian"), got "{s.tuning.init}"')
    model = s.model.name
    if model in MODEL_DATA_KINDS and s.data.kind not in MODEL_DATA_KINDS[model]:
        fail("data.kind", f'model "{model}" needs one of {_choices(MODEL_DATA_KINDS[model])}, got "{s.data.kind}"')
    if s.data.kind in DATA_KIND_MODELS and not s.model.is_onnx and model not in DATA_KIND_MODELS[s.data.kind]:
        fail("model.name", f'data.kind "{s.data.kind}" needs one of {_choices(DATA_KIND_MODELS[s.data.kind])} '
                           f'or an .onnx model, got "{model}"')


# ---- overrides and writing -------------------------------------------------------------------------------

def _with_overrides(s: Scenario, rounds: int | None, devices: int | None, run_dir: str | None) -> Scenario:
    if rounds is not None:
        if not _is_int(rounds) or rounds < 1:
            raise ScenarioError(f"override: training.rounds: expected an integer >= 1, got {_show(rounds)}")
        s = dataclasses.replace(s, training=dataclasses.replace(s.training, rounds=rounds))
    if run_dir is not None:
        if not isinstance(run_dir, str) or not run_dir:
            raise ScenarioError(f"override: run_dir: expected a non-empty string, got {_show(run_dir)}")
        s = dataclasses.replace(s, run_dir=run_dir)
    if devices is not None:
        s = dataclasses.replace(s, fleet=dataclasses.replace(s.fleet, groups=_rescale(s.fleet, devices)))
    return s


def _rescale(fleet: FleetSpec, devices: int) -> tuple[DeviceGroup, ...]:
    groups = fleet.groups
    fixed = len(fleet.boards)
    scalable = list(range(len(groups)))
    least = fixed + len(scalable)
    if not _is_int(devices) or devices < least:
        expected = f">= {least} (one per simulated group" + (f" plus {fixed} boards)" if fixed else ")")
        raise ScenarioError(f"override: devices: expected an integer {expected}, got {_show(devices)}")
    counts = _largest_remainder([groups[i].count for i in scalable], devices - fixed)
    new = list(groups)
    for i, count in zip(scalable, counts):
        new[i] = dataclasses.replace(groups[i], count=count)
    return tuple(new)


def _largest_remainder(weights: Sequence[int], total: int) -> list[int]:
    """Integers in proportion to ``weights`` summing to ``total``, each at least 1 (needs total >= len)."""
    whole = sum(weights)
    shares = [total * w / whole for w in weights]
    counts = [math.floor(share) for share in shares]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - shares[i], i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    while min(counts) < 1:  # a tiny group rounded to zero borrows from the largest
        counts[counts.index(min(counts))] += 1
        counts[counts.index(max(counts))] -= 1
    return counts


def _scenario_to_dict(s: Scenario) -> dict[str, Any]:
    def fields(obj: Any, keys: Sequence[str]) -> dict[str, Any]:
        values = {key: getattr(obj, key) for key in keys}
        return {key: list(v) if isinstance(v, tuple) else v for key, v in values.items() if v is not None}

    groups = []
    for g in s.fleet.groups:
        group = fields(g, [k for k in _GROUP_KEYS if k not in ("availability", "faults")])
        group["availability"] = g.availability.to_dict()
        if g.faults is not None:
            group["faults"] = {"kind": g.faults.kind, "p": g.faults.p}
        groups.append({key: group[key] for key in _GROUP_KEYS if key in group})
    boards = [fields(b, _BOARD_KEYS) for b in s.fleet.boards]
    return {
        "name": s.name,
        "seed": s.seed,
        "run_dir": s.run_dir,
        "model": fields(s.model, _SECTION_KEYS["model"]),
        "tuning": _tuning_dict(s.tuning),
        "training": fields(s.training, _SECTION_KEYS["training"]),
        "aggregation": _aggregation_dict(s.aggregation),
        "data": fields(s.data, ("kind",) + DATA_KEYS[s.data.kind]),
        "fleet": {"groups": groups, **({"boards": boards} if boards else {})},
        "ray": fields(s.ray, _SECTION_KEYS["ray"]),
        "metrics": fields(s.metrics, _SECTION_KEYS["metrics"]),
    }


def _tuning_dict(t: TuningSpec) -> dict[str, Any]:
    out = {k: v for k, v in t.spec.to_dict().items() if k != "seed" and v not in ([], None)}
    if t.rank_from_memory:
        out["rank_from_memory"] = True
    if t.sparse_from_memory:
        out = {"strategy": "sparse", "sparse_from_memory": True, **({"train": out["train"]} if "train" in out else {})}
    return out


def _aggregation_dict(a: AggregationSpec) -> dict[str, Any]:
    keys = ("strategy",) + tuple(AGGREGATION_DEFAULTS[a.strategy]) + ("max_update_norm",)
    out = {key: getattr(a, key) for key in keys if getattr(a, key) is not None}
    if a.dp is not None:
        out["dp"] = a.dp.to_dict()
    return out


def _toml_document(document: Mapping[str, Any]) -> str:
    """TOML for a dict of scalars, lists, tables and arrays of tables (the shapes ``to_dict`` produces)."""
    lines: list[str] = []

    def write_table(table: Mapping[str, Any], header: str | None, inline_tables: bool = False) -> None:
        entries = [(key, value) for key, value in table.items()
                   if not _is_table_list(value) and (inline_tables or not isinstance(value, dict))]
        if header and (entries or inline_tables):
            lines.extend(["", header])
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in entries)

    def walk(table: Mapping[str, Any], prefix: str, header: str | None) -> None:
        write_table(table, header)
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.", f"[{prefix}{key}]")
            elif _is_table_list(value):
                for item in value:  # tables inside array items are written inline
                    write_table(item, f"[[{prefix}{key}]]", inline_tables=True)

    walk(document, "", None)
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


# ---- the typed reader behind every error message ---------------------------------------------------------

_REQUIRED = object()


class _Table:
    """Typed access to one table of the raw scenario. Unknown keys are refused on construction; each getter
    checks type and range and names the full key path in its error."""

    def __init__(self, raw: Mapping[str, Any], path: str, source: str, allowed: Sequence[str]):
        self.raw, self.path, self.source, self.allowed = raw, path, source, tuple(allowed)
        for key, value in raw.items():
            if key not in self.allowed:
                self._unknown(key, value)

    # -- errors --
    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str) -> None:
        raise ScenarioError(f"{self.source}: {self.where(key)}: {message}")

    def fail_value(self, key: str, expected: str, value: Any, choices: Sequence[str] = ()) -> None:
        hint = ""
        if isinstance(value, str) and choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
        self.fail(key, f"expected {expected}, got {_show(value)}{hint}")

    def _unknown(self, key: str, value: Any) -> None:
        wrong = self.where(key)
        if isinstance(value, dict) and value:  # a misspelt table: show the first key inside it
            wrong = f"{wrong}.{next(iter(value))}"
        close = difflib.get_close_matches(wrong, _known_paths(self.path), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; expected one of: {', '.join(self.allowed)}"
        raise ScenarioError(f"{self.source}: unknown key '{wrong}'{hint}")

    # -- presence --
    def given(self, key: str) -> bool:
        return key in self.raw

    def _get(self, key: str, default: Any, expected: str) -> Any:
        if key in self.raw:
            return self.raw[key]
        if default is _REQUIRED:
            self.fail(key, f"missing required key, expected {expected}")
        return default

    def only_for(self, selector: str, selected: str, keys_by_choice: Mapping[str, Sequence[str]]) -> None:
        """Refuse keys that only another choice of ``selector`` reads."""
        for key in self.raw:
            if key != selector and key not in keys_by_choice[selected]:
                users = [choice for choice, keys in keys_by_choice.items() if key in keys]
                self.fail(key, f"only used when {selector} is {_choices(users)}, got {selector} = \"{selected}\"")

    # -- typed getters --
    def integer(self, key: str, default: Any = _REQUIRED, minimum: int | None = None,
                maximum: int | None = None) -> Any:
        expected = "an integer" + _range_text(minimum, maximum, None, None)
        value = self._get(key, default, expected)
        if value is default and key not in self.raw:
            return value
        if not _is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            self.fail_value(key, expected, value)
        return value

    def number(self, key: str, default: Any = _REQUIRED, minimum: float | None = None, maximum: float | None = None,
               above: float | None = None, below: float | None = None) -> Any:
        expected = "a number" + _range_text(minimum, maximum, above, below)
        value = self._get(key, default, expected)
        if value is default and key not in self.raw:
            return value
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
              and (above is None or value > above) and (below is None or value < below))
        if not ok:
            self.fail_value(key, expected, value)
        return float(value)

    def boolean(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default, "true or false")
        if not isinstance(value, bool):
            self.fail_value(key, "true or false", value)
        return value

    def string(self, key: str, default: Any = _REQUIRED, pattern: re.Pattern[str] | None = None,
               what: str = "a non-empty string") -> Any:
        value = self._get(key, default, what)
        if value is default and key not in self.raw:
            return value
        if not isinstance(value, str) or not value or (pattern is not None and not pattern.match(value)):
            self.fail_value(key, what, value)
        return value

    def choice(self, key: str, choices: Sequence[str], default: Any = _REQUIRED) -> str:
        expected = f"one of {_choices(choices)}"
        value = self._get(key, default, expected)
        if value not in choices or not isinstance(value, str):
            self.fail_value(key, expected, value, choices)
        return value

    def patterns(self, key: str, default: Any = _REQUIRED, non_empty: bool = False) -> tuple[str, ...]:
        expected = "a list of glob patterns" + (" (at least one)" if non_empty else "")
        value = self._get(key, default, expected)
        if isinstance(value, tuple) and key not in self.raw:
            return value
        if (not isinstance(value, (list, tuple)) or (non_empty and not value)
                or not all(isinstance(item, str) and item for item in value)):
            self.fail_value(key, expected, value)
        return tuple(value)

    def table(self, key: str, required: bool = False) -> "_Table":
        value = self._get(key, _REQUIRED if required else {}, "a table")
        if not isinstance(value, dict):
            self.fail_value(key, "a table", value)
        return _Table(value, self.where(key), self.source, _allowed_keys(self.where(key)))

    def table_list(self, key: str, required: bool = True) -> list["_Table"]:
        expected = f"an array of tables ([[{self.where(key)}]])" + (", at least one" if required else "")
        value = self._get(key, _REQUIRED if required else [], expected)
        if value == [] and not required:
            return []
        if not _is_table_list(value):
            self.fail_value(key, expected, value)
        return [_Table(item, f"{self.where(key)}[{i}]", self.source, _allowed_keys(f"{self.where(key)}[{i}]"))
                for i, item in enumerate(value)]


def _allowed_keys(path: str) -> tuple[str, ...]:
    if path in _SECTION_KEYS:
        return _SECTION_KEYS[path]
    if path == "aggregation.dp":
        return _DP_TABLE_KEYS
    if re.fullmatch(r"fleet\.groups\[\d+\]", path):
        return _GROUP_KEYS
    if re.fullmatch(r"fleet\.boards\[\d+\]", path):
        return _BOARD_KEYS
    if re.fullmatch(r"fleet\.groups\[\d+\]\.availability", path):
        return _AVAILABILITY_TABLE_KEYS
    if re.fullmatch(r"fleet\.groups\[\d+\]\.faults", path):
        return _FAULT_TABLE_KEYS
    raise AssertionError(f"no schema for table {path!r}")  # a bug in this module, not in the scenario


def _known_paths(near: str) -> list[str]:
    """Every key path of the schema, with group paths numbered like ``near`` (for did-you-mean hints)."""
    match = re.match(r"fleet\.(groups|boards)\[(\d+)\]", near)
    group = f"fleet.groups[{match.group(2) if match else 0}]"
    board = f"fleet.boards[{match.group(2) if match else 0}]"
    paths = list(_TOP_KEYS)
    paths += [f"{section}.{key}" for section, keys in _SECTION_KEYS.items() for key in keys]
    paths += [f"{group}.{key}" for key in _GROUP_KEYS]
    paths += [f"{board}.{key}" for key in _BOARD_KEYS]
    paths += [f"{group}.availability.{key}" for key in _AVAILABILITY_TABLE_KEYS]
    paths += [f"{group}.faults.{key}" for key in _FAULT_TABLE_KEYS]
    paths += [f"aggregation.dp.{key}" for key in _DP_TABLE_KEYS]
    return paths


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _range_text(minimum: float | None, maximum: float | None, above: float | None, below: float | None) -> str:
    low = (f"[{minimum:g}" if minimum is not None else f"({above:g}" if above is not None else None)
    high = (f"{maximum:g}]" if maximum is not None else f"{below:g})" if below is not None else None)
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" >= {minimum:g}" if minimum is not None else f" > {above:g}"
    if high:
        return f" <= {maximum:g}" if maximum is not None else f" < {below:g}"
    return ""


def _choices(choices: Sequence[str]) -> str:
    return ", ".join(f'"{choice}"' for choice in choices)


def _show(value: Any, limit: int = 60) -> str:
    """A found value as it would look in TOML, shortened to fit one line."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        text = json.dumps(value, default=str)
    except ValueError:
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _resolve(path: str, base: Path | None) -> str:
    return str(base / path) if base is not None and not Path(path).is_absolute() else path
