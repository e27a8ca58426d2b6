"""QemuDevice: runs a Program's firmware on qemu-system-riscv32 (board ``rv32-qemu``), or natively (board
``host``, for tests), through three little-endian files in a run directory (layouts in docs/codegen.md):
params.bin (the parameter region), batches.bin (the job: mode, steps, every batch) and out.bin (per-step
loss and counters, outputs, the parameter region after training).

Framing does no I/O: ``encode_params``, ``encode_batches`` and ``decode_out`` work on bytes and raise
DeviceError on anything malformed, so they are tested without QEMU. The executable is built once per
program content (``compiler.codegen.build_elf`` keys its build directory by a content hash).
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from compiler.codegen import build_elf, read_manifest
from compiler.codegen.build import default_cache_dir, firmware_key, get_board, memory_map
from compiler.codegen.emit import generate
from compiler.ir import CompileError, Role
from compiler.program import Program
from device_runtime.device import (DeviceError, EvalResult, ParameterAccess, Telemetry, TrainResult, batches,
                                   lr_tensors, modelled_cycles_per_step)
from device_runtime.numpy_executor import per_sample_loss

IO_VERSION = 1
MODE_TRAIN, MODE_EVALUATE = 0, 1
PARAMS_HEADER = struct.Struct("<4sIII")           # magic, version, fingerprint, params_bytes
BATCHES_HEADER = struct.Struct("<4sIIIIIII")      # magic, version, fingerprint, mode, steps, input, label, 0
OUT_HEADER = struct.Struct("<4sIIIIIII")          # magic, version, fingerprint, mode, steps, params, output, record
STEP_RECORD = np.dtype([("loss", "<f4"), ("reserved", "<u4"), ("cycles", "<u8"), ("instructions", "<u8")])
TRAILER = struct.Struct("<4sI")                   # "EFND", steps

QEMU = "qemu-system-riscv32"
QEMU_PACKAGE = "qemu-system-misc"
RUN_TIMEOUT_S = 120.0
FIRMWARE_EXIT = {10: "cannot read params.bin", 11: "cannot read batches.bin", 12: "cannot write out.bin",
                 13: "the job was written for another program layout", 1: "RISC-V fault"}


# ---- framing (no I/O) ------------------------------------------------------------------------------------
def encode_params(region: np.ndarray, fingerprint: int) -> bytes:
    data = np.ascontiguousarray(region, np.uint8)
    return PARAMS_HEADER.pack(b"EFPM", IO_VERSION, fingerprint, data.nbytes) + data.tobytes()


def encode_batches(mode: int, fingerprint: int, steps: Sequence[tuple[np.ndarray, np.ndarray | None]],
                   input_bytes: int, label_bytes: int) -> bytes:
    """``steps``: (input, label or None) per step, already in the program's dtypes and shapes."""
    parts = [BATCHES_HEADER.pack(b"EFBT", IO_VERSION, fingerprint, mode, len(steps), input_bytes, label_bytes, 0)]
    for x, y in steps:
        xb = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes()
        yb = b"" if y is None else np.ascontiguousarray(y).astype(y.dtype.newbyteorder("<"), copy=False).tobytes()
        if len(xb) != input_bytes or len(yb) != label_bytes:
            raise DeviceError(f"batch of {len(xb)}+{len(yb)} bytes does not match the program's "
                              f"{input_bytes}+{label_bytes}")
        parts += [xb, yb]
    return b"".join(parts)


@dataclass(frozen=True)
class OutFile:
    losses: np.ndarray          # float32 (steps,)
    cycles: np.ndarray          # uint64 (steps,)
    instructions: np.ndarray    # uint64 (steps,)
    outputs: bytes              # evaluate: every step's output bytes, concatenated
    params: bytes               # train: the parameter region after the last step


def decode_out(data: bytes, mode: int, fingerprint: int, steps: int, params_bytes: int, output_bytes: int) -> OutFile:
    if len(data) < OUT_HEADER.size:
        raise DeviceError(f"out.bin is truncated ({len(data)} bytes, no header)")
    magic, version, mark, got_mode, got_steps, p_bytes, o_bytes, record = OUT_HEADER.unpack_from(data)
    if magic != b"EFOT" or version != IO_VERSION:
        raise DeviceError(f"out.bin has a bad header (magic {magic!r}, version {version})")
    want_params = params_bytes if mode == MODE_TRAIN else 0
    want_output = output_bytes if mode == MODE_EVALUATE else 0
    if (mark, got_mode, got_steps, p_bytes, o_bytes) != (fingerprint, mode, steps, want_params, want_output) or \
            record != STEP_RECORD.itemsize + want_output:
        raise DeviceError("out.bin does not belong to this job (fingerprint, mode, steps or sizes differ)")
    body = OUT_HEADER.size + steps * record
    end = body + want_params
    if len(data) != end + TRAILER.size:
        raise DeviceError(f"out.bin is truncated or too long ({len(data)} bytes, expected {end + TRAILER.size})")
    tail_magic, done = TRAILER.unpack_from(data, end)
    if tail_magic != b"EFND" or done != steps:
        raise DeviceError("out.bin has no valid trailer")
    records = np.frombuffer(data, np.uint8, steps * record, OUT_HEADER.size).reshape(steps, record)
    meta = records[:, :STEP_RECORD.itemsize].copy().view(STEP_RECORD).reshape(steps)
    outputs = records[:, STEP_RECORD.itemsize:].tobytes()
    return OutFile(meta["loss"].astype(np.float32), meta["cycles"].astype(np.uint64),
                   meta["instructions"].astype(np.uint64), outputs, data[body:end])


