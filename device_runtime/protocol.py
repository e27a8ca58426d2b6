"""The device protocol: what the fleet asks of any device (a ``Job``) and what it answers (a ``JobResult``).

One module, one contract. The simulated hosts (numpy, batched), QEMU, GVSoC, board proxies and the Flower
ClientApp all take a ``Job`` and return a ``JobResult``; the fleet builds every Job with ``make_job``.
Both cross process boundaries (Ray, a serial link's host side) as ``to_dict()`` — builtins and numpy arrays
only, never pickled objects of ours — and come back with ``from_dict``.

Instructions:
  train        evaluate the received arrays, run ``steps`` local SGD steps from them, evaluate again (unless
               ``evaluate_after`` is off), send the trained arrays back;
  evaluate     evaluate the received arrays on the device's test data (nothing sent back but numbers);
  personalize  like train, but the trained arrays stay on the device (nothing sent back but numbers).

``config`` holds the strategy's configuration keys that the device honours (``HONOURED_CONFIG_KEYS``);
``INFORMATIONAL_CONFIG_KEYS`` are accepted and ignored. A key outside both is refused by ``check_config``:
a strategy that sends an instruction no device carries out is an error, not a silent no-op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

PROTOCOL_VERSION = 1
INSTRUCTIONS = ("train", "evaluate", "personalize")

# Strategy configuration keys a device carries out (sent by strategies in a Flower ConfigRecord)
PROXIMAL_MU_KEY = "proximal-mu"      # FedProx: SGD with a proximal pull towards the received arrays
LR_KEY = "lr"                        # local learning rate
LOCAL_STEPS_KEY = "local-steps"      # local SGD steps

# faults a simulated device can be told to show (scenario fleet.groups[].faults; fleet.host.inject_fault):
# raise an error, send NaN or Inf arrays (what overflowing values give), a Byzantine update (finite but
# large: every value BYZANTINE_VALUE), or arrays of the wrong shape
FAULT_KINDS = ("raise", "nan", "inf", "byzantine", "shape")
BYZANTINE_VALUE = 3.0
FREEZE_LORA_A_KEY = "freeze-lora-a"  # FFA-LoRA: A stays as received (the program compiles A frozen)
LORA_RANK_KEY = "lora-rank"          # HetLoRA / FlexLoRA: the rank the device trains at
PRUNE_GAMMA_KEY = "lora-prune-gamma" # HetLoRA: self-pruning strength (applied on the server)
HONOURED_CONFIG_KEYS = frozenset({PROXIMAL_MU_KEY, LR_KEY, LOCAL_STEPS_KEY, FREEZE_LORA_A_KEY, LORA_RANK_KEY,
                                  PRUNE_GAMMA_KEY})
INFORMATIONAL_CONFIG_KEYS = frozenset({"server-round"})

# Causes of a failed job (JobResult.cause); the round log counts failures by these
CAUSE_ERROR = "error"                # the device raised / the program failed
CAUSE_NONFINITE = "nonfinite"        # the device produced NaN/Inf
CAUSE_TIMEOUT = "timeout"            # no answer before the deadline
CAUSE_DISCONNECTED = "disconnected"  # the link to the device broke (boards)
CAUSE_OFFLINE = "offline"            # not available this round (availability schedule)
CAUSE_DROPOUT = "dropout"            # dropped out mid-round (expected in simulation, not a failure)
CAUSE_STRAGGLER = "straggler"        # would miss the round's deadline on its target
CAUSES = (CAUSE_ERROR, CAUSE_NONFINITE, CAUSE_TIMEOUT, CAUSE_DISCONNECTED, CAUSE_OFFLINE, CAUSE_DROPOUT,
          CAUSE_STRAGGLER)
EXPECTED_CAUSES = frozenset({CAUSE_OFFLINE, CAUSE_DROPOUT})  # availability, not failures

Scalar = bool | int | float | str


class ProtocolError(ValueError):
    """A Job or JobResult that does not follow the protocol; one line naming the field."""


def check_config(config: Mapping[str, Any], where: str = "strategy config") -> None:
    """Refuse configuration keys that no device honours."""
    unknown = sorted(set(config) - HONOURED_CONFIG_KEYS - INFORMATIONAL_CONFIG_KEYS)
    if unknown:
        raise ProtocolError(f"{where}: key(s) {', '.join(map(repr, unknown))} are sent to devices but no device "
                            f"honours them (honoured: {', '.join(sorted(HONOURED_CONFIG_KEYS))})")


@dataclass(frozen=True)
class Job:
    instruction: str                                   # one of INSTRUCTIONS
    device: int                                        # the device's index in the fleet
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)  # arrays sent down (often shared by jobs)
    steps: int = 0                                     # local SGD steps (train, personalize)
    lr: float = 0.0                                    # local learning rate
    config: Mapping[str, Scalar] = field(default_factory=dict)  # honoured strategy keys (check_config)
    seed: int = 0                                      # the device's data and any randomness
    round: int = 0                                     # the server round (0: outside rounds)
    deadline_s: float | None = None                    # wall-clock budget for the job; None: no deadline
    fault: str = ""                                    # simulate this fault (FAULT_KINDS; scenarios, tests)
    evaluate_after: bool = True                        # train: evaluate the trained arrays too (loss_after,
                                                       # metric_after); personalize always does

    def __post_init__(self) -> None:
        if self.instruction not in INSTRUCTIONS:
            raise ProtocolError(f"job instruction {self.instruction!r}: expected one of {', '.join(INSTRUCTIONS)}")
        if self.steps < 0:
            raise ProtocolError(f"job for device {self.device}: steps {self.steps} < 0")

    @property
    def trains(self) -> bool:
        return self.instruction in ("train", "personalize")

    @property
    def evaluates_after(self) -> bool:
        """Whether the job ends with an evaluation of the trained arrays."""
        return self.instruction == "personalize" or (self.instruction == "train" and self.evaluate_after)

    @property
    def proximal_mu(self) -> float:
        return float(self.config.get(PROXIMAL_MU_KEY, 0.0))

    def to_dict(self, arrays_key: str | None = None) -> dict[str, Any]:
        """Builtins and numpy arrays only. With ``arrays_key`` the arrays are left out and named by that key
        (``encode_jobs`` sends each distinct set of arrays once)."""
        out = {name: getattr(self, name) for name in _JOB_FIELDS}
        out["config"] = dict(self.config)
        out["arrays"] = arrays_key if arrays_key is not None else dict(self.arrays)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any],
                  tables: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> "Job":
        raw = dict(raw)
        arrays = raw.get("arrays", {})
        if isinstance(arrays, str):
            if tables is None or arrays not in tables:
                raise ProtocolError(f"job for device {raw.get('device')}: arrays {arrays!r} not in the call's tables")
            arrays = tables[arrays]
        unknown = set(raw).difference(_JOB_FIELDS)
        if unknown:
            raise ProtocolError(f"job: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**{**raw, "arrays": arrays})


def make_job(instruction: str, device: int, arrays: Mapping[str, np.ndarray], *, steps: int = 0,
             lr: float = 0.0, config: Mapping[str, Scalar] | None = None, seed: int = 0, round: int = 0,
             deadline_s: float | None = None, fault: str = "", evaluate_after: bool = True) -> Job:
    """The one way the fleet builds a Job: the strategy's config is checked (unknown keys refused) and its
    learning-rate / step keys, when present, take precedence over the scenario's defaults."""
    config = dict(config or {})
    check_config(config)
    steps = int(config.get(LOCAL_STEPS_KEY, steps))
    lr = float(config.get(LR_KEY, lr))
    honoured = {k: v for k, v in config.items() if k in HONOURED_CONFIG_KEYS}
    return Job(instruction, int(device), arrays, steps if instruction != "evaluate" else 0, lr, honoured,
               int(seed), int(round), deadline_s, fault, bool(evaluate_after))


