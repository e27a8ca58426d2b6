"""The Device interface every backend (numpy, QEMU, GVSoC, serial board) implements, and its result types."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import numpy as np

from compiler.autodiff import MASTER_SUFFIX
from device_runtime.protocol import Telemetry


class DeviceError(RuntimeError):
    """A device failed to load or run a program; the message is one line naming the cause."""


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


def modelled_cycles_per_step(program: Any) -> int:
    """The target cost model's cycles per training step (0 for a program not lowered onto a target)."""
    return int(program.report.get("perf", {}).get("cycles_per_step", 0))


def lr_tensors(program: Any) -> list[str]:
    """The learning-rate tensor(s) a device sets before training."""
    name = program.optimizer.get("lr_tensor")
    if name:
        return [name] if name in program.tensors else []
    return [n for n, t in program.tensors.items() if t.role == "hyperparameter"]  # manifests before lr_tensor


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
            self._sync_master(name)

    def _sync_master(self, name: str) -> None:
        """An int8 weight's float32 master copy (compiler.autodiff.MASTER_SUFFIX) restarts from its values."""
        master = self.program.tensors.get(name + MASTER_SUFFIX)
        if master is not None:
            self.param_views[master.name][...] = self.param_views[name][tuple(slice(0, d) for d in master.shape)]

    def get_params(self) -> dict[str, np.ndarray]:
        return {n: self.param_views[n].copy() for n in self.program.trainable}

    def reset_optimizer(self) -> None:
        for name, t in self.program.tensors.items():
            if t.role == "optimizer_state" and not name.endswith(MASTER_SUFFIX):
                self.param_views[name][...] = 0
            elif t.role == "optimizer_state":
                self._sync_master(name[: -len(MASTER_SUFFIX)])

    def set_proximal(self, mu: float, anchors: Mapping[str, np.ndarray] | None = None) -> None:
        """FedProx: pull each trainable towards its anchor with strength ``mu`` (anchors: the values the
        device received; a parameter without one is anchored at its current value). A program compiled
        without the proximal option accepts only mu = 0."""
        set_proximal(self.program, self.param_views, mu, anchors)


def set_proximal(program: Any, views: Mapping[str, np.ndarray], mu: float,
                 anchors: Mapping[str, np.ndarray] | None = None, device_axis: bool = False) -> None:
    mu_tensor = program.optimizer.get("proximal_mu_tensor")
    if not mu_tensor:
        if mu:
            raise DeviceError(f"program {program.model!r} was compiled without the proximal option; it cannot "
                              f"honour proximal-mu = {mu}")
        return
    views[mu_tensor][...] = mu
    for param, anchor in program.optimizer["anchors"].items():
        value = (anchors or {}).get(param)
        np.copyto(views[anchor], views[param] if value is None else value, casting="same_kind")


def batches(x: np.ndarray, y: np.ndarray | None, batch: int, steps: int):
    """``steps`` batches of exactly ``batch`` samples, cycling through the data in order."""
    n = len(x)
    if n == 0:
        raise DeviceError("no training samples")
    for step in range(steps):
        idx = (np.arange(batch) + step * batch) % n
        yield x[idx], (y[idx] if y is not None else None)
