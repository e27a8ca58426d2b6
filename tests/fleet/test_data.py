"""Per-device data: determinism, label skew, writers and machines, anomalies, npz files and their errors."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from fleet.data import (DIGITS_SHAPE, SOUND_FEATURES, DataError, DeviceData, device_data, fleet_data,
                        global_dataset, sample_shape)
from fleet.scenario import DataSpec

DIGITS = DataSpec(kind="digits", dirichlet_alpha=0.5, samples_per_device=32, test_samples_per_device=16,
                  writer_strength=1.0)
SOUND = DataSpec(kind="machine-sound", dirichlet_alpha=None, samples_per_device=32, test_samples_per_device=20,
                 writer_strength=1.0, anomaly_fraction=0.5)


def assert_same(a: DeviceData, b: DeviceData) -> None:
    for field in dataclasses.fields(DeviceData):
        np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name))


def differs(a: DeviceData, b: DeviceData) -> bool:
    return not np.array_equal(a.x_train, b.x_train)


# ---- shapes and determinism ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, shape", [(DIGITS, DIGITS_SHAPE), (SOUND, (SOUND_FEATURES,))], ids=["digits", "sound"])
def test_shapes_and_dtypes(spec, shape):
    d = device_data(spec, seed=0, device_index=3)
    assert d.x_train.shape == (32, *shape) and d.x_test.shape == (spec.test_samples_per_device, *shape)
    assert d.y_train.shape == (32,) and d.y_test.shape == (spec.test_samples_per_device,)
    assert (d.x_train.dtype, d.y_train.dtype, d.x_test.dtype, d.y_test.dtype) == \
        (np.float32, np.int64, np.float32, np.int64)
    assert sample_shape(spec) == shape
    stacked = fleet_data(spec, 0, [0, 5, 9])
    assert stacked.x_train.shape == (3, 32, *shape) and stacked.y_test.shape == (3, spec.test_samples_per_device)


@pytest.mark.parametrize("spec", [DIGITS, SOUND], ids=["digits", "sound"])
def test_same_seed_same_data_other_seed_or_device_other_data(spec):
    assert_same(device_data(spec, 1, 4), device_data(spec, 1, 4))
    assert differs(device_data(spec, 1, 4), device_data(spec, 2, 4))
    assert differs(device_data(spec, 1, 4), device_data(spec, 1, 5))


@pytest.mark.parametrize("spec", [DIGITS, SOUND], ids=["digits", "sound"])
def test_fleet_data_is_device_data_stacked(spec):
    indices = [7, 0, 123, 7]
    stacked = fleet_data(spec, 11, indices)
    for k, index in enumerate(indices):
        single = device_data(spec, 11, index)
        one = stacked.device(k)
        np.testing.assert_allclose(one.x_train, single.x_train, atol=1e-6)
        np.testing.assert_allclose(one.x_test, single.x_test, atol=1e-6)
        np.testing.assert_array_equal(one.y_train, single.y_train)
        np.testing.assert_array_equal(one.y_test, single.y_test)


@pytest.mark.parametrize("spec", [DIGITS, SOUND], ids=["digits", "sound"])
def test_empty_device_list(spec):
    d = fleet_data(spec, 0, [])
    assert d.x_train.shape == (0, 32, *sample_shape(spec)) and d.y_test.shape == (0, spec.test_samples_per_device)


def test_data_is_read_only():
    d = device_data(DIGITS, 0, 0)
    with pytest.raises(ValueError):
        d.x_train[0, 0, 0, 0] = 1.0


def test_negative_device_index_is_refused():
    with pytest.raises(DataError, match="device indices must be >= 0"):
        fleet_data(DIGITS, 0, [3, -1])


# ---- digits ----------------------------------------------------------------------------------------------

def test_digits_are_images_in_unit_range():
    d = fleet_data(DIGITS, 0, range(20))
    assert d.x_train.min() >= 0.0 and d.x_train.max() <= 1.0
    assert set(np.unique(d.y_train)) <= set(range(10))


def label_distance_from_uniform(alpha: float) -> float:
    """Mean total-variation distance of each device's label histogram from uniform."""
    spec = dataclasses.replace(DIGITS, dirichlet_alpha=alpha, samples_per_device=400, test_samples_per_device=1)
    d = fleet_data(spec, 0, range(20))
    histograms = np.stack([np.bincount(labels, minlength=10) / len(labels) for labels in d.y_train])
    return float(np.abs(histograms - 0.1).sum(axis=1).mean() / 2)


def test_label_skew_follows_dirichlet_alpha():
    assert label_distance_from_uniform(0.1) > 0.6   # one or two labels per device
    assert label_distance_from_uniform(100.0) < 0.1  # nearly uniform


def test_train_and_test_share_the_label_skew():
    spec = dataclasses.replace(DIGITS, dirichlet_alpha=0.1, samples_per_device=200, test_samples_per_device=200)
    d = device_data(spec, 0, 1)
    train = np.bincount(d.y_train, minlength=10) / 200
    test = np.bincount(d.y_test, minlength=10) / 200
    assert np.abs(train - test).sum() / 2 < 0.15


