"""The fast Array codec produces exactly Flower's Array state and reads Flower's arrays back."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord

from fleet.arrays import filled, from_array, from_record, numpy_record, to_array, to_record


@pytest.mark.parametrize("value", [np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(5),
                                   np.zeros((2, 0, 3), np.float64), np.array(2.5, np.float32),
                                   np.random.default_rng(0).normal(size=(128, 4)).astype(np.float32)])
def test_same_as_flower(value):
    ours, flowers = to_array(value), Array(value)
    assert ours.__dict__ == flowers.__dict__
    assert ours.object_id == flowers.object_id
    np.testing.assert_array_equal(from_array(flowers), value)
    np.testing.assert_array_equal(ours.numpy(), value)
    assert from_array(flowers).dtype == value.dtype and from_array(flowers).shape == value.shape


def test_records_round_trip_and_non_contiguous_input():
    arrays = {"a.lora_a": np.asfortranarray(np.ones((4, 2), np.float32)), "b": np.arange(6.0)[::2]}
    record = to_record(arrays)
    assert isinstance(record, ArrayRecord)
    back = from_record(record)
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key], value)


def test_object_arrays_are_refused():
    with pytest.raises(TypeError, match="object"):
        to_array(np.array([object()]))


@pytest.mark.parametrize("value", [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(2.5, np.float32),
                                   np.asfortranarray(np.ones((4, 2), np.float64))])
def test_numpy_array_is_flowers_array_on_the_wire(value):
    """A reply's NumpyArray keeps its ndarray (read-only, no copy) and makes Flower's bytes only on demand;
    deflated, it is a Flower Array: the receiving side inflates a plain Array with the same content."""
    ours, flowers = numpy_record({"w": value})["w"], Array(np.ascontiguousarray(value))
    assert "_npy" not in ours.__dict__ and not from_array(ours).flags.writeable
    np.testing.assert_array_equal(from_array(ours), value)
    assert ours == flowers and flowers == ours and ours.object_id == flowers.object_id
    back = Array.inflate(ours.deflate(), children=ours.children)
    assert type(back) is Array and back == flowers
    np.testing.assert_array_equal(back.numpy(), value)
    zeros = np.zeros(value.shape, np.float32 if value.dtype == np.float32 else value.dtype)
    ours.data = Array(zeros).data  # setting the bytes replaces the ndarray
    np.testing.assert_array_equal(from_array(ours), zeros)


def test_filled_records_equal_flowers_checked_ones():
    metrics = {"device": 3, "loss": 0.25, "curve": [0.5, 0.25]}
    assert filled(MetricRecord, metrics) == MetricRecord(metrics)
    assert numpy_record({"a": np.ones(2)}) == to_record({"a": np.ones(2)})
