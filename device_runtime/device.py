"""The Device interface every backend (numpy, QEMU, GVSoC, serial board) implements, and its result types."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import numpy as np


class DeviceError(RuntimeError):
    """A device failed to load or run a program; the message is one line naming the cause."""


@dataclass(frozen=True)
class Telemetry:
    samples: int = 0
    steps: int = 0
    wall_s: float = 0.0
    cycles: int = 0                      # measured (QEMU, boards) or modelled (target cost model); 0 if unknown
    instructions: int = 0
    peak_bytes_by_level: Mapping[str, int] = field(default_factory=dict)
    bytes_moved: int = 0
    link_s: float = 0.0                  # time on the serial link (boards); 0 for local devices


@dataclass(frozen=True)
class TrainResult:
    params: dict[str, np.ndarray]        # the trainable parameters after training
    losses: np.ndarray                   # loss of every step
    telemetry: Telemetry


@dataclass(frozen=True)
class EvalResult:
    loss: float                          # mean loss over the evaluated samples
    outputs: np.ndarray                  # model outputs (logits / reconstructions), one row per sample
    samples: int


class Device(Protocol):
    name: str

    def set_params(self, params: Mapping[str, np.ndarray]) -> None: ...

    def get_params(self) -> dict[str, np.ndarray]: ...

    def train(self, x: np.ndarray, y: np.ndarray | None, steps: int, lr: float | None = None) -> TrainResult: ...

    def evaluate(self, x: np.ndarray, y: np.ndarray | None) -> EvalResult: ...


SETTABLE_ROLES = ("trainable", "frozen", "optimizer_state")


class ParameterAccess:
    """Parameter get/set for devices that keep the program's parameter region on the host as
    ``self.param_views`` (name → view) beside ``self.program``."""

    program: Any
    param_views: dict[str, np.ndarray]

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        for name, value in params.items():
            view = self.param_views.get(name)
            if view is None or self.program.tensors[name].role not in SETTABLE_ROLES:
                raise DeviceError(f"{name!r} is not a parameter of program {self.program.model!r}")
            if np.shape(value) != view.shape:
                raise DeviceError(f"parameter {name!r}: shape {np.shape(value)} does not match {view.shape}")
            np.copyto(view, value, casting="same_kind")

    def get_params(self) -> dict[str, np.ndarray]:
        return {n: self.param_views[n].copy() for n in self.program.trainable}

    def reset_optimizer(self) -> None:
        for name, t in self.program.tensors.items():
            if t.role == "optimizer_state":
                self.param_views[name][...] = 0


def batches(x: np.ndarray, y: np.ndarray | None, batch: int, steps: int):
    """``steps`` batches of exactly ``batch`` samples, cycling through the data in order."""
    n = len(x)
    if n == 0:
        raise DeviceError("no training samples")
    for step in range(steps):
        idx = (np.arange(batch) + step * batch) % n
        yield x[idx], (y[idx] if y is not None else None)