_JOB_FIELDS = tuple(f.name for f in fields(Job))  # (dataclasses.fields() rebuilds its tuple on each call)


def encode_jobs(jobs: Sequence[Job]) -> dict[str, Any]:
    """Jobs for one call across a process boundary: each distinct arrays mapping is sent once."""
    keys: dict[int, str] = {}
    tables: dict[str, dict[str, np.ndarray]] = {}
    encoded = []
    for job in jobs:
        key = keys.get(id(job.arrays))
        if key is None:
            key = keys[id(job.arrays)] = f"a{len(keys)}"
            tables[key] = dict(job.arrays)
        encoded.append(job.to_dict(arrays_key=key))
    return {"version": PROTOCOL_VERSION, "tables": tables, "jobs": encoded}


def decode_jobs(payload: Mapping[str, Any]) -> list[Job]:
    if payload.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(f"jobs of protocol version {payload.get('version')!r}; this side speaks {PROTOCOL_VERSION}")
    tables = payload["tables"]
    return [Job.from_dict(raw, tables) for raw in payload["jobs"]]


@dataclass(frozen=True)
class Telemetry:
    """What a device measured (or its target's model predicts) while running one job."""
    samples: int = 0                     # training samples processed
    steps: int = 0                       # SGD steps run
    wall_s: float = 0.0                  # host wall time of the job
    modelled_cycles_per_step: int = 0    # the target's cost model (0: no target model)
    measured_cycles: int = 0             # counted on the device (QEMU icount, GVSoC, board); 0: not measured
    instructions: int = 0                # counted on the device; 0: not counted
    peak_bytes_by_level: Mapping[str, int] = field(default_factory=dict)  # the plan's peak per memory level
    bytes_down: int = 0                  # arrays received
    bytes_up: int = 0                    # arrays sent back
    link_s: float = 0.0                  # time on the link to the device (boards), or modelled link time
    link_bytes: int = 0                  # bytes over the link both ways, data and framing included (boards)
    modelled_s: float = 0.0              # the job's compute time on the target by its cost model (0: no model)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _TELEMETRY_FIELDS}
        out["peak_bytes_by_level"] = dict(self.peak_bytes_by_level)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Telemetry":
        return cls(**{k: v for k, v in raw.items() if k in _TELEMETRY_FIELDS})


