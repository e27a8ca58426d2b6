"""Serial framing for dev boards, without I/O: frames, commands and replies as bytes (docs/boards.md).

A frame on the wire is ``COBS(header + payload + CRC-32) + 0x00``. The zero byte only ever appears as the
delimiter, so after garbage or a dropped byte the receiver resynchronises at the next zero. The header is
``<BBH``: frame version, kind (a command, or a reply), sequence number. The CRC-32 (zlib's, little-endian)
covers header and payload. ``encode_frame`` builds one; ``decode_frame`` checks one and raises a typed
error; ``FrameReader`` is fed bytes and returns every frame (or the error of every corrupted one) that a
delimiter completed. The board's C implementation (compiler/codegen/boards/serial/) follows the same rules.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

from cobs import cobs

FRAME_VERSION = 1
DELIMITER = b"\x00"
HEADER = struct.Struct("<BBH")            # version, kind, seq
CRC = struct.Struct("<I")
MAX_PAYLOAD_BYTES = 1024                  # per frame; the board's buffers are sized for this (EF_SERIAL_MAX_PAYLOAD)
MAX_FRAME_BYTES = HEADER.size + MAX_PAYLOAD_BYTES + CRC.size
MAX_ENCODED_BYTES = MAX_FRAME_BYTES + MAX_FRAME_BYTES // 254 + 2   # COBS overhead + delimiter
SEQ_NONE = 0xFFFF                         # the board's reply to a frame it could not read (no trusted seq)

# Commands (host -> board)
HELLO, WRITE, COMMIT, READ, CHECKSUM, RUN, COUNTERS, RESET = range(1, 9)
COMMAND_NAMES = {HELLO: "hello", WRITE: "write", COMMIT: "commit", READ: "read", CHECKSUM: "checksum",
                 RUN: "run", COUNTERS: "counters", RESET: "reset"}
# Replies (board -> host)
REPLY_OK, REPLY_ERROR, REPLY_CORRUPT = 0x80, 0x81, 0x82

# Regions a WRITE / READ / CHECKSUM addresses on the board
PARAMS, TRAIN_INPUT, TRAIN_LABEL, EVAL_INPUT, EVAL_LABEL, EVAL_OUTPUT = range(6)
MODE_TRAIN, MODE_EVALUATE = 0, 1

# Error codes in a REPLY_ERROR (first payload byte; the rest is the board's one-line message)
BOARD_ERRORS = {1: "unknown command", 2: "bad region", 3: "out of range", 4: "bad length",
                5: "checksum mismatch", 6: "parameters not committed", 7: "batch checksum mismatch",
                8: "bad mode"}

HELLO_REPLY = struct.Struct("<HHIIIIIIIIIII")
WRITE_HEAD = struct.Struct("<BI")          # region, offset; the data follows
SPAN = struct.Struct("<II")                # offset, length
COMMIT_HEAD = struct.Struct("<BIH")        # region, crc32 of the spans' bytes in order, span count; spans follow
READ_REQ = struct.Struct("<BII")           # region, offset, length
CHECKSUM_HEAD = struct.Struct("<BH")       # region, span count; spans follow
CHECKSUM_REPLY = struct.Struct("<I")
RUN_REQ = struct.Struct("<BHI")            # mode, steps, crc32 of the batch (input bytes then label bytes)
RUN_REPLY = struct.Struct("<fIQQ")         # loss of the last step, steps run, cycles, instructions
COUNTERS_REPLY = struct.Struct("<QQIII")   # cycles, instructions, steps, stack peak bytes, static bytes


class FrameError(ValueError):
    """A frame that cannot be trusted; ``cause`` names why (a short word, for counting)."""
    cause = "corrupt"


class BadCobs(FrameError):
    cause = "cobs"


class Truncated(FrameError):
    cause = "truncated"


class BadCrc(FrameError):
    cause = "crc"


class BadVersion(FrameError):
    cause = "version"


class TooLong(FrameError):
    cause = "too-long"


@dataclass(frozen=True)
class Frame:
    kind: int
    seq: int
    payload: bytes = b""

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.kind) or {REPLY_OK: "ok", REPLY_ERROR: "error",
                                                 REPLY_CORRUPT: "corrupt"}.get(self.kind, f"kind {self.kind}")


def crc32(*parts: bytes) -> int:
    value = 0
    for part in parts:
        value = zlib.crc32(part, value)
    return value & 0xFFFFFFFF


def encode_frame(frame: Frame) -> bytes:
    if len(frame.payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"{frame.name} payload of {len(frame.payload)} bytes > {MAX_PAYLOAD_BYTES}")
    body = HEADER.pack(FRAME_VERSION, frame.kind, frame.seq & 0xFFFF) + bytes(frame.payload)
    return cobs.encode(body + CRC.pack(crc32(body))) + DELIMITER


def decode_frame(packet: bytes) -> Frame:
    """One packet (the bytes between two delimiters, without them) back to a Frame."""
    if len(packet) > MAX_ENCODED_BYTES:
        raise TooLong(f"frame of {len(packet)} encoded bytes > {MAX_ENCODED_BYTES}")
    try:
        raw = cobs.decode(packet)
    except cobs.DecodeError as exc:
        raise BadCobs(f"bad COBS encoding ({exc})") from None
    if len(raw) < HEADER.size + CRC.size:
        raise Truncated(f"frame of {len(raw)} bytes is shorter than header and CRC ({HEADER.size + CRC.size})")
    body, (want,) = raw[:-CRC.size], CRC.unpack(raw[-CRC.size:])
    if crc32(body) != want:
        raise BadCrc(f"CRC-32 mismatch (frame says {want:08x}, bytes give {crc32(body):08x})")
    version, kind, seq = HEADER.unpack_from(body)
    if version != FRAME_VERSION:
        raise BadVersion(f"frame version {version}; this side speaks {FRAME_VERSION}")
    return Frame(kind, seq, body[HEADER.size:])


class FrameReader:
    """Fed bytes in any pieces; returns what each completed packet decoded to: a Frame, or the FrameError
    of a corrupted one (so that one bad frame does not hide the good frames after it). Empty packets (two
    delimiters in a row, e.g. a resync marker) are skipped; a packet that outgrows ``MAX_ENCODED_BYTES``
    is dropped up to the next delimiter and reported once as TooLong."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._overflow = False

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        out: list[Frame | FrameError] = []
        start = 0
        while True:
            end = data.find(DELIMITER, start)
            piece = data[start:] if end < 0 else data[start:end]
            if not self._overflow:
                self._buffer += piece
                if len(self._buffer) > MAX_ENCODED_BYTES:
                    self._overflow = True
                    self._buffer.clear()
                    out.append(TooLong(f"no delimiter within {MAX_ENCODED_BYTES} bytes"))
            if end < 0:
                return out
            if not self._overflow and self._buffer:
                try:
                    out.append(decode_frame(bytes(self._buffer)))
                except FrameError as exc:
                    out.append(exc)
            self._buffer.clear()
            self._overflow = False
            start = end + 1

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)


