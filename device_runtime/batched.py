"""Many devices in one pass: runs a program compiled with a device axis (``program.devices`` = D).

Device d's samples are rows d·B … d·B+B−1 of each step's batch; its parameters are index d of every
per-device tensor (the Program marks them: ``TensorInfo.per_device``). Fewer than D devices are padded with
copies of the last one, whose results are dropped. Results are per device, the same types a single device
returns (``TrainResult``, ``EvalResult``): one device is a batch of one.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from compiler.program import Program
from device_runtime.device import DeviceError, EvalResult, TrainResult, modelled_cycles_per_step, set_proximal
from device_runtime.numpy_executor import NumpyDevice, per_sample_loss
from device_runtime.protocol import Telemetry


class BatchedDevices:
    kind = "numpy-batched"

    def __init__(self, program: Program):
        if program.devices < 2:
            raise DeviceError("BatchedDevices needs a program compiled with a device axis (devices >= 2)")
        self.program = program
        self.devices = program.devices
        self.batch = program.batch
        self.device = NumpyDevice(program, name="batched")
        self.per_device = [n for n in program.per_device if n in program.param_offsets]

    def _pad(self, items: Sequence, count: int) -> list:
        return list(items) + [items[-1]] * (count - len(items))

    def set_params(self, params: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Device d gets ``params[d]``. When every device gets the same mapping (the global adapters), each
        tensor is written once, broadcast over the device axis."""
        if not 0 < len(params) <= self.devices:
            raise DeviceError(f"{len(params)} parameter sets for a program of {self.devices} devices")
        shared = all(p is params[0] for p in params)
        padded = params[:1] if shared else self._pad(params, self.devices)
        for name in self.per_device:
            view = self.device.param_views[name]
            for d, p in enumerate(padded):
                if name not in p:
                    raise DeviceError(f"device {d}: no value for parameter {name!r}")
                if np.shape(p[name]) != view.shape[1:]:
                    raise DeviceError(f"device {d}: parameter {name!r} has shape {np.shape(p[name])}, "
                                      f"expected {view.shape[1:]}")
                view[slice(None) if shared else d] = p[name]
        self.device.reset_optimizer()

    def set_proximal(self, mu: float, anchors: Sequence[Mapping[str, np.ndarray]]) -> None:
        """FedProx: each device's trainables are pulled towards its own anchors (its received arrays)."""
        if not self.program.optimizer.get("proximal_mu_tensor"):
            set_proximal(self.program, self.device.param_views, mu)  # refuses mu != 0; nothing to anchor
            return
        padded = self._pad(list(anchors), self.devices)
        stacked = {n: np.stack([np.asarray(a[n]) for a in padded]) for n in self.program.trainable
                   if all(n in a for a in padded)}
        set_proximal(self.program, self.device.param_views, mu, stacked)

    def get_params(self, count: int | None = None) -> list[dict[str, np.ndarray]]:
        count = self.devices if count is None else count
        stacks = self.stacked_params(count)
        return [{n: stack[d] for n, stack in stacks.items()} for d in range(count)]

    def stacked_params(self, count: int | None = None) -> dict[str, np.ndarray]:
        """The first ``count`` devices' trained parameters, one (count, ...) copy per tensor."""
        count = self.devices if count is None else count
        return {n: self.device.param_views[n][:count].copy() for n in self.per_device
                if self.program.tensors[n].role == "trainable"}

    def _feeds(self, xs: np.ndarray, ys: np.ndarray | None, idx: np.ndarray) -> dict[str, np.ndarray]:
        whole = len(idx) == xs.shape[1] and not np.any(idx - np.arange(len(idx)))  # a device's samples in order
        rows = (xs if whole else xs[:, idx]).reshape((self.devices * self.batch,) + xs.shape[2:])
        feeds = {self.program.input: rows}
        if self.program.label:
            feeds[self.program.label] = (ys if whole else ys[:, idx]).reshape(-1)
        return feeds

    def _stack(self, xs: np.ndarray, ys: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        if len(xs) > self.devices:
            raise DeviceError(f"data for {len(xs)} devices, program holds {self.devices}")
        if len(xs) < self.devices:
            pad = self.devices - len(xs)
            xs = np.concatenate([xs, np.repeat(xs[-1:], pad, axis=0)])
            ys = None if ys is None else np.concatenate([ys, np.repeat(ys[-1:], pad, axis=0)])
        return xs, ys

    def train(self, xs: np.ndarray, ys: np.ndarray | None, steps: int, lr: float | None = None) -> list[TrainResult]:
        """xs: (devices, n, ...) samples. One TrainResult per given device (its parameters, its loss per step)."""
        stacks, losses, telemetry = self.train_stacked(xs, ys, steps, lr)
        return [TrainResult({n: stack[d] for n, stack in stacks.items()}, losses[:, d].copy(), telemetry)
                for d in range(len(xs))]

    def train_stacked(self, xs: np.ndarray, ys: np.ndarray | None, steps: int,
                      lr: float | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, Telemetry]:
        """``train`` with the results stacked: the trained parameters (``stacked_params``), the losses
        (steps, devices given) and the telemetry every device shares."""
        n = xs.shape[1]
        count = len(xs)
        xs, ys = self._stack(xs, ys)
        if lr is not None:
            for name in self.device.lr_tensors:
                self.device.param_views[name][...] = lr
        runner = self.device.trainer
        out_view = runner.results[self.program.output]
        losses = np.empty((steps, self.devices), np.float32)
        for step in range(steps):
            idx = (np.arange(self.batch) + step * self.batch) % n
            feeds = self._feeds(xs, ys, idx)
            runner.run(feeds)
            per_sample = per_sample_loss(self.program.task, out_view, feeds[self.program.input],
                                         feeds.get(self.program.label))
            losses[step] = per_sample.reshape(self.devices, self.batch).mean(axis=1)
        telemetry = Telemetry(samples=steps * self.batch, steps=steps,
                              modelled_cycles_per_step=modelled_cycles_per_step(self.program),
                              peak_bytes_by_level=dict(self.program.report.get("memory_by_level", {})))
        return self.stacked_params(count), losses[:, :count], telemetry

    def evaluate(self, xs: np.ndarray, ys: np.ndarray | None) -> list[EvalResult]:
        """One EvalResult per given device: its outputs (n, ...) and mean loss."""
        per_sample, outputs = self.evaluate_stacked(xs, ys)
        return [EvalResult(float(loss), out.copy(), out.shape[0]) for loss, out in zip(per_sample.mean(axis=1), outputs)]

    def evaluate_stacked(self, xs: np.ndarray, ys: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``evaluate`` with the results stacked: each given device's per-sample losses (devices, n) — their
        mean is its loss, as on a single device — and its outputs (devices, n, ...). When a device's samples
        fit one batch the outputs are a view of the executor's own buffer, valid until its next pass."""
        count, n = len(xs), xs.shape[1]
        xs, ys = self._stack(xs, ys)
        steps = -(-n // self.batch)
        runner = self.device.evaluator
        out_view = runner.results[self.program.output]
        out_shape = out_view.shape[1:]
        by_device = out_view.reshape((self.devices, self.batch) + out_shape)
        if steps == 1 and n == self.batch:  # one pass: the outputs are read where the executor wrote them
            runner.run(self._feeds(xs, ys, np.arange(n)), until=self.program.output)
            outputs = by_device[:count]
        else:
            outputs = np.empty((self.devices, steps * self.batch) + out_shape, np.float32)
            for step in range(steps):
                idx = (np.arange(self.batch) + step * self.batch) % n
                runner.run(self._feeds(xs, ys, idx), until=self.program.output)
                outputs[:, step * self.batch:(step + 1) * self.batch] = by_device
            outputs = outputs[:count, :n]
        flat = per_sample_loss(self.program.task, outputs.reshape((count * n,) + out_shape),
                               xs[:count].reshape((count * n,) + xs.shape[2:]),
                               None if ys is None else ys[:count].reshape(-1))
        return flat.reshape(count, n), outputs