# listed once: dataclasses.fields() rebuilds its tuple on every call (a Telemetry per job, thousands a round)
_TELEMETRY_FIELDS = tuple(f.name for f in fields(Telemetry))


NAN = float("nan")


@dataclass(frozen=True)
class JobResult:
    device: int
    instruction: str
    cause: str = ""                      # "" when the job succeeded, else one of CAUSES
    error: str = ""                      # one line saying what went wrong
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)  # trained arrays (train only)
    num_examples: int = 0                # samples the numbers below are over (train: training samples)
    loss_before: float = NAN             # on the test data with the received arrays
    metric_before: float = NAN           # the task metric (accuracy, AUC) with the received arrays
    loss: float = NAN                    # mean training loss over the steps
    loss_after: float = NAN              # after training (train, personalize)
    metric_after: float = NAN
    telemetry: Telemetry = field(default_factory=Telemetry)

    @property
    def ok(self) -> bool:
        return not self.cause

    @classmethod
    def failed(cls, job: Job, cause: str, error: str, telemetry: Telemetry | None = None) -> "JobResult":
        if cause not in CAUSES:
            raise ProtocolError(f"failure cause {cause!r}: expected one of {', '.join(CAUSES)}")
        return cls(job.device, job.instruction, cause, error.splitlines()[0] if error else cause,
                   telemetry=telemetry or Telemetry())

    def with_telemetry(self, **changes: Any) -> "JobResult":
        return replace(self, telemetry=replace(self.telemetry, **changes))

    def nonfinite(self, evaluated_after: bool = True) -> str:
        """The name of the first returned array or number that is not finite ("" when all are);
        ``evaluated_after``: the job evaluated its trained arrays (else loss_after is NaN by design)."""
        for name, value in self.arrays.items():
            if not np.all(np.isfinite(value)):
                return name
        return self.nonfinite_numbers(evaluated_after)

    def nonfinite_numbers(self, evaluated_after: bool = True) -> str:
        """``nonfinite`` for the numbers alone (a batch of devices checks its arrays a stack at a time)."""
        if self.instruction == "evaluate":
            return ""
        for name in ("loss", "loss_after") if evaluated_after else ("loss",):
            if not math.isfinite(getattr(self, name)):
                return name
        return ""

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _RESULT_FIELDS}
        out["arrays"] = dict(self.arrays)
        out["telemetry"] = self.telemetry.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "JobResult":
        raw = dict(raw)
        unknown = set(raw).difference(_RESULT_FIELDS)
        if unknown:
            raise ProtocolError(f"job result: unknown field(s) {', '.join(sorted(unknown))}")
        raw["telemetry"] = Telemetry.from_dict(raw.get("telemetry", {}))
        return cls(**raw)


