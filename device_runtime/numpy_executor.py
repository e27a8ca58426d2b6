"""The numpy executor: runs a Program inside its planned memory.

Every tensor is a numpy view at its planned offset, in one parameter buffer and one arena per phase, so a
wrong memory plan shows up as wrong numbers. View ops (Reshape, ...) cost nothing: the plan already gives
their output the input's bytes.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from compiler.ir import Role
from compiler.ops import Op, get_op
from compiler.program import Phase, Program, TensorInfo
from device_runtime.device import (DeviceError, EvalResult, ParameterAccess, Telemetry, TrainResult, batches,
                                   lr_tensors, modelled_cycles_per_step)


def _view(buffer: np.ndarray, offset: int, info: TensorInfo) -> np.ndarray:
    return buffer[offset: offset + info.nbytes].view(info.dtype).reshape(info.shape)


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.shape == b.shape
            and a.strides == b.strides)


def _kernel(op: Op, ins: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> Callable[..., None]:
    """The op's own ``forward_into`` when it may write straight into ``outs`` (see ``Op.forward_into``),
    else the default: ``forward`` into a temporary, copied into ``outs``."""
    default = functools.partial(Op.forward_into, op)
    if type(op).forward_into is Op.forward_into or not outs:
        return default
    if any(a.dtype != outs[0].dtype for a in (*ins, *outs)):
        return default
    for out in outs:
        for x in ins:
            if np.shares_memory(out, x) and not ((op.inplace or op.updates) and _same_array(out, x)):
                return default
    return op.forward_into


class PhaseRunner:
    """One phase (train or evaluate) bound to its arena: a flat list of kernel calls on views."""

    def __init__(self, program: Program, phase: Phase, params: np.ndarray,
                 param_views: Mapping[str, np.ndarray]):
        self.arena = np.zeros(phase.arena_bytes, np.uint8)
        views: dict[str, np.ndarray] = dict(param_views)
        for name, offset in phase.arena_offsets.items():
            views[name] = _view(self.arena, offset, program.tensors[name])
        self.views = views
        self.feeds = {name: views[name] for name in phase.feeds}
        self.results = {name: views[name] for name in phase.results}
        self.calls: list[tuple[Callable[..., None], list[np.ndarray], dict[str, Any], list[np.ndarray], str]] = []
        for step in phase.steps:
            op = get_op(step.op)
            ins = [views[i] for i in step.inputs]
            if op.view:
                if not np.shares_memory(views[step.outputs[0]], ins[0]):
                    raise DeviceError(f"step {step.name!r}: the plan does not alias view {step.outputs[0]!r}")
                continue
            if op.updates:
                outs = [views[step.inputs[i]] for i in op.updates if i < len(step.inputs)]
            else:
                outs = [views[o] for o in step.outputs]
            self.calls.append((_kernel(op, ins, outs), ins, dict(step.attrs), outs, step.name))

    def run(self, feeds: Mapping[str, np.ndarray]) -> None:
        for name, view in self.feeds.items():
            np.copyto(view, feeds[name], casting="same_kind")
        for kernel, ins, attrs, outs, name in self.calls:
            kernel(outs, *ins, **attrs)


class NumpyDevice(ParameterAccess):
    """A simulated device running a Program with numpy. Default backend: fast and exact to the plan."""

    kind = "numpy"

    def __init__(self, program: Program, name: str = "numpy"):
        self.name = name
        self.program = program
        self.params = np.zeros(program.params_bytes, np.uint8)
        self.param_views = {n: _view(self.params, off, program.tensors[n])
                            for n, off in program.param_offsets.items()}
        for name_, value in program.values.items():
            if name_ in self.param_views:
                np.copyto(self.param_views[name_], value, casting="same_kind")
        self.trainer = PhaseRunner(program, program.train, self.params, self.param_views)
        self.evaluator = PhaseRunner(program, program.evaluate, self.params, self.param_views)
        self.lr_tensors = lr_tensors(program)

    # ---- running --------------------------------------------------------------------------------------
    def _feeds(self, xb: np.ndarray, yb: np.ndarray | None) -> dict[str, np.ndarray]:
        feeds = {self.program.input: xb}
        if self.program.label:
            if yb is None:
                raise DeviceError(f"program {self.program.model!r} needs labels")
            feeds[self.program.label] = yb
        return feeds

    def train(self, x: np.ndarray, y: np.ndarray | None, steps: int, lr: float | None = None) -> TrainResult:
        if lr is not None:
            for name in self.lr_tensors:
                self.param_views[name][...] = lr
        start = time.perf_counter()
        losses = np.empty(steps, np.float32)
        loss_view = self.trainer.results[self.program.loss]
        for i, (xb, yb) in enumerate(batches(x, y, self.program.batch, steps)):
            self.trainer.run(self._feeds(xb, yb))
            losses[i] = loss_view
        telemetry = Telemetry(samples=steps * self.program.batch, steps=steps,
                              wall_s=time.perf_counter() - start,
                              modelled_cycles_per_step=modelled_cycles_per_step(self.program),
                              peak_bytes_by_level=dict(self.program.report.get("memory_by_level", {})))
        return TrainResult(self.get_params(), losses, telemetry)

    def evaluate(self, x: np.ndarray, y: np.ndarray | None) -> EvalResult:
        n, batch = len(x), self.program.batch
        steps = -(-n // batch)
        outputs = np.empty((steps * batch,) + tuple(self.program.tensors[self.program.output].shape[1:]), np.float32)
        out_view = self.evaluator.results[self.program.output]
        for i, (xb, yb) in enumerate(batches(x, y, batch, steps)):
            self.evaluator.run(self._feeds(xb, yb))
            outputs[i * batch:(i + 1) * batch] = out_view
        outputs = outputs[:n]
        return EvalResult(float(np.mean(per_sample_loss(self.program.task, outputs, x, y))), outputs, n)


def per_sample_loss(task: str, outputs: np.ndarray, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    if task == "classification":
        z = outputs - outputs.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -logp[np.arange(len(outputs)), np.asarray(y, np.int64)]
    target = x if task == "reconstruction" else y
    diff = (outputs - np.asarray(target, np.float32)).reshape(len(outputs), -1)
    return np.mean(diff * diff, axis=1)


def run_phase(program: Program, phase_name: str, feeds: Mapping[str, np.ndarray],
              values: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Run one phase once (for tests): returns copies of every tensor the arena and parameters hold after."""
    device = NumpyDevice(program)
    if values:
        for name, value in values.items():
            np.copyto(device.param_views[name], value, casting="same_kind")
    runner = device.trainer if phase_name == "train" else device.evaluator
    runner.run(feeds)
    return {n: v.copy() for n, v in runner.views.items()}


__all__: Sequence[str] = ("NumpyDevice", "PhaseRunner", "per_sample_loss", "run_phase")
