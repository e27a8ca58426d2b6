"""A serial relay between a host and a board that can misbehave like a flaky USB-serial adapter or cable.

It opens a new pty pair; the host opens ``relay.url`` (the pty's slave) while the relay forwards bytes to and
from the board's own URL (e.g. QEMU's pty). On the way it can rate-limit to a line rate (``baud_rate``, 10 bits
per byte), flip bits (``bit_error_rate`` per bit), drop bytes (``drop_rate``), insert garbage bytes
(``garbage_rate``, per forwarded byte), hold everything (``stall()``) or pull the cable (``pull()``: the host's
pty goes away). Faults are seeded. It records the packets (bytes between zero delimiters) it received and the
ones it delivered, per direction, so a test can check every altered packet against the framing rules.
"""
from __future__ import annotations

import os
import random
import threading
import time
import tty
from dataclasses import dataclass, field

from device_runtime.serial.link import BITS_PER_BYTE, Disconnected, SerialTransport

PIECE_BYTES = 64
IDLE_S = 0.01


@dataclass
class Faults:
    bit_error_rate: float = 0.0
    drop_rate: float = 0.0
    garbage_rate: float = 0.0
    baud_rate: int | None = None      # None: as fast as the ends go
    pull_after_bytes: int | None = None   # pull the cable once this many bytes went to the host


@dataclass
class Direction:
    """What crossed the relay one way."""
    received: list[bytes] = field(default_factory=list)    # packets as the sender sent them
    delivered: list[bytes] = field(default_factory=list)   # packets as the receiver got them
    bytes_in: int = 0
    bytes_out: int = 0
    bits_flipped: int = 0
    bytes_dropped: int = 0
    garbage_bytes: int = 0
    _in: bytearray = field(default_factory=bytearray)
    _out: bytearray = field(default_factory=bytearray)

    def note(self, buffer: bytearray, packets: list[bytes], data: bytes) -> None:
        for b in data:
            if b == 0:
                packets.append(bytes(buffer))
                buffer.clear()
            else:
                buffer.append(b)

    def altered(self) -> list[bytes]:
        """Delivered non-empty packets that are not byte-for-byte a packet the sender sent."""
        sent = set(self.received)
        return [p for p in self.delivered if p and p not in sent]


class Relay:
    def __init__(self, board_url: str, faults: Faults | None = None, *, seed: int = 0):
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self.board = SerialTransport(board_url, self.faults.baud_rate or 115200)
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.url = os.ttyname(slave)
        self._slave = slave                      # kept open so the pty survives until the host opens it
        self.to_board, self.to_host = Direction(), Direction()
        self._stalled = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.error = ""
        self._threads = [threading.Thread(target=self._pump, args=(self._from_host, self._to_board_write,
                                                                  self.to_board), daemon=True),
                         threading.Thread(target=self._pump, args=(self._from_board, self._to_host_write,
                                                                  self.to_host), daemon=True)]
        for t in self._threads:
            t.start()

    # ---- ends ---------------------------------------------------------------------------------------------
    def _from_host(self) -> bytes:
        import select
        ready, _, _ = select.select([self.master], [], [], IDLE_S)
        return os.read(self.master, 4096) if ready else b""

    def _to_host_write(self, data: bytes) -> None:
        os.write(self.master, data)

    def _from_board(self) -> bytes:
        return self.board.receive(IDLE_S)

    def _to_board_write(self, data: bytes) -> None:
        self.board.send(data)

    # ---- faults -------------------------------------------------------------------------------------------
    def _mangle(self, data: bytes, stats: Direction) -> bytes:
        f, rng = self.faults, self.rng
        out = bytearray()
        for b in data:
            if f.drop_rate and rng.random() < f.drop_rate:
                stats.bytes_dropped += 1
                continue
            if f.bit_error_rate:
                for bit in range(8):
                    if rng.random() < f.bit_error_rate:
                        b ^= 1 << bit
                        stats.bits_flipped += 1
            out.append(b)
            if f.garbage_rate and rng.random() < f.garbage_rate:
                out.append(rng.randrange(256))
                stats.garbage_bytes += 1
        return bytes(out)

    def _pump(self, read, write, stats: Direction) -> None:
        busy_until = 0.0                       # the emulated line is busy sending until then
        try:
            while not self._stop.is_set():
                if self._stalled.is_set():
                    time.sleep(IDLE_S)
                    continue
                data = read()
                if not data:
                    continue
                with self._lock:
                    stats.bytes_in += len(data)
                    stats.note(stats._in, stats.received, data)
                    data = self._mangle(data, stats)
                    stats.note(stats._out, stats.delivered, data)
                for i in range(0, len(data), PIECE_BYTES):
                    piece = data[i: i + PIECE_BYTES]
                    if self.faults.baud_rate:
                        now = time.monotonic()
                        busy_until = max(now, busy_until) + len(piece) * BITS_PER_BYTE / self.faults.baud_rate
                        time.sleep(max(0.0, busy_until - now))
                    write(piece)
                    stats.bytes_out += len(piece)
                    cut = self.faults.pull_after_bytes
                    if cut is not None and stats is self.to_host and stats.bytes_out >= cut:
                        self.pull()
                        return
        except (OSError, Disconnected) as exc:
            self.error = str(exc)
            self.pull()

    # ---- control ------------------------------------------------------------------------------------------
    def stall(self, on: bool = True) -> None:
        (self._stalled.set if on else self._stalled.clear)()

    def pull(self) -> None:
        """The cable comes out: the host side's pty closes."""
        self._stop.set()
        for fd in (self.master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass
        self.master = self._slave = -1

    def close(self) -> None:
        self.pull()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=1)
        self.board.close()

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
