"""The fast Array codec produces exactly Flower's Array state and reads Flower's arrays back."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fleet.arrays import from_array, from_record, to_array, to_record


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
