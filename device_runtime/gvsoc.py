"""GvsocDevice: runs a Program's siracusa firmware on GVSoC, the PULP platform's simulator (target ``siracusa``).

GVSoC is not on any package registry: the device finds the executable from, in order, the ``gvsoc`` argument
(``--gvsoc PATH`` on the command line), the environment variable ``EDGEFLEET_GVSOC``, or ``gvsoc`` on PATH. The
executable may be GVSoC's own ``install/bin/gvsoc`` (its ``install/python`` is then put on PYTHONPATH) or a
wrapper script that sets up GVSoC's environment and runs it.

A run: the ELF (built once per program by ``compiler.codegen.build_elf(..., board="siracusa")``) is copied, the
parameter region is written into its ``.ef_params`` section and batches.bin into ``.ef_job``, and
``gvsoc --target=siracusa --work-dir DIR --binary X.elf run`` executes it. Cluster core 0 prints the reply as
``EFO <hex>`` lines (out.bin's layout, the parameter part holding only the trainable and optimizer ranges);
``parse_transcript`` turns GVSoC's stdout into those bytes. Results are the same types as every other backend's;
the step counters are cluster cycles (mcycle of cluster core 0) and instructions (PULP counter PCCR1).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from compiler.codegen.build import firmware_key
from compiler.codegen.siracusa import JOB_STEPS, job_header, patch_section
from compiler.ir import CompileError
from compiler.program import Program
from device_runtime.device import DeviceError
from device_runtime.qemu import MODE_TRAIN, OutFile, QemuDevice, _cause, decode_out, encode_batches

GVSOC_ENV = "EDGEFLEET_GVSOC"
GVSOC_TARGET = "siracusa"
RUN_TIMEOUT_S = 1800.0
REPLY_PREFIX = "EFO "
PROFILE_PREFIX = "EFP "
GVSOC_HINT = (f"GVSoC not found: pass --gvsoc PATH, set {GVSOC_ENV}=PATH, or put gvsoc on PATH (GVSoC is built "
              f"from its public sources; see docs/gvsoc.md)")


def find_gvsoc(explicit: str | os.PathLike | None = None) -> Path:
    """The GVSoC executable from the argument, $EDGEFLEET_GVSOC or PATH; DeviceError (one line) if none."""
    for candidate, origin in ((explicit, "--gvsoc"), (os.environ.get(GVSOC_ENV), GVSOC_ENV)):
        if candidate:
            path = Path(candidate)
            if path.is_file() and os.access(path, os.X_OK):
                return path.resolve()
            raise DeviceError(f"{origin} names {candidate}, which is not an executable file; {GVSOC_HINT}")
    found = shutil.which("gvsoc")
    if found is None:
        raise DeviceError(GVSOC_HINT)
    return Path(found).resolve()


def gvsoc_command(gvsoc: Path, elf: Path, work_dir: Path) -> list[str]:
    return [str(gvsoc), f"--target={GVSOC_TARGET}", "--work-dir", str(work_dir), "--binary", str(elf), "run"]


def gvsoc_env(gvsoc: Path) -> dict[str, str]:
    """GVSoC's Python modules beside an installed executable (install/bin/gvsoc → install/python)."""
    env = dict(os.environ)
    python_dir = gvsoc.parent.parent / "python"
    if python_dir.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(python_dir), env.get("PYTHONPATH", "")) if p)
    return env


def parse_transcript(text: str) -> bytes:
    """The reply bytes in GVSoC's stdout: every ``EFO <hex>`` line, in order; other lines are ignored."""
    parts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith(REPLY_PREFIX):
            continue
        digits = line[len(REPLY_PREFIX):].strip()
        try:
            parts.append(bytes.fromhex(digits))
        except ValueError:
            raise DeviceError(f"GVSoC transcript line {number} is not hex: {digits[:40]!r}") from None
    if not parts:
        raise DeviceError("GVSoC transcript holds no reply (no 'EFO' lines)")
    return b"".join(parts)


def firmware_exit_code(text: str) -> int | None:
    """The program's exit code as GVSoC reports it ("Platform returned an error (exitcode: N)"), if it does."""
    match = re.search(r"exitcode: (\d+)\)", text)
    return int(match.group(1)) if match else None


