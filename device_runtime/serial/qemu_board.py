"""A QEMU-emulated dev board: the ``rv32-qemu-serial`` firmware of a program on ``qemu-system-riscv32 -machine
virt`` with its UART on a pty (``-serial pty``) or a 127.0.0.1 TCP port — the stand-in for a board on a
USB-serial adapter in tests, the demo scenario and ``edgefleet boards flash`` without a flashable board."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from compiler.codegen import build_elf, read_manifest
from compiler.codegen.build import default_cache_dir, firmware_key, get_board, memory_map
from compiler.codegen.emit import generate
from compiler.ir import CompileError
from compiler.program import Program
from device_runtime.device import DeviceError

QEMU = "qemu-system-riscv32"
SERIAL_BOARD = "rv32-qemu-serial"
START_TIMEOUT_S = 10.0
PTY_LINE = re.compile(rb"char device redirected to (\S+) \(label serial0\)")


def build_serial_firmware(program: Program, out_dir: str | os.PathLike | None = None) -> Path:
    """The program's serial firmware for QEMU virt (built once per content in the firmware cache)."""
    board = get_board(SERIAL_BOARD)
    if out_dir is None:
        source, _ = generate(program)
        key = firmware_key(source, board, memory_map(program, board))
        out_dir = default_cache_dir() / f"serial-{key[:16]}"
    try:
        return build_elf(program, out_dir, SERIAL_BOARD)
    except CompileError as exc:
        raise DeviceError(f"cannot build the serial firmware: {exc}") from None


class QemuBoard:
    """Starts QEMU with the firmware ``elf``; ``url`` is what a host opens (a pty path, or socket://)."""

    def __init__(self, elf: str | os.PathLike, *, transport: str = "pty", icount: bool = True,
                 log_dir: str | os.PathLike | None = None, start_timeout_s: float = START_TIMEOUT_S,
                 extra_args: tuple[str, ...] = ()):
        if shutil.which(QEMU) is None:
            raise DeviceError(f"{QEMU} not found: install the Debian package qemu-system-misc")
        self.elf = Path(elf)
        memory_mib = (read_manifest(self.elf).get("memory") or {}).get("memory_mib", 128)
        self._tmp = None if log_dir else tempfile.TemporaryDirectory(prefix="edgefleet-qemu-board-")
        self.log_path = Path(log_dir or self._tmp.name) / "qemu.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if transport == "pty":
            serial, self.port_number = "pty", None
        elif transport == "tcp":
            self.port_number = _free_port()
            serial = f"tcp:127.0.0.1:{self.port_number},server=on,wait=off"
        else:
            raise DeviceError(f"QEMU board transport {transport!r}: expected pty or tcp")
        cmd = [QEMU, "-machine", "virt", "-cpu", "rv32", "-m", f"{memory_mib}M", "-bios", "none",
               "-display", "none", "-serial", serial,
               "-semihosting-config", "enable=on,target=native"]
        if icount:
            cmd += ["-icount", "shift=0"]
        if "-monitor" not in extra_args:
            cmd += ["-monitor", "none"]
        cmd += [*extra_args, "-kernel", str(self.elf)]
        self.command = cmd
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.url = self._wait_for_port(start_timeout_s)

    def _wait_for_port(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.port_number is not None:
                if _listening(self.port_number):
                    return f"socket://127.0.0.1:{self.port_number}"
            else:
                match = PTY_LINE.search(self.log_path.read_bytes())
                if match:
                    return match.group(1).decode()
            if self.process.poll() is not None:
                text = self.log_path.read_text(errors="replace").strip().splitlines()
                raise DeviceError(f"QEMU board exited with code {self.process.returncode}: "
                                  f"{text[-1] if text else 'no output'}")
            time.sleep(0.02)
        self.stop()
        raise DeviceError(f"QEMU board did not open its serial port within {timeout_s:g} s")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """Pull the plug: the process dies at once (its pty or socket goes away)."""
        if self.alive:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.alive:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "QemuBoard":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    import socket
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
