"""numpy ⇄ Flower ``Array`` without the per-array cost of ``np.save``/``np.load``.

Flower stores an ndarray as the bytes of a ``.npy`` file; its own converters write and parse that header
for every array (~40 µs each), which dominates a round of thousands of small adapters. The header depends
only on dtype and shape, so it is built once per (dtype, shape); decoding reads the raw data after it using
the dtype and shape the Array already carries. The bytes are identical to Flower's, so any Flower code can
still read them with ``Array.numpy()``.

Replies built on the driver keep the ndarray they were made from (``NumpyArray``): the guard and the
aggregators read it without decoding, and the ``.npy`` bytes are made only if something asks for them (a
stock Flower strategy's ``Array.numpy()``, a deployment's serialization). ``filled`` builds a Flower record
from values the caller has already checked, without Flower's per-item type checks (~3 µs an item).
"""
from __future__ import annotations

import io
from functools import lru_cache
from typing import Any, Mapping, Sequence

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
    array.__dict__.update(dtype=_dtype_name(value.dtype), shape=shape, stype=NUMPY_STYPE, data=data, _is_dirty=True)
    return array


_DTYPE_NAMES: dict[np.dtype, str] = {}


def _dtype_name(dtype: np.dtype) -> str:
    """str(dtype), which numpy builds anew each time (~2 µs)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name


class NumpyArray(Array):
    """A Flower ``Array`` that keeps its ndarray (read-only); ``data``, the ``.npy`` bytes Flower stores, is
    made on first use and is exactly what ``to_array`` makes. Setting ``data`` replaces the ndarray."""

    def __init__(self, value: np.ndarray) -> None:  # pylint: disable=super-init-not-called
        if value.dtype.hasobject:
            raise TypeError("object arrays cannot be sent")
        if value.flags.writeable:  # (a row of a read-only stack is kept as it is)
            value = value.view()
            value.flags.writeable = False
        self.__dict__.update(dtype=_dtype_name(value.dtype), shape=value.shape, stype=NUMPY_STYPE, _is_dirty=True,
                             _ndarray=value)

    @classmethod
    def of_row(cls, value: np.ndarray, dtype: str) -> "NumpyArray":
        """``NumpyArray(value)`` for a row of a read-only, C-contiguous stack of numbers (``dtype``: its name),
        without checking it again for each of thousands of rows."""
        array = cls.__new__(cls)
        array.__dict__.update(dtype=dtype, shape=value.shape, stype=NUMPY_STYPE, _is_dirty=True, _ndarray=value)
        return array

    def __eq__(self, other: object) -> bool:  # any Array with the same fields (the dataclass's needs one class)
        if not isinstance(other, Array):
            return NotImplemented
        return (self.dtype, self.shape, self.stype, self.data) == (other.dtype, other.shape, other.stype, other.data)

    __hash__ = None  # type: ignore[assignment]
    # Flower's wire format names an object's class in its header and inflates by that name: sent, this is an
    # Array (its bytes are Array's), and the receiving side builds a plain Array
    __qualname__ = "Array"

    @property
    def data(self) -> bytes:  # type: ignore[override]
        cached = self.__dict__.get("_npy")
        if cached is None:
            value = self.__dict__["_ndarray"]
            cached = self.__dict__["_npy"] = _npy_header(value.dtype.str, value.shape) + value.tobytes()
        return cached

    @data.setter
    def data(self, value: bytes) -> None:
        self.__dict__.pop("_ndarray", None)
        self.__dict__["_npy"] = value


_EMPTY: dict[type, dict[str, Any]] = {}  # record type → the state its constructor gives an empty record


def filled(record_type: type, items: Mapping[str, Any]):
    """A Flower record (``ArrayRecord``, ``MetricRecord``, ``ConfigRecord``, ``RecordDict``) holding
    ``items``, which the caller guarantees are of the record's value types: an empty record's state (made by
    the constructor once per type) with ``items`` as its data."""
    empty = _EMPTY.get(record_type)
    if empty is None:
        empty = _EMPTY[record_type] = dict(record_type().__dict__)
    record = record_type.__new__(record_type)
    record.__dict__.update(empty)
    record.__dict__["_data"] = dict(items)
    return record


def numpy_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of ``NumpyArray``s: no copy, no bytes until asked for. Arrays that are one row of a
    host's stacks (``protocol.StackRow``) remember (stacks, row) (``stacked_records``)."""
    stacks = getattr(arrays, "stacks", None)
    if stacks is None:
        return filled(ArrayRecord, {k: NumpyArray(np.ascontiguousarray(v)) for k, v in arrays.items()})
    dtypes = getattr(arrays, "dtypes", None)  # set when the stacks are read-only numbers (protocol.decode_results)
    record = filled(ArrayRecord, {k: NumpyArray.of_row(v, dtypes[k]) for k, v in arrays.items()} if dtypes else
                    {k: NumpyArray(v) for k, v in arrays.items()})  # rows of C-contiguous stacks
    # (stacks, row) and the arrays made from them, to tell later that they are untouched
    record.__dict__["_rows"] = ((stacks, arrays.row), tuple(record.__dict__["_data"].values()))
    return record


def _stack_row(record: ArrayRecord) -> tuple[Mapping[str, np.ndarray], int] | None:
    """(stacks, row) when every array of ``record`` is still that row of those stacks, else None."""
    marked = record.__dict__.get("_rows")
    if marked is None:
        return None
    held, made = marked
    arrays = record.__dict__["_data"]
    if len(arrays) != len(made) or len(held[0]) != len(made):
        return None
    for (name, array), original in zip(arrays.items(), made):
        if array is not original or "_ndarray" not in array.__dict__ or name not in held[0]:
            return None
    return held


def stacked_records(records: Sequence[ArrayRecord]) -> list[tuple[Mapping[str, np.ndarray], list[int]]]:
    """``records`` (one per reply, same names and shapes) as groups (stacks, positions): ``stacks[name][j]``
    is ``records[positions[j]][name]``. Records that are rows of one host call's stacks share them (taken
    whole, without a copy, when all their rows are there, in whatever order the replies came); any other
    record is a group of its own. Groups come in the order
    of their first record, so the same replies always give the same groups and the same sums."""
    groups: dict[int, tuple[Mapping[str, np.ndarray], list[int], list[int]]] = {}
    for position, record in enumerate(records):
        held = _stack_row(record)
        if held is None:
            groups[-1 - position] = ({k: from_array(v)[None] for k, v in record.items()}, [0], [position])
            continue
        stacks, row = held
        group = groups.setdefault(id(stacks), (stacks, [], []))
        group[1].append(row)
        group[2].append(position)
    out = []
    for stacks, rows, positions in groups.values():
        size = len(next(iter(stacks.values())))
        if len(rows) == size and len(set(rows)) == size:  # every row of the stacks, in any order: no copy
            by_row = [0] * size
            for row, position in zip(rows, positions):
                by_row[row] = position
            out.append((stacks, by_row))
        else:
            out.append(({k: v[rows] for k, v in stacks.items()}, positions))
    return out


def from_array(array: Array) -> np.ndarray:
    """The ndarray an Array holds (read-only view of its bytes); falls back to Flower for other forms."""
    held = array.__dict__.get("_ndarray")
    if held is not None:
        return held
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