def parse_profile(text: str) -> dict[int, int]:
    """Cycles per program step index from the ``EFP <index> <cycles>`` lines (hex), summed over the job's steps."""
    out: dict[int, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith(PROFILE_PREFIX):
            continue
        fields = line.split()
        try:
            index, cycles = int(fields[1], 16), int(fields[2], 16)
        except (IndexError, ValueError):
            raise DeviceError(f"GVSoC transcript line {number} is not a profile line: {line[:60]!r}") from None
        out[index] = out.get(index, 0) + cycles
    return out


class GvsocDevice(QemuDevice):
    """Runs ``program`` (lowered for a siracusa target) on GVSoC; same interface as NumpyDevice and QemuDevice.

    ``workdir``: where builds and run files go (kept); default: builds in the shared cache, runs in a temporary
    directory. ``last_transcript`` keeps GVSoC's stdout of the last run."""

    kind = "gvsoc"

    def __init__(self, program: Program, workdir: str | os.PathLike | None = None, *, name: str = "gvsoc",
                 gvsoc: str | os.PathLike | None = None, timeout_s: float = RUN_TIMEOUT_S):
        self.gvsoc = find_gvsoc(gvsoc)
        manifest = self._set_up(program, workdir, name, "siracusa", timeout_s, icount=False)
        self.job_steps = int(manifest.get("job_steps", JOB_STEPS))
        self.out_ranges = [tuple(r) for r in manifest.get("out_ranges", [])]
        self.last_transcript = ""
        self.last_profile: dict[int, int] = {}      # cycles per program step index over the last run's steps

    def _firmware_key(self, source: str) -> str:
        return firmware_key(source + job_header(self.program), self.board, None)

    def _run(self, mode: int, steps: list) -> OutFile:
        """Runs of at most ``job_steps`` steps each (the ELF's job region), parameters carried between them."""
        parts = []
        self.last_profile = {}
        for first in range(0, len(steps), self.job_steps):
            chunk = steps[first: first + self.job_steps]
            if self.workdir is not None:
                run_dir = self.workdir / "run"
                run_dir.mkdir(parents=True, exist_ok=True)
                parts.append(self._run_chunk(run_dir, mode, chunk))
            else:
                with tempfile.TemporaryDirectory(prefix="edgefleet-gvsoc-") as tmp:
                    parts.append(self._run_chunk(Path(tmp), mode, chunk))
        return OutFile(np.concatenate([p.losses for p in parts]), np.concatenate([p.cycles for p in parts]),
                       np.concatenate([p.instructions for p in parts]), b"".join(p.outputs for p in parts),
                       parts[-1].params)

    def _run_chunk(self, run_dir: Path, mode: int, steps: list) -> OutFile:
        input_bytes, label_bytes, output_bytes = self._phase_sizes(mode)
        elf = bytearray(self.executable.read_bytes())
        try:
            patch_section(elf, ".ef_params", self.params.tobytes())
            patch_section(elf, ".ef_job", encode_batches(mode, self.fingerprint, steps, input_bytes, label_bytes))
        except CompileError as exc:
            raise DeviceError(f"{self.name}: {exc}") from None
        binary = run_dir / "job.elf"
        binary.write_bytes(bytes(elf))
        proc = self._execute(gvsoc_command(self.gvsoc, binary, run_dir / "gvsoc"), run_dir, "GVSoC",
                             gvsoc_env(self.gvsoc))
        stdout, text = proc.stdout.decode(errors="replace"), (proc.stdout + proc.stderr).decode(errors="replace")
        self.last_transcript = stdout
        (run_dir / "transcript.txt").write_text(text)
        if proc.returncode != 0:
            code = firmware_exit_code(text)
            said = f"the firmware exited with code {code}" if code is not None else \
                f"GVSoC exited with code {proc.returncode}"
            raise DeviceError(f"{self.name}: {said}: {_cause(code or proc.returncode, text.encode())}")
        for index, cycles in parse_profile(stdout).items():
            self.last_profile[index] = self.last_profile.get(index, 0) + cycles
        return self.decode(parse_transcript(stdout), mode, len(steps), output_bytes)

    def decode(self, reply: bytes, mode: int, steps: int, output_bytes: int) -> OutFile:
        """The reply's bytes → OutFile with the whole parameter region (the ranges written over the current one)."""
        range_bytes = sum(size for _, size in self.out_ranges)
        out = decode_out(reply, mode, self.fingerprint, steps, range_bytes, output_bytes)
        region = self.params.copy()
        if mode == MODE_TRAIN:
            data = np.frombuffer(out.params, np.uint8)
            at = 0
            for offset, size in self.out_ranges:
                region[offset: offset + size] = data[at: at + size]
                at += size
        return OutFile(out.losses, out.cycles, out.instructions, out.outputs, region.tobytes())


__all__ = ["GVSOC_ENV", "GVSOC_HINT", "GvsocDevice", "find_gvsoc", "firmware_exit_code", "gvsoc_command",
           "parse_profile",
           "parse_transcript"]