def writer_accuracy(strength: float) -> float:
    """How well a linear model tells two devices apart from their images (labels near uniform, so only the
    writer gives a device away)."""
    spec = dataclasses.replace(DIGITS, dirichlet_alpha=1000.0, writer_strength=strength, samples_per_device=300,
                               test_samples_per_device=100)
    d = fleet_data(spec, 3, [0, 1])
    x_train = d.x_train.reshape(600, -1)
    x_test = d.x_test.reshape(200, -1)
    device_train, device_test = np.repeat([0, 1], 300), np.repeat([0, 1], 100)
    return LogisticRegression(max_iter=2000).fit(x_train, device_train).score(x_test, device_test)


def test_writers_differ():
    assert writer_accuracy(1.0) > 0.8
    assert writer_accuracy(0.0) < 0.7  # without writers, two devices are just two samples of the same data


def test_writer_strength_zero_gives_original_images():
    originals = {img.tobytes() for img in (load_digits().images / 16.0).astype(np.float32)}
    d = device_data(dataclasses.replace(DIGITS, writer_strength=0.0), 0, 5)
    assert all(img.tobytes() in originals for img in d.x_train[:, 0])
    transformed = device_data(DIGITS, 0, 5)
    assert sum(img.tobytes() in originals for img in transformed.x_train[:, 0]) == 0


def test_digits_global_dataset_is_uniform_and_untransformed():
    g = global_dataset(DIGITS, seed=0, n_train=2000, n_test=100)
    assert g.x_train.shape == (2000, *DIGITS_SHAPE) and g.x_test.shape == (100, *DIGITS_SHAPE)
    counts = np.bincount(g.y_train, minlength=10)
    assert counts.min() > 150 and counts.max() < 250
    originals = {img.tobytes(): label for img, label in
                 zip((load_digits().images / 16.0).astype(np.float32), load_digits().target)}
    assert all(originals[img.tobytes()] == label for img, label in zip(g.x_train[:200, 0], g.y_train[:200]))
    assert_same(g, global_dataset(DIGITS, 0, 2000, 100))
    assert not np.array_equal(g.y_train, global_dataset(DIGITS, 1, 2000, 100).y_train)


def test_device_test_images_come_from_sources_pretraining_never_sees():
    g = global_dataset(dataclasses.replace(DIGITS, writer_strength=0.0), 0, 5000, 1)
    plain = dataclasses.replace(DIGITS, writer_strength=0.0, test_samples_per_device=64)
    device_test = fleet_data(plain, 0, range(10)).x_test.reshape(-1, 8, 8)
    seen = {img.tobytes() for img in g.x_train[:, 0]}
    assert not any(img.tobytes() in seen for img in device_test)


# ---- machine sound ---------------------------------------------------------------------------------------

def test_anomalies_only_in_test():
    d = fleet_data(SOUND, 0, range(30))
    assert (d.y_train == 0).all()
    assert set(np.unique(d.y_test)) == {0, 1}
    assert (d.y_test.sum(axis=1) == round(0.5 * SOUND.test_samples_per_device)).all()
    none = fleet_data(dataclasses.replace(SOUND, anomaly_fraction=0.0), 0, range(5))
    assert (none.y_test == 0).all()


def test_sound_is_roughly_standardized():
    g = global_dataset(SOUND, 0, 2000, 10)
    assert abs(g.x_train.mean()) < 0.1 and 0.9 < g.x_train.std() < 1.1
    d = fleet_data(SOUND, 0, range(50))
    assert abs(d.x_train.mean()) < 0.5 and 0.7 < d.x_train.std() < 2.0


def test_anomalies_stand_out_from_the_devices_normal_sound():
    d = fleet_data(dataclasses.replace(SOUND, samples_per_device=64), 0, range(20))
    normal_mean = d.x_train.mean(axis=1, keepdims=True)
    distance = ((d.x_test - normal_mean) ** 2).mean(axis=2)
    assert distance[d.y_test == 1].mean() > 1.3 * distance[d.y_test == 0].mean()


def test_machines_differ():
    def spread(strength: float) -> float:
        d = fleet_data(dataclasses.replace(SOUND, writer_strength=strength, samples_per_device=64), 0, range(10))
        device_means = d.x_train.mean(axis=1)
        return float(device_means.std(axis=0).mean())
    assert spread(1.0) > 3 * spread(0.0)


def test_sound_global_dataset_has_no_signature():
    g = global_dataset(SOUND, 5, 300, 40)
    assert g.x_train.shape == (300, SOUND_FEATURES) and (g.y_train == 0).all() and g.y_test.sum() == 20
    assert_same(g, global_dataset(SOUND, 5, 300, 40))


# ---- npz -------------------------------------------------------------------------------------------------