_RESULT_FIELDS = tuple(f.name for f in fields(JobResult))


def encode_results(results: Sequence[JobResult]) -> dict[str, Any]:
    """Results for one call across a process boundary. The arrays of results that carry the same names,
    shapes and dtypes (a batch of devices trained on one program) travel stacked, one array per name: a few
    large buffers, not thousands of small ones, each serialized on its own."""
    raws = [r.to_dict() for r in results]
    rows = [i for i, r in enumerate(results) if r.arrays]
    payload: dict[str, Any] = {"version": PROTOCOL_VERSION, "results": raws}
    if len(rows) < 2:
        return payload
    first = results[rows[0]].arrays
    if isinstance(first, StackRow) and len(rows) == len(next(iter(first.stacks.values()))) and all(
            isinstance(results[i].arrays, StackRow) and results[i].arrays.stacks is first.stacks
            and results[i].arrays.row == p for p, i in enumerate(rows)):
        for i in rows:  # rows of one stack already (a device-axis pass), in order: sent as they are
            raws[i]["arrays"] = {}
        payload["stacked"] = {"rows": rows, "arrays": dict(first.stacks)}
        return payload
    layout = {name: (np.shape(value), np.asarray(value).dtype) for name, value in first.items()}
    if any(r.arrays.keys() != first.keys() for r in map(results.__getitem__, rows)) or any(
            (np.shape(v), np.asarray(v).dtype) != layout[n] for i in rows for n, v in results[i].arrays.items()):
        return payload
    for i in rows:
        raws[i]["arrays"] = {}
    payload["stacked"] = {"rows": rows, "arrays": {name: np.stack([results[i].arrays[name] for i in rows])
                                                   for name in first}}
    return payload


class StackRow(dict):
    """A device's arrays as one row of per-tensor stacks (a device-axis pass's results, or arrays that crossed
    stacked): a dict of row views that also knows the stacks and its row, so the arrays cross as the stacks
    and the driver checks and averages many devices' arrays a stack at a time (``fleet.arrays``)."""

    def __init__(self, stacks: Mapping[str, np.ndarray], row: int, dtypes: Mapping[str, str] | None = None):
        super().__init__((name, value[row]) for name, value in stacks.items())
        self.stacks, self.row = stacks, row
        self.dtypes = dtypes  # name → dtype name, when the stacks are read-only, C-contiguous numbers


def _read_only(value: np.ndarray) -> np.ndarray:
    """``value``, no longer writeable (results are what a device answered; their rows are kept as they are)."""
    value.flags.writeable = False
    return value


def decode_results(payload: Mapping[str, Any]) -> list[JobResult]:
    """The JobResults ``encode_results`` sent; stacked arrays come back as per-device views of the stack."""
    if payload.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(f"results of protocol version {payload.get('version')!r}; this side speaks "
                            f"{PROTOCOL_VERSION}")
    raws = [dict(raw) for raw in payload["results"]]
    stacked = payload.get("stacked")
    if stacked:
        stacks = {name: _read_only(np.ascontiguousarray(value)) for name, value in stacked["arrays"].items()}
        dtypes = None if any(v.dtype.hasobject for v in stacks.values()) else \
            {name: str(value.dtype) for name, value in stacks.items()}
        for row, i in enumerate(stacked["rows"]):
            raws[i]["arrays"] = StackRow(stacks, row, dtypes)
    return [JobResult.from_dict(raw) for raw in raws]