# ---- command payloads ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    """What a board says about itself (the reply to HELLO)."""
    protocol_version: int
    firmware_version: int
    program_hash: int                # the layout fingerprint of the training program the board holds
    params_bytes: int
    train_input_bytes: int
    train_label_bytes: int
    eval_input_bytes: int
    eval_label_bytes: int
    eval_output_bytes: int
    batch: int
    ram_bytes: int                   # the board's RAM for data (parameters, arena, stack)
    stack_bytes: int
    max_payload_bytes: int
    target: str                      # the board (firmware build), e.g. "rv32-qemu"
    model: str                       # the program's model name

    def to_bytes(self) -> bytes:
        numbers = HELLO_REPLY.pack(*(getattr(self, f) for f in HELLO_FIELDS))
        return numbers + self.target.encode() + b"\x00" + self.model.encode()

    @classmethod
    def from_bytes(cls, payload: bytes) -> "Hello":
        if len(payload) < HELLO_REPLY.size:
            raise Truncated(f"hello reply of {len(payload)} bytes < {HELLO_REPLY.size}")
        numbers = HELLO_REPLY.unpack_from(payload)
        target, _, model = payload[HELLO_REPLY.size:].partition(b"\x00")
        return cls(*numbers, target.decode(errors="replace"), model.rstrip(b"\x00").decode(errors="replace"))

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in (*HELLO_FIELDS, "target", "model")}

    @classmethod
    def from_dict(cls, raw: dict) -> "Hello":
        return cls(**raw)


HELLO_FIELDS = ("protocol_version", "firmware_version", "program_hash", "params_bytes", "train_input_bytes",
                "train_label_bytes", "eval_input_bytes", "eval_label_bytes", "eval_output_bytes", "batch",
                "ram_bytes", "stack_bytes", "max_payload_bytes")


@dataclass(frozen=True)
class RunReply:
    loss: float
    steps: int
    cycles: int
    instructions: int


@dataclass(frozen=True)
class Counters:
    cycles: int
    instructions: int
    steps: int
    stack_peak_bytes: int
    static_bytes: int


def write_payload(region: int, offset: int, data: bytes) -> bytes:
    return WRITE_HEAD.pack(region, offset) + bytes(data)


def spans_payload(spans: Sequence[tuple[int, int]]) -> bytes:
    return b"".join(SPAN.pack(o, n) for o, n in spans)


def commit_payload(region: int, crc: int, spans: Sequence[tuple[int, int]]) -> bytes:
    return COMMIT_HEAD.pack(region, crc, len(spans)) + spans_payload(spans)


def checksum_payload(region: int, spans: Sequence[tuple[int, int]]) -> bytes:
    return CHECKSUM_HEAD.pack(region, len(spans)) + spans_payload(spans)


def read_payload(region: int, offset: int, length: int) -> bytes:
    return READ_REQ.pack(region, offset, length)


def run_payload(mode: int, steps: int, batch_crc: int) -> bytes:
    return RUN_REQ.pack(mode, steps, batch_crc)


def unpack_reply(fmt: struct.Struct, payload: bytes, what: str) -> tuple:
    if len(payload) != fmt.size:
        raise Truncated(f"{what} reply of {len(payload)} bytes, expected {fmt.size}")
    return fmt.unpack(payload)


def board_error(payload: bytes) -> str:
    """The one line a REPLY_ERROR carries."""
    if not payload:
        return "board error (no code)"
    code, text = payload[0], payload[1:].decode(errors="replace").strip()
    return f"{BOARD_ERRORS.get(code, f'error {code}')}" + (f": {text}" if text else "")


def chunks(data: bytes, size: int) -> Iterable[tuple[int, bytes]]:
    """(offset, piece) of at most ``size`` bytes covering ``data``."""
    for offset in range(0, len(data), size):
        yield offset, data[offset: offset + size]
