"""SerialDevice: a dev board on a serial line behind the common Device interface.

The host keeps a mirror of the board's parameter region. ``train`` / ``evaluate`` upload the tensors that
change between jobs (trainable, optimizer state, hyperparameters) and commit them by CRC-32, stream every
batch, run the steps on the board, and (train) read the updated tensors back; the mirror takes them only
after the board's CRC-32 of those bytes matches what arrived. A transfer that fails half-way leaves the
mirror as it was and the board refusing to train until the next commit. On first contact, and after any
link failure, the whole region is compared by CRC-32 and uploaded when it differs.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import numpy as np

from compiler.codegen.emit import program_fingerprint
from compiler.ir import Role
from compiler.program import Program
from device_runtime.device import (DeviceError, EvalResult, ParameterAccess, Telemetry, TrainResult, batches,
                                   modelled_cycles_per_step)
from device_runtime.numpy_executor import per_sample_loss
from device_runtime.serial import framing as fr
from device_runtime.serial.client import MAX_SPANS_PER_FRAME, BoardClient
from device_runtime.serial.link import (COMMAND_TIMEOUT_S, DEFAULT_BAUD, MAX_RETRIES, RUN_STEP_TIMEOUT_S, BoardLink, LinkError,
                                        SerialTransport, Transport)

UPLOADED_ROLES = (Role.TRAINABLE.value, Role.OPT_STATE.value, Role.HYPER.value)
DOWNLOADED_ROLES = (Role.TRAINABLE.value, Role.OPT_STATE.value)


def merge_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted (offset, length) spans with touching or overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(spans):
        if out and off <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][1], off + n - start))
        else:
            out.append((off, n))
    return out


class SerialDevice(ParameterAccess):
    kind = "serial"

    def __init__(self, program: Program, url: str, *, name: str = "board", baud_rate: int = DEFAULT_BAUD,
                 run_step_timeout_s: float = RUN_STEP_TIMEOUT_S, retries: int = MAX_RETRIES,
                 command_timeout_s: float = COMMAND_TIMEOUT_S,
                 transport: Transport | None = None, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.program = program
        self.url = url
        self.params = np.zeros(program.params_bytes, np.uint8)
        self.param_views = {n: self.params[o: o + program.tensors[n].nbytes].view(program.tensors[n].dtype)
                            .reshape(program.tensors[n].shape) for n, o in program.param_offsets.items()}
        for n, value in program.values.items():
            if n in self.param_views:
                np.copyto(self.param_views[n], value, casting="same_kind")
        self.lr_tensors = [n for n, t in program.tensors.items() if t.role == Role.HYPER.value]
        self.fingerprint = program_fingerprint(program)
        self.link = BoardLink(transport or SerialTransport(url, baud_rate), baud_rate=baud_rate, retries=retries,
                              timeout_s=command_timeout_s, clock=clock)
        self.client = BoardClient(self.link, run_step_timeout_s)
        try:
            self.hello = self.client.hello()
            self._check_hello()
        except DeviceError:
            self.link.close()
            raise
        self.synced = False               # the board's whole region is known to equal the mirror
        self.last_counters: fr.Counters | None = None

    def _check_hello(self) -> None:
        h, p = self.hello, self.program
        if h.program_hash != self.fingerprint or h.params_bytes != p.params_bytes or h.batch != p.batch:
            raise DeviceError(f"{self.name}: the board at {self.url} holds program {h.model!r} (hash {h.program_hash:08x}, "
                              f"{h.params_bytes} parameter bytes, batch {h.batch}); this job's program "
                              f"{p.model!r} has hash {self.fingerprint:08x}, {p.params_bytes} bytes, batch {p.batch}: "
                              f"flash it first (edgefleet boards flash)")

    # ---- parameter transfer ----------------------------------------------------------------------------------
    def _spans(self, roles: Sequence[str]) -> list[tuple[int, int]]:
        p = self.program
        return merge_spans((p.param_offsets[n], p.tensors[n].nbytes) for n in p.param_offsets
                           if p.tensors[n].role in roles and p.tensors[n].nbytes)

    def _bytes(self, spans: Sequence[tuple[int, int]]) -> bytes:
        return b"".join(self.params[o: o + n].tobytes() for o, n in spans)

    def _upload(self, spans: Sequence[tuple[int, int]]) -> None:
        for group in _groups(spans):
            for off, n in group:
                self.client.write(fr.PARAMS, off, self.params[off: off + n].tobytes())
            self.client.commit(fr.PARAMS, group, fr.crc32(self._bytes(group)))

    def _download(self, spans: Sequence[tuple[int, int]]) -> None:
        received = {}
        for group in _groups(spans):
            parts = [self.client.read(fr.PARAMS, off, n) for off, n in group]
            if fr.crc32(*parts) != self.client.checksum(fr.PARAMS, group):
                raise LinkError(f"{self.name}: parameters read from {self.url} do not match the board's checksum")
            received.update(zip(group, parts))
        for (off, n), data in received.items():             # only now, all verified: into the mirror
            self.params[off: off + n] = np.frombuffer(data, np.uint8)

    def _sync(self) -> None:
        """First contact / after a failure: make the board's whole region equal the mirror."""
        whole = [(0, self.program.params_bytes)]
        if self.client.checksum(fr.PARAMS, whole) != fr.crc32(self.params.tobytes()):
            self._upload(whole)
        self.synced = True

    def _prepare(self, lr: float | None) -> None:
        if lr is not None:
            for name in self.lr_tensors:
                self.param_views[name][...] = lr
        if not self.synced:
            self._sync()
        self._upload(self._spans(UPLOADED_ROLES))

    def _stage(self, x_region: int, y_region: int, xb: np.ndarray, yb: np.ndarray | None) -> int:
        xbytes = _le_bytes(xb)
        ybytes = b"" if yb is None else _le_bytes(yb)
        self.client.write(x_region, 0, xbytes)
        if ybytes:
            self.client.write(y_region, 0, ybytes)
        return fr.crc32(xbytes, ybytes)

    def _guarded(self, work: Callable):
        try:
            return work()
        except DeviceError:
            self.synced = False            # the board may hold anything now: compare it whole next time
            raise

    # ---- the Device interface ------------------------------------------------------------------------------
    def train(self, x: np.ndarray, y: np.ndarray | None, steps: int, lr: float | None = None) -> TrainResult:
        if steps < 1:
            raise DeviceError(f"steps must be >= 1, got {steps}")
        start, link_before = time.perf_counter(), self.link.stats.link_s
        bytes_before = self.link.stats.bytes_sent + self.link.stats.bytes_received

        def work():
            self._prepare(lr)
            losses, cycles, instructions = [], 0, 0
            for xb, yb in self._batches(x, y, steps, "train"):
                crc = self._stage(fr.TRAIN_INPUT, fr.TRAIN_LABEL, xb, yb)
                reply = self.client.run(fr.MODE_TRAIN, 1, crc)
                losses.append(reply.loss)
                cycles += reply.cycles
                instructions += reply.instructions
            self._download(self._spans(DOWNLOADED_ROLES))
            self.last_counters = self.client.counters()
            return np.asarray(losses, np.float32), cycles, instructions

        losses, cycles, instructions = self._guarded(work)
        c = self.last_counters
        peak = dict(self.program.report.get("memory_by_level", {}))
        peak["board"] = c.static_bytes + c.stack_peak_bytes
        telemetry = Telemetry(samples=steps * self.program.batch, steps=steps, wall_s=time.perf_counter() - start,
                              modelled_cycles_per_step=modelled_cycles_per_step(self.program),
                              measured_cycles=cycles, instructions=instructions, peak_bytes_by_level=peak,
                              link_bytes=self.link.stats.bytes_sent + self.link.stats.bytes_received - bytes_before,
                              link_s=self.link.stats.link_s - link_before)
        return TrainResult(self.get_params(), losses, telemetry)

    def evaluate(self, x: np.ndarray, y: np.ndarray | None) -> EvalResult:
        n, batch = len(x), self.program.batch
        steps = -(-n // batch)
        info = self.program.tensors[self.program.output]
        dtype = np.dtype(info.dtype).newbyteorder("<")

        def work():
            self._prepare(None)
            outs = []
            for xb, yb in self._batches(x, y, steps, "evaluate"):
                crc = self._stage(fr.EVAL_INPUT, fr.EVAL_LABEL, xb, yb)
                self.client.run(fr.MODE_EVALUATE, 1, crc)
                data = self.client.read(fr.EVAL_OUTPUT, 0, info.nbytes)
                if fr.crc32(data) != self.client.checksum(fr.EVAL_OUTPUT, [(0, info.nbytes)]):
                    raise LinkError(f"{self.name}: outputs read from {self.url} do not match the board's checksum")
                outs.append(np.frombuffer(data, dtype).astype(info.dtype))
            return outs

        outputs = np.concatenate(self._guarded(work)).reshape((steps * batch,) + tuple(info.shape[1:]))[:n]
        return EvalResult(float(np.mean(per_sample_loss(self.program.task, outputs, x, y))), outputs, n)

    def _batches(self, x, y, steps: int, phase: str):
        program = self.program
        x_info = program.tensors[program.input]
        y_info = program.tensors[program.label] if program.label else None
        if y_info is not None and y is None:
            raise DeviceError(f"program {program.model!r} needs labels")
        for xb, yb in batches(x, y, program.batch, steps):
            xa = np.asarray(xb, x_info.dtype)
            if xa.size != int(np.prod(x_info.shape)):
                raise DeviceError(f"input batch of shape {xa.shape} does not fit {x_info.shape}")
            yield xa, (np.asarray(yb, y_info.dtype) if y_info is not None else None)

    def reset_board(self) -> None:
        self.client.reset()
        self.synced = False

    def close(self) -> None:
        self.link.close()


def _le_bytes(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a)
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def _groups(spans: Sequence[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    return [list(spans[i: i + MAX_SPANS_PER_FRAME]) for i in range(0, len(spans), MAX_SPANS_PER_FRAME)]