def write_device(directory, index, n_train=6, n_test=3, **overrides):
    rng = np.random.default_rng(index)
    arrays = {"x_train": rng.standard_normal((n_train, 4)), "y_train": rng.integers(0, 3, n_train),
              "x_test": rng.standard_normal((n_test, 4)), "y_test": rng.integers(0, 3, n_test)}
    arrays.update(overrides)
    arrays = {key: value for key, value in arrays.items() if value is not None}
    np.savez(directory / f"device_{index}.npz", **arrays)
    return arrays


def npz_spec(directory) -> DataSpec:
    return DataSpec(kind="npz", path=str(directory), dirichlet_alpha=None, samples_per_device=None,
                    test_samples_per_device=None, writer_strength=None)


def test_npz_loads_each_device(tmp_path):
    written = [write_device(tmp_path, i) for i in range(3)]
    d = device_data(npz_spec(tmp_path), seed=0, device_index=2)
    np.testing.assert_allclose(d.x_train, written[2]["x_train"].astype(np.float32))
    np.testing.assert_array_equal(d.y_test, written[2]["y_test"])
    assert (d.x_train.dtype, d.y_train.dtype) == (np.float32, np.int64)
    stacked = fleet_data(npz_spec(tmp_path), 0, [0, 2])
    assert stacked.x_train.shape == (2, 6, 4)
    assert_same(stacked.device(1), d)


def test_npz_global_file(tmp_path):
    arrays = write_device(tmp_path, 0)
    (tmp_path / "device_0.npz").rename(tmp_path / "global.npz")
    g = global_dataset(npz_spec(tmp_path), 0, n_train=100)
    np.testing.assert_array_equal(g.y_train, arrays["y_train"])


def npz_error(tmp_path, index=0) -> str:
    with pytest.raises(DataError) as caught:
        device_data(npz_spec(tmp_path), 0, index)
    message = str(caught.value)
    assert "\n" not in message
    assert f"device_{index}.npz" in message
    return message


def test_npz_missing_file(tmp_path):
    write_device(tmp_path, 0)
    assert npz_error(tmp_path, index=1).endswith("device_1.npz: no such file")


def test_npz_missing_key(tmp_path):
    write_device(tmp_path, 0, y_test=None)
    assert "device_0.npz: missing key 'y_test'" in npz_error(tmp_path)


def test_npz_pickled_object_array_is_refused(tmp_path):
    write_device(tmp_path, 0, x_train=np.array([{"evil": 1}] * 6, dtype=object))
    assert "device_0.npz: x_train: an object array needs pickle, which is refused" in npz_error(tmp_path)


def test_npz_pickle_file_is_refused(tmp_path):
    import pickle
    (tmp_path / "device_0.npz").write_bytes(pickle.dumps({"x_train": [1, 2, 3]}))
    assert "device_0.npz: not an .npz archive (pickled data is refused)" in npz_error(tmp_path)


def test_npz_corrupt_files(tmp_path):
    write_device(tmp_path, 0)
    data = (tmp_path / "device_0.npz").read_bytes()
    (tmp_path / "device_0.npz").write_bytes(data[: len(data) // 2])
    assert "device_0.npz: cannot read" in npz_error(tmp_path)
    (tmp_path / "device_0.npz").write_bytes(b"")
    assert "device_0.npz: cannot read" in npz_error(tmp_path)


@pytest.mark.parametrize("overrides, expected", [
    ({"y_train": np.zeros(5, dtype=np.int64)}, "y_train: has 5 labels for 6 samples in x_train"),
    ({"y_train": np.zeros(6)}, "y_train: expected a 1-d integer array, got float64"),
    ({"x_test": np.full((3, 4), np.nan)}, "x_test: holds NaN or infinite values"),
    ({"x_train": np.array(["a"] * 6)}, "x_train: expected a numeric array"),
    ({"x_test": np.zeros((3, 5))}, "x_test: samples of shape (5,) differ from x_train's (4,)"),
], ids=["lengths", "float-labels", "nan", "strings", "sample-shape"])
def test_npz_bad_arrays(tmp_path, overrides, expected):
    write_device(tmp_path, 0, **overrides)
    assert expected in npz_error(tmp_path)


def test_npz_stacking_needs_equal_shapes(tmp_path):
    write_device(tmp_path, 0)
    write_device(tmp_path, 1, n_train=7)
    with pytest.raises(DataError, match=r"device_1\.npz: x_train: shape \(7, 4\) differs from device_0\.npz's"):
        fleet_data(npz_spec(tmp_path), 0, [0, 1])


# ---- cost ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [DIGITS, SOUND], ids=["digits", "sound"])
def test_a_thousand_devices_in_one_call(spec):
    """A thousand devices' data in one vectorised call (how fast: benchmarks/fleet_data.py)."""
    spec = dataclasses.replace(spec, samples_per_device=32, test_samples_per_device=32)
    data = fleet_data(spec, 0, range(1000))
    assert data.x_train.shape[:2] == (1000, 32) and data.x_test.shape[:2] == (1000, 32)
