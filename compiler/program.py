"""The compiler's output: a Program, saved as a versioned JSON manifest plus a parameter file (.npz, read
with allow_pickle=False). The device runtime knows Programs, not models or scenarios."""
from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from compiler.ir import DTYPE_BYTES, CompileError, Role

FORMAT = "edgefleet.program"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "params.npz"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str
    level: str = ""  # memory level on the target (L1/L2/L3), set by target lowering
    per_device: bool = False  # each device holds its own value (the adapters a fleet exchanges)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPE_BYTES[self.dtype]

    @property
    def persistent(self) -> bool:
        return Role(self.role).persistent


@dataclass(frozen=True)
class Step:
    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any]
    phase: str
    layer: str
    flops: int
    unit: str = ""      # set by target lowering: "redmule" | "cluster" | "dma" | "none"
    cycles: int = 0     # set by target lowering


@dataclass(frozen=True)
class Phase:
    """One executable schedule (training step or evaluation) with its own arena plan."""
    steps: tuple[Step, ...]
    feeds: tuple[str, ...]
    results: tuple[str, ...]
    arena_offsets: Mapping[str, int]
    arena_bytes: int
    lower_bound_bytes: int


@dataclass(frozen=True)
class Program:
    model: str
    batch: int
    task: str                       # "classification" | "reconstruction" | "regression"
    input: str
    label: str                      # the label/target feed ("" when the loss targets the input itself)
    output: str                     # model output (logits / reconstruction)
    loss: str                       # scalar loss tensor
    tensors: Mapping[str, TensorInfo]
    param_offsets: Mapping[str, int]
    params_bytes: int
    values: Mapping[str, np.ndarray]
    train: Phase
    evaluate: Phase
    tuning: Mapping[str, Any] = field(default_factory=dict)
    optimizer: Mapping[str, Any] = field(default_factory=dict)
    report: Mapping[str, Any] = field(default_factory=dict)
    target: Mapping[str, Any] = field(default_factory=dict)
    devices: int = 1                # device axis: per-device parameters carry a leading axis of this size

    @property
    def trainable(self) -> tuple[str, ...]:
        return tuple(n for n, t in self.tensors.items() if t.role == Role.TRAINABLE.value)

    @property
    def per_device(self) -> tuple[str, ...]:
        """The tensors each device holds its own value of (trainables and, e.g., FFA-LoRA's frozen A)."""
        return tuple(n for n, t in self.tensors.items() if t.per_device)

    def adapter_values(self) -> dict[str, np.ndarray]:
        """Initial values of the per-device tensors: what a fleet sends every device."""
        return {n: np.array(self.values[n]) for n in self.per_device if n in self.values}

    def initial_parameters(self) -> dict[str, np.ndarray]:
        return {n: np.array(self.values[n]) for n in self.trainable}

    def replace(self, **changes: Any) -> "Program":
        return dataclasses.replace(self, **changes)

    # ---- artifact ---------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": FORMAT_VERSION,
            "model": self.model, "batch": self.batch, "devices": self.devices, "task": self.task,
            "input": self.input, "label": self.label, "output": self.output, "loss": self.loss,
            "tuning": dict(self.tuning), "optimizer": dict(self.optimizer),
            "tensors": [_jsonable(dataclasses.asdict(t)) for t in self.tensors.values()],
            "param_offsets": dict(self.param_offsets), "params_bytes": self.params_bytes,
            "phases": {"train": _phase_json(self.train), "evaluate": _phase_json(self.evaluate)},
            "report": _jsonable(self.report), "target": _jsonable(self.target),
        }

    def to_bytes(self) -> tuple[bytes, bytes]:
        """(manifest JSON, parameter .npz) — the form a program crosses process and file boundaries in."""
        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.asarray(v) for k, v in self.values.items()})
        return json.dumps(self.manifest(), indent=1).encode(), buffer.getvalue()

    def save(self, directory: str | os.PathLike) -> Path:
        """Write manifest.json and params.npz into ``directory`` (created if needed), atomically per file."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        manifest, params = self.to_bytes()
        _atomic_write(out / MANIFEST, manifest)
        _atomic_write(out / PARAMS, params)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Program":
        path = Path(directory)
        try:
            manifest, params = (path / MANIFEST).read_bytes(), (path / PARAMS).read_bytes()
        except FileNotFoundError as exc:
            raise CompileError(f"{path}: no {Path(exc.filename).name}; not a program artifact") from None
        return cls.from_bytes(manifest, params, where=str(path))

    @classmethod
    def from_bytes(cls, manifest: bytes, params: bytes, where: str = "program") -> "Program":
        try:
            data = json.loads(manifest)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CompileError(f"{where}: corrupt manifest ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CompileError(f"{where}: not an edgefleet program manifest")
        if data.get("version") != FORMAT_VERSION:
            raise CompileError(f"{where}: program format version {data.get('version')} is not "
                               f"supported (this edgefleet reads version {FORMAT_VERSION})")
        try:
            with np.load(io.BytesIO(params), allow_pickle=False) as npz:
                values = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise CompileError(f"{where}: cannot read parameters ({exc})") from None
        path = Path(where)
        tensors = {t["name"]: TensorInfo(t["name"], tuple(t["shape"]), t["dtype"], t["role"], t.get("level", ""),
                                          bool(t.get("per_device", False)))
                   for t in data["tensors"]}
        missing = [n for n, t in tensors.items() if t.persistent and n not in values]
        if missing:
            raise CompileError(f"{path / PARAMS}: missing values for {missing[:3]}")
        return cls(model=data["model"], batch=data["batch"], task=data["task"], input=data["input"],
                   label=data["label"], output=data["output"], loss=data["loss"], tensors=tensors,
                   param_offsets=data["param_offsets"], params_bytes=data["params_bytes"], values=values,
                   train=_phase_from(data["phases"]["train"]), evaluate=_phase_from(data["phases"]["evaluate"]),
                   tuning=data["tuning"], optimizer=data["optimizer"], report=data["report"],
                   target=data.get("target", {}), devices=data.get("devices", 1))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _tupled(value: Any) -> Any:
    """JSON lists back to tuples (attributes are tuples in the IR)."""
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    if isinstance(value, dict):
        return {k: _tupled(v) for k, v in value.items()}
    return value


def _phase_json(phase: Phase) -> dict[str, Any]:
    return {"steps": [_jsonable(dataclasses.asdict(s)) for s in phase.steps], "feeds": list(phase.feeds),
            "results": list(phase.results), "arena_offsets": dict(phase.arena_offsets),
            "arena_bytes": phase.arena_bytes, "lower_bound_bytes": phase.lower_bound_bytes}


def _phase_from(data: dict[str, Any]) -> Phase:
    steps = tuple(Step(s["name"], s["op"], tuple(s["inputs"]), tuple(s["outputs"]), _tupled(s["attrs"]),
                       s["phase"], s["layer"], s["flops"], s.get("unit", ""), s.get("cycles", 0))
                  for s in data["steps"])
    return Phase(steps, tuple(data["feeds"]), tuple(data["results"]), data["arena_offsets"],
                 data["arena_bytes"], data["lower_bound_bytes"])
