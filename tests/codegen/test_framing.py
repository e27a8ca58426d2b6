"""The params.bin / batches.bin / out.bin framing, on plain bytes (no QEMU)."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from device_runtime.device import DeviceError
from device_runtime.qemu import (MODE_EVALUATE, MODE_TRAIN, OUT_HEADER, STEP_RECORD, TRAILER, decode_out,
                                 encode_batches, encode_params)

MARK = 0x1234ABCD


def _out(mode, steps, params: bytes, output_bytes: int, losses, mark=MARK, trailer=True) -> bytes:
    record = STEP_RECORD.itemsize + output_bytes
    head = OUT_HEADER.pack(b"EFOT", 1, mark, mode, steps, len(params), output_bytes, record)
    body = b""
    for i, loss in enumerate(losses):
        rec = np.zeros(1, STEP_RECORD)
        rec["loss"], rec["cycles"], rec["instructions"] = loss, 100 + i, 90 + i
        body += rec.tobytes() + bytes([i]) * output_bytes
    tail = TRAILER.pack(b"EFND", steps) if trailer else b""
    return head + body + params + tail


def test_params_file_is_header_then_region():
    region = np.arange(32, dtype=np.uint8)
    data = encode_params(region, MARK)
    assert struct.unpack_from("<4sIII", data) == (b"EFPM", 1, MARK, 32)
    assert data[16:] == region.tobytes()


def test_batches_file_holds_every_step_in_order():
    steps = [(np.full((2, 3), i, np.float32), np.array([i, i + 1], np.int64)) for i in range(3)]
    data = encode_batches(MODE_TRAIN, MARK, steps, 24, 16)
    assert struct.unpack_from("<4sIIIIIII", data) == (b"EFBT", 1, MARK, MODE_TRAIN, 3, 24, 16, 0)
    per_step = 24 + 16
    second = data[32 + per_step: 32 + 2 * per_step]
    assert np.array_equal(np.frombuffer(second[:24], "<f4"), np.full(6, 1, np.float32))
    assert np.array_equal(np.frombuffer(second[24:], "<i8"), [1, 2])
    with pytest.raises(DeviceError, match="does not match"):
        encode_batches(MODE_TRAIN, MARK, steps, 20, 16)


def test_train_output_decodes():
    params = bytes(range(16))
    out = decode_out(_out(MODE_TRAIN, 2, params, 0, [1.5, 0.5]), MODE_TRAIN, MARK, 2, 16, 0)
    assert list(out.losses) == [1.5, 0.5]
    assert list(out.cycles) == [100, 101] and list(out.instructions) == [90, 91]
    assert out.params == params and out.outputs == b""


def test_evaluate_output_decodes():
    out = decode_out(_out(MODE_EVALUATE, 2, b"", 4, [1.0, 2.0]), MODE_EVALUATE, MARK, 2, 16, 4)
    assert out.outputs == bytes([0] * 4 + [1] * 4) and out.params == b""


@pytest.mark.parametrize("bad, message", [
    (lambda d: d[:-5], "truncated"),
    (lambda d: d[:10], "truncated"),
    (lambda d: b"XXXX" + d[4:], "bad header"),
    (lambda d: d[:-8] + b"EFNX" + d[-4:], "trailer"),
])
def test_malformed_output_is_a_device_error(bad, message):
    data = _out(MODE_TRAIN, 2, bytes(16), 0, [1.0, 2.0])
    with pytest.raises(DeviceError, match=message):
        decode_out(bad(data), MODE_TRAIN, MARK, 2, 16, 0)


def test_output_of_another_job_is_refused():
    data = _out(MODE_TRAIN, 2, bytes(16), 0, [1.0, 2.0], mark=MARK + 1)
    with pytest.raises(DeviceError, match="does not belong to this job"):
        decode_out(data, MODE_TRAIN, MARK, 2, 16, 0)
