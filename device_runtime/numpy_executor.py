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
from compiler.ops import Op, _jit, get_op
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


def _skip(outs: Sequence[np.ndarray], *ins: np.ndarray, **attrs: Any) -> None:
    """The call of a step that a fused call before it already did."""


def _scale_shift_run(steps: Sequence, i: int, views: Mapping[str, np.ndarray], readers: Mapping[str, set[int]],
                     results: set[str]) -> int:
    """How many steps from ``i`` one ``_jit.scale_shift`` pass can do: 0, or 2 for Mul(x, s) → Add(·, t) with s
    and t one float32 value per channel (a frozen BatchNorm as the frontend folds it), or 3 with the Relu after
    it; each intermediate read by the next step only, and the last output the same array as x or apart from it."""
    def dead_after(name: str, j: int) -> bool:
        return readers.get(name, set()) <= {j} and name not in results

    if i + 1 >= len(steps) or (steps[i].op, steps[i + 1].op) != ("Mul", "Add"):
        return 0
    mul, add = steps[i], steps[i + 1]
    if add.inputs[0] != mul.outputs[0] or not dead_after(mul.outputs[0], i + 1):
        return 0
    x, s, t = views[mul.inputs[0]], views[mul.inputs[1]], views[add.inputs[1]]
    channel = (x.shape[1],) + (1,) * (x.ndim - 2)
    if x.ndim < 3 or s.shape != channel or t.shape != channel or x.dtype != np.float32 or \
            s.dtype != x.dtype or t.dtype != x.dtype or not x.flags.c_contiguous:
        return 0
    count = 2
    if i + 2 < len(steps) and steps[i + 2].op == "Relu" and steps[i + 2].inputs[0] == add.outputs[0] and \
            dead_after(add.outputs[0], i + 2):
        count = 3
    out = views[steps[i + count - 1].outputs[0]]
    if out.dtype != x.dtype or not out.flags.c_contiguous or out.shape != x.shape or \
            (np.shares_memory(out, x) and not _same_array(out, x)) or np.shares_memory(out, s) or \
            np.shares_memory(out, t):
        return 0
    return count


def _scale_shift_call(x: np.ndarray, s: np.ndarray, t: np.ndarray, out: np.ndarray, relu: bool) -> Callable:
    n, c = x.shape[:2]
    args = (x.reshape(n, c, -1), s.reshape(c), t.reshape(c), out.reshape(n, c, -1), relu)
    return lambda outs, *ins, **attrs: _jit.scale_shift(*args)


class PhaseRunner:
    """One phase (train or evaluate) bound to its arena: a flat list of kernel calls on views, one per step that
    is not a view. With ``fuse``, a frozen BatchNorm's Mul → Add (→ Relu) whose intermediates nothing else reads
    runs as one compiled pass in the Mul's call (the same numbers: each element rounded as by the separate ops) and
    the later steps' calls do nothing; their intermediate tensors are then never written."""

    def __init__(self, program: Program, phase: Phase, params: np.ndarray,
                 param_views: Mapping[str, np.ndarray], fuse: bool = True):
        self.arena = np.zeros(phase.arena_bytes, np.uint8)
        views: dict[str, np.ndarray] = dict(param_views)
        for name, offset in phase.arena_offsets.items():
            views[name] = _view(self.arena, offset, program.tensors[name])
        self.views = views
        self.feeds = {name: views[name] for name in phase.feeds}
        self.results = {name: views[name] for name in phase.results}
        self.calls: list[tuple[Callable[..., None], list[np.ndarray], dict[str, Any], list[np.ndarray], str]] = []
        self._ends: dict[str, int | None] = {}  # tensor → how many calls it takes to write it
        readers: dict[str, set[int]] = {}
        for j, step in enumerate(phase.steps):
            for name in step.inputs:
                readers.setdefault(name, set()).add(j)
        fused_until = -1
        for i, step in enumerate(phase.steps):
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
            kernel = _skip if i <= fused_until else _kernel(op, ins, outs)
            run = _scale_shift_run(phase.steps, i, views, readers, set(phase.results)) if fuse and i > fused_until \
                else 0
            if run:
                last = phase.steps[i + run - 1]
                kernel = _scale_shift_call(ins[0], ins[1], views[phase.steps[i + 1].inputs[1]],
                                           views[last.outputs[0]], relu=run == 3)
                fused_until = i + run - 1
            self.calls.append((kernel, ins, dict(step.attrs), outs, step.name))

    def run(self, feeds: Mapping[str, np.ndarray], until: str | None = None) -> None:
        """Run the phase on ``feeds``; with ``until``, only as far as the step that writes that tensor (an
        evaluation whose caller needs the outputs, not the phase's loss)."""
        for name, view in self.feeds.items():
            np.copyto(view, feeds[name], casting="same_kind")
        for kernel, ins, attrs, outs, name in self.calls[:self._end(until)]:
            kernel(outs, *ins, **attrs)

    def _end(self, tensor: str | None) -> int | None:
        if tensor is None:
            return None
        if tensor not in self._ends:
            writers = [k for k, call in enumerate(self.calls) if any(o is self.views[tensor] for o in call[3])]
            self._ends[tensor] = writers[-1] + 1 if writers else None
        return self._ends[tensor]


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
    return np.mean(np.square(diff, out=diff), axis=1)


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