# ---- the device ------------------------------------------------------------------------------------------
def _view(buffer: np.ndarray, offset: int, info) -> np.ndarray:
    return buffer[offset: offset + info.nbytes].view(info.dtype).reshape(info.shape)


class QemuDevice(ParameterAccess):
    """Runs ``program`` on QEMU (rv32-qemu) or natively (host); same interface as NumpyDevice.

    ``workdir``: where builds and run files go (kept for inspection); default: builds in a shared cache
    directory, run files in a temporary directory removed after each run."""

    kind = "qemu"

    def __init__(self, program: Program, workdir: str | os.PathLike | None = None, *, name: str = "qemu",
                 board: str = "rv32-qemu", timeout_s: float = RUN_TIMEOUT_S, icount: bool = True):
        manifest = self._set_up(program, workdir, name, board, timeout_s, icount)
        self.memory_mib = (manifest.get("memory") or {}).get("memory_mib", 128)

    def _set_up(self, program: Program, workdir: str | os.PathLike | None, name: str, board: str, timeout_s: float,
                icount: bool) -> dict:
        """What every ELF-running device does first (QemuDevice, GvsocDevice): the parameter region with the
        program's values, then the firmware, built once per content key; returns the firmware's manifest."""
        self.name = name
        self.program = program
        self.board = get_board(board)
        self.timeout_s = timeout_s
        self.icount = icount
        self.workdir = Path(workdir) if workdir is not None else None
        self.params = np.zeros(program.params_bytes, np.uint8)
        self.param_views = {n: _view(self.params, off, program.tensors[n]) for n, off in program.param_offsets.items()}
        for n, value in program.values.items():
            if n in self.param_views:
                np.copyto(self.param_views[n], value, casting="same_kind")
        self.lr_tensors = lr_tensors(program)
        source, self.fingerprint = generate(program)
        key = self._firmware_key(source)
        root = self.workdir / "build" if self.workdir else default_cache_dir()
        try:
            self.executable = build_elf(program, root / f"{_slug(program.model)}-{self.board.name}-{key[:16]}",
                                        self.board.name)
        except CompileError as exc:
            raise DeviceError(f"{name}: cannot build the firmware: {exc}") from None
        self.last_run_s = 0.0                                   # wall time of the last run
        self.last_step_cycles = np.zeros(0, np.uint64)          # per-step counters of the last train()
        self.last_step_instructions = np.zeros(0, np.uint64)
        return read_manifest(self.executable)

    def _firmware_key(self, source: str) -> str:
        return firmware_key(source, self.board, memory_map(self.program, self.board))

    # ---- running --------------------------------------------------------------------------------------------
    def _batches(self, x: np.ndarray, y: np.ndarray | None, steps: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        program = self.program
        x_info = program.tensors[program.input]
        y_info = program.tensors[program.label] if program.label else None
        if y_info is not None and y is None:
            raise DeviceError(f"program {program.model!r} needs labels")
        out = []
        for xb, yb in batches(x, y, program.batch, steps):
            xa = np.asarray(xb, x_info.dtype)
            if xa.size != int(np.prod(x_info.shape)):
                raise DeviceError(f"input batch of shape {xa.shape} does not fit {x_info.shape}")
            ya = None
            if y_info is not None:
                ya = np.asarray(yb, y_info.dtype)
                if ya.size != int(np.prod(y_info.shape)):
                    raise DeviceError(f"label batch of shape {ya.shape} does not fit {y_info.shape}")
            out.append((xa, ya))
        return out

    def _phase_sizes(self, mode: int) -> tuple[int, int, int]:
        program = self.program
        label = program.tensors[program.label].nbytes if program.label else 0
        output = program.tensors[program.output].nbytes if mode == MODE_EVALUATE else 0
        return program.tensors[program.input].nbytes, label, output

    def _command(self) -> list[str]:
        if self.board.name == "host":
            return [str(self.executable)]
        if shutil.which(QEMU) is None:
            raise DeviceError(f"{QEMU} not found: install the Debian package {QEMU_PACKAGE}")
        cmd = [QEMU, "-machine", "virt", "-cpu", self.board.qemu_cpu, "-m", f"{self.memory_mib}M", "-bios", "none",
               "-nographic", "-monitor", "none", "-semihosting-config", "enable=on,target=native"]
        if self.icount:
            cmd += ["-icount", "shift=0"]
        return cmd + ["-kernel", str(self.executable)]

    def _run(self, mode: int, steps: list[tuple[np.ndarray, np.ndarray | None]]) -> OutFile:
        input_bytes, label_bytes, output_bytes = self._phase_sizes(mode)
        job = encode_batches(mode, self.fingerprint, steps, input_bytes, label_bytes)
        if self.workdir is not None:
            run_dir = self.workdir / "run"
            run_dir.mkdir(parents=True, exist_ok=True)
            return self._run_in(run_dir, job, mode, len(steps), output_bytes)
        with tempfile.TemporaryDirectory(prefix="edgefleet-run-") as tmp:
            return self._run_in(Path(tmp), job, mode, len(steps), output_bytes)

    def _run_in(self, run_dir: Path, job: bytes, mode: int, steps: int, output_bytes: int) -> OutFile:
        (run_dir / "params.bin").write_bytes(encode_params(self.params, self.fingerprint))
        (run_dir / "batches.bin").write_bytes(job)
        out_path = run_dir / "out.bin"
        out_path.unlink(missing_ok=True)
        proc = self._execute(self._command(), run_dir, self.board.name)
        if proc.returncode != 0:
            raise DeviceError(f"{self.name}: firmware exited with code {proc.returncode} on {self.board.name}: "
                              f"{_cause(proc.returncode, proc.stdout + proc.stderr)}")
        if not out_path.exists():
            raise DeviceError(f"{self.name}: firmware exited without writing out.bin")
        return decode_out(out_path.read_bytes(), mode, self.fingerprint, steps, self.program.params_bytes,
                          output_bytes)

    def _execute(self, cmd: list[str], run_dir: Path, where: str,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run the firmware's command (QEMU, the host executable, GVSoC) within the device's deadline; sets
        ``last_run_s``; a timeout or a command that cannot start is a one-line DeviceError."""
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=run_dir, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=self.timeout_s, env=env)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{self.name}: program {self.program.model!r} did not finish within "
                              f"{self.timeout_s:g} s on {where} (timeout)") from None
        except OSError as exc:
            raise DeviceError(f"{self.name}: cannot start {cmd[0]}: {exc.strerror}") from None
        self.last_run_s = time.perf_counter() - start
        return proc

    def train(self, x: np.ndarray, y: np.ndarray | None, steps: int, lr: float | None = None) -> TrainResult:
        if steps < 1:
            raise DeviceError(f"steps must be >= 1, got {steps}")
        if lr is not None:
            for name in self.lr_tensors:
                self.param_views[name][...] = lr
        start = time.perf_counter()
        out = self._run(MODE_TRAIN, self._batches(x, y, steps))
        self.params[...] = np.frombuffer(out.params, np.uint8)
        telemetry = Telemetry(samples=steps * self.program.batch, steps=steps, wall_s=time.perf_counter() - start,
                              modelled_cycles_per_step=modelled_cycles_per_step(self.program),
                              measured_cycles=int(out.cycles.sum()), instructions=int(out.instructions.sum()),
                              peak_bytes_by_level=dict(self.program.report.get("memory_by_level", {})))
        self.last_step_cycles = out.cycles
        self.last_step_instructions = out.instructions
        return TrainResult(self.get_params(), out.losses, telemetry)

    def evaluate(self, x: np.ndarray, y: np.ndarray | None) -> EvalResult:
        n, batch = len(x), self.program.batch
        steps = -(-n // batch)
        out = self._run(MODE_EVALUATE, self._batches(x, y, steps))
        info = self.program.tensors[self.program.output]
        outputs = np.frombuffer(out.outputs, np.dtype(info.dtype).newbyteorder("<")).astype(info.dtype)
        outputs = outputs.reshape((steps * batch,) + tuple(info.shape[1:]))[:n]
        return EvalResult(float(np.mean(per_sample_loss(self.program.task, outputs, x, y))), outputs, n)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:40] or "program"


def _cause(code: int, output: bytes) -> str:
    text = output.decode(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "RISCV fault" in text:
        pairs = [ln.split(":", 1) for ln in lines if ":" in ln]
        regs = {k.strip(): v.strip() for k, v in pairs if k.strip() in ("mcause", "mepc", "mtval")}
        return "RISC-V fault " + ", ".join(f"{k} {v}" for k, v in regs.items())
    said = [ln for ln in lines if ln.startswith("edgefleet firmware:")]
    if said:
        return said[-1].removeprefix("edgefleet firmware:").strip()
    return FIRMWARE_EXIT.get(code, lines[-1] if lines else "no output")


__all__ = ["QemuDevice", "OutFile", "decode_out", "encode_batches", "encode_params"]
