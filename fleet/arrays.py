"""numpy ⇄ Flower ``Array`` without the per-array cost of ``np.save``/``np.load``.

Flower stores an ndarray as the bytes of a ``.npy`` file; its own converters write and parse that header
for every array (~40 µs each), which dominates a round of thousands of small adapters. The header depends
only on dtype and shape, so it is built once per (dtype, shape); decoding reads the raw data after it using
the dtype and shape the Array already carries. The bytes are identical to Flower's, so any Flower code can
still read them with ``Array.numpy()``.
"""
from __future__ import annotations

import io
from functools import lru_cache
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"


@lru_cache(maxsize=4096)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def to_array(value: np.ndarray) -> Array:
    value = np.asarray(value)
    value = value if value.flags.c_contiguous else np.ascontiguousarray(value)  # (keeps 0-d arrays 0-d)
    if value.dtype.hasobject:
        raise TypeError("object arrays cannot be sent")
    shape = tuple(int(d) for d in value.shape)
    data = _npy_header(value.dtype.str, shape) + value.tobytes()
    # the state Flower's own Array(ndarray) path ends in (it too fills __dict__ from a built Array); its
    # keyword constructor validates and tracks each field at ~20 µs an array
    array = Array.__new__(Array)
    array.__dict__.update(dtype=str(value.dtype), shape=shape, stype=NUMPY_STYPE, data=data, _is_dirty=True)
    return array


def from_array(array: Array) -> np.ndarray:
    """The ndarray an Array holds (read-only view of its bytes); falls back to Flower for other forms."""
    if array.stype != NUMPY_STYPE:
        return array.numpy()
    dtype = np.dtype(array.dtype)
    count = int(np.prod(array.shape, dtype=np.int64))
    data = array.data
    offset = len(data) - count * dtype.itemsize
    if offset < 10 or data[:6] != b"\x93NUMPY":
        return array.numpy()
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(array.shape)


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: to_array(np.asarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: from_array(v) for k, v in record.items()}
