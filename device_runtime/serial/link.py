"""The host side of a board link: a pyserial transport and a request/reply session over the framing.

``SerialTransport`` opens any pyserial URL — a pty path (QEMU's ``-serial pty``), ``socket://host:port``,
``/dev/ttyUSB0``, ``loop://`` — through ``serial.serial_for_url``: one code path for all of them. Every
pyserial or OS error becomes ``Disconnected``, here and nowhere else.

``BoardLink`` sends one command at a time and waits for its reply (stop-and-wait): a lost, corrupted or
late reply resends the same frame (same sequence number, so the board answers a duplicate from its reply
cache instead of running the command twice), at most ``MAX_RETRIES`` times, each attempt with the command's
deadline. Time comes from ``clock`` (injectable: timeout tests need no sleeps).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from device_runtime.device import DeviceError
from device_runtime.protocol import CAUSE_DISCONNECTED, CAUSE_ERROR, CAUSE_TIMEOUT
from device_runtime.serial import framing as fr

MAX_RETRIES = 6                 # resends of one command after its first attempt
COMMAND_TIMEOUT_S = 0.5         # per attempt, on top of the frames' time on the line
RUN_STEP_TIMEOUT_S = 60.0       # per training / evaluation step on the board
POLL_S = 0.05                   # longest single wait on the transport
OPEN_TIMEOUT_S = 2.0
DEFAULT_BAUD = 115200
BITS_PER_BYTE = 10              # 8N1: start + 8 data + stop


class LinkError(DeviceError):
    """The link to a board failed; ``cause`` is the protocol's failure cause for the round log."""
    cause = CAUSE_ERROR


class Disconnected(LinkError):
    cause = CAUSE_DISCONNECTED


class LinkTimeout(LinkError):
    cause = CAUSE_TIMEOUT


class BoardError(LinkError):
    """The board understood the command and refused it (REPLY_ERROR)."""
    cause = CAUSE_ERROR


class Transport(Protocol):
    url: str

    def send(self, data: bytes) -> None: ...

    def receive(self, timeout_s: float) -> bytes: ...

    def close(self) -> None: ...


class SerialTransport:
    """A pyserial port; ``receive`` returns what arrived within ``timeout_s`` (possibly nothing)."""

    def __init__(self, url: str, baud_rate: int = DEFAULT_BAUD, timeout_s: float = OPEN_TIMEOUT_S):
        import serial
        self.url = url
        self._serial = serial
        try:
            self.port = serial.serial_for_url(url, baudrate=baud_rate, timeout=timeout_s, write_timeout=timeout_s)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise Disconnected(f"cannot open {url}: {_reason(exc)}") from None

    def _io(self, what: str, call: Callable):
        try:
            return call()
        except (self._serial.SerialException, OSError) as exc:   # the one place serial errors are translated
            raise Disconnected(f"{self.url}: {what} failed: {_reason(exc)}") from None

    def send(self, data: bytes) -> None:
        self._io("write", lambda: self.port.write(data))   # no tcdrain: it waits on the reader, not the line

    def receive(self, timeout_s: float) -> bytes:
        def read() -> bytes:
            self.port.timeout = max(0.0, timeout_s)
            first = self.port.read(1)
            return first + self.port.read(self.port.in_waiting) if first else b""
        return self._io("read", read)

    def close(self) -> None:
        try:
            self.port.close()
        except (self._serial.SerialException, OSError):
            pass


def _reason(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


@dataclass
class LinkStats:
    """Counted over the link's life: what crossed it and what went wrong."""
    frames_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    replies: int = 0
    resends: int = 0
    timeouts: int = 0
    corrupt_frames: int = 0          # frames from the board that failed COBS / CRC / length checks
    board_saw_corrupt: int = 0       # REPLY_CORRUPT: the board could not read what we sent
    stale_replies: int = 0           # replies to an earlier sequence number (a duplicate answered late)
    unexpected_frames: int = 0       # valid frames that are not a reply (e.g. our own echo on loop://)
    link_s: float = 0.0              # time spent in requests
    corrupt_causes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(vars(self))


class BoardLink:
    """Request/reply over a Transport with sequence numbers, deadlines and bounded retries."""

    def __init__(self, transport: Transport, *, baud_rate: int = DEFAULT_BAUD, retries: int = MAX_RETRIES,
                 timeout_s: float = COMMAND_TIMEOUT_S, clock: Callable[[], float] = time.monotonic):
        self.transport = transport
        self.baud_rate = baud_rate
        self.retries = retries
        self.timeout_s = timeout_s
        self.clock = clock
        self.reader = fr.FrameReader()
        self.stats = LinkStats()
        self._seq = int(clock() * 1000) % 0xFFF0   # a fresh session does not collide with a board's cached seq

    @property
    def url(self) -> str:
        return self.transport.url

    def line_s(self, nbytes: int) -> float:
        return nbytes * BITS_PER_BYTE / self.baud_rate

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % fr.SEQ_NONE
        return self._seq

    def request(self, kind: int, payload: bytes = b"", *, timeout_s: float | None = None,
                reply_bytes: int = 64) -> bytes:
        """Send one command and return the payload of its REPLY_OK. ``reply_bytes``: the expected reply size
        (for the deadline). Raises BoardError (the board refused), LinkTimeout (no valid reply after every
        retry) or Disconnected."""
        seq = self._next_seq()
        wire = fr.DELIMITER + fr.encode_frame(fr.Frame(kind, seq, payload))   # leading 0: the board resyncs
        budget = (self.timeout_s if timeout_s is None else timeout_s) + self.line_s(len(wire) + reply_bytes + 16)
        started = self.clock()
        last = "no reply"
        try:
            for attempt in range(1 + self.retries):
                if attempt:
                    self.stats.resends += 1
                self.transport.send(wire)
                self.stats.frames_sent += 1
                self.stats.bytes_sent += len(wire)
                outcome = self._await(seq, self.clock() + budget)
                if isinstance(outcome, bytes):
                    return outcome
                last = outcome
            name = fr.COMMAND_NAMES.get(kind, str(kind))
            raise LinkTimeout(f"{self.url}: no valid reply to {name} after {1 + self.retries} attempts "
                              f"({budget:.2f} s each; last: {last})")
        finally:
            self.stats.link_s += self.clock() - started

    def _await(self, seq: int, deadline: float) -> bytes | str:
        """The reply payload, or why this attempt failed (a short phrase)."""
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                self.stats.timeouts += 1
                return "timeout"
            data = self.transport.receive(min(remaining, POLL_S))
            self.stats.bytes_received += len(data)
            for item in self.reader.feed(data):
                if isinstance(item, fr.FrameError):
                    self.stats.corrupt_frames += 1
                    self.stats.corrupt_causes[item.cause] = self.stats.corrupt_causes.get(item.cause, 0) + 1
                    continue
                if item.kind == fr.REPLY_CORRUPT:
                    self.stats.board_saw_corrupt += 1
                    return "the board received a corrupted frame"
                if item.seq != seq:
                    self.stats.stale_replies += 1
                    continue
                if item.kind == fr.REPLY_ERROR:
                    self.stats.replies += 1
                    raise BoardError(f"{self.url}: board refused: {fr.board_error(item.payload)}")
                if item.kind == fr.REPLY_OK:
                    self.stats.replies += 1
                    return item.payload
                self.stats.unexpected_frames += 1

    def close(self) -> None:
        self.transport.close()
