"""Serial framing on plain bytes: round trips, resync after garbage, and every corruption detected."""
from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings, strategies as st

from device_runtime.serial import framing as fr

frames = st.builds(fr.Frame, st.integers(0, 255), st.integers(0, 0xFFFF), st.binary(max_size=fr.MAX_PAYLOAD_BYTES))


@given(frames)
def test_frame_round_trip_and_only_delimiter_is_zero(frame):
    wire = fr.encode_frame(frame)
    assert wire.endswith(fr.DELIMITER) and fr.DELIMITER not in wire[:-1]
    assert len(wire) <= fr.MAX_ENCODED_BYTES
    assert fr.decode_frame(wire[:-1]) == frame


@given(st.lists(frames, max_size=5), st.lists(st.integers(1, 4096), max_size=8))
def test_reader_reassembles_frames_fed_in_any_pieces(batch, cuts):
    stream = b"".join(fr.encode_frame(f) for f in batch)
    reader, got, start = fr.FrameReader(), [], 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts) + [len(stream)]:
        got += reader.feed(stream[start:cut])
        start = max(start, cut)
    assert got == batch and reader.pending_bytes == 0


@given(frames, st.binary(min_size=1, max_size=2000))
def test_garbage_before_a_delimiter_costs_one_error_then_resyncs(frame, garbage):
    items = fr.FrameReader().feed(garbage + fr.DELIMITER + fr.encode_frame(frame))
    assert items[-1] == frame
    assert all(isinstance(i, fr.FrameError) for i in items[:-1]) and len(items) <= garbage.count(0) + 2


@settings(max_examples=300)
@given(frames, st.data())
def test_every_bit_flip_is_detected(frame, data):
    """Flipping 1-3 bits of a frame (delimiter included) never yields a frame that decodes to anything."""
    wire = bytearray(fr.encode_frame(frame))
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(0, len(wire) * 8 - 1))
        wire[bit // 8] ^= 1 << (bit % 8)
    original = fr.encode_frame(frame)
    if bytes(wire) == original:
        return
    items = fr.FrameReader().feed(bytes(wire) + fr.DELIMITER)
    assert frame not in items or bytes(wire).rstrip(b"\x00") == original[:-1]
    assert all(isinstance(i, fr.FrameError) for i in items if i != frame)


@given(frames, st.data())
def test_dropped_or_inserted_bytes_are_detected(frame, data):
    wire = bytearray(fr.encode_frame(frame)[:-1])
    at = data.draw(st.integers(0, len(wire) - 1))
    if data.draw(st.booleans()):
        del wire[at]
    else:
        wire.insert(at, data.draw(st.integers(1, 255)))
    with pytest.raises(fr.FrameError):
        fr.decode_frame(bytes(wire))


def test_typed_errors_name_the_cause():
    good = fr.encode_frame(fr.Frame(fr.HELLO, 7, b"abc"))[:-1]
    with pytest.raises(fr.Truncated):
        fr.decode_frame(b"\x03ab")
    with pytest.raises(fr.BadCobs):
        fr.decode_frame(b"\x09ab")
    with pytest.raises(fr.BadCrc, match="CRC-32 mismatch"):
        fr.decode_frame(good[:-1] + bytes([good[-1] ^ 1]))
    body = bytes([2, fr.HELLO, 0, 0])
    from cobs import cobs
    with pytest.raises(fr.BadVersion):
        fr.decode_frame(cobs.encode(body + zlib.crc32(body).to_bytes(4, "little")))
    items = fr.FrameReader().feed(b"\x01" * (fr.MAX_ENCODED_BYTES + 10) + fr.DELIMITER + good + fr.DELIMITER)
    assert isinstance(items[0], fr.TooLong) and items[1] == fr.Frame(fr.HELLO, 7, b"abc")


def test_hello_round_trip_and_payload_layouts():
    hello = fr.Hello(1, 1, 0xDEADBEEF, 8752, 256, 32, 256, 32, 64, 4, 1 << 20, 65536, 1024, "rv32-qemu", "mlp")
    assert fr.Hello.from_bytes(hello.to_bytes()) == hello
    assert fr.Hello.from_dict(hello.to_dict()) == hello
    with pytest.raises(fr.Truncated):
        fr.Hello.from_bytes(hello.to_bytes()[:10])
    assert fr.commit_payload(fr.PARAMS, 5, [(1, 2), (3, 4)]) == bytes([0, 5, 0, 0, 0, 2, 0]) + \
        bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0])
    assert fr.board_error(bytes([6]) + b"x") == "parameters not committed: x"
    assert list(fr.chunks(b"abcde", 2)) == [(0, b"ab"), (2, b"cd"), (4, b"e")]
