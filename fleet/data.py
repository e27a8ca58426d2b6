"""Per-device data, generated deterministically from (scenario seed, device index).

Three kinds (``DataSpec.kind``):

digits
    scikit-learn's 8x8 handwritten digits (values 0..16, scaled to [0, 1]), shape (n, 1, 8, 8). Every device
    is a *writer*: its own rotation, slant, scale, offset, stroke thickness, contrast and sensor noise, all
    scaled by ``writer_strength``, applied to images whose labels follow the device's Dirichlet(
    ``dirichlet_alpha``) label distribution. Train and test come from the same writer and label mix. The 1,797
    source images are split once (fixed, seed-independent) into three disjoint pools: one for
    ``global_dataset`` (base-model pretraining), one for device training and one for device testing, so no
    device is tested on a source image it or the base model has seen.
machine-sound
    Synthetic log-mel features of length 640 (5 frames x 128 bins, as MLPerf Tiny's Deep-AE reads). A
    shared machine (harmonics of a rotating part over a tilted background) varies from clip to clip in speed,
    load and noise; each device adds its own signature (shifted fundamental, a structural resonance, gain,
    noise floor) scaled by ``writer_strength``. Training clips are normal (y = 0); a share
    ``anomaly_fraction`` of each test set is anomalous (y = 1): an extra tone, a broadband burst in some
    frames, or a shifted resonance. Features are standardized with fixed constants of the generic machine, so
    values are roughly zero mean, unit variance.
npz
    ``<path>/device_<i>.npz`` per device with x_train, y_train, x_test, y_test (``global.npz`` for
    ``global_dataset``), loaded without pickle. Problems raise ``DataError`` naming file and key.

Each device draws its random numbers from its own generator, seeded by (seed, kind, device index); the
arithmetic is then done for many devices at once. ``device_data(spec, seed, i)`` equals device i of
``fleet_data(spec, seed, [..., i, ...])``.
"""
from __future__ import annotations

import dataclasses
import functools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from fleet.scenario import DataSpec

DIGITS_SHAPE = (1, 8, 8)
DIGITS_CLASSES = 10
SOUND_FRAMES = 5
SOUND_MELS = 128
SOUND_FEATURES = SOUND_FRAMES * SOUND_MELS  # 640

# Streams keep the generators of different uses apart for the same (seed, index).
_STREAM_DIGITS, _STREAM_SOUND, _STREAM_GLOBAL = 1, 2, 3
_POOL_SPLIT_SEED = 8_8_2024          # fixed: the pool split never depends on the scenario seed
_POOL_SHARES = (0.5, 0.33)           # global, device-train; the rest is device-test

# Writer transforms at writer_strength = 1 (all scale linearly with the strength).
WRITER_ROTATION_DEG = 12.0           # writer's rotation ~ U(-12, 12) degrees
WRITER_SLANT = 0.25                  # horizontal shear per row
WRITER_SCALE = 0.12                  # relative scale change per axis
WRITER_SHIFT_PX = 0.5
WRITER_THICKNESS = 0.7               # blend towards dilation (>0) or erosion (<0)
WRITER_CONTRAST = 0.2
WRITER_NOISE = (0.02, 0.08)          # sensor noise standard deviation range
SAMPLE_ROTATION_DEG = 3.0            # a writer is not perfectly consistent: per-image jitter
SAMPLE_SHIFT_PX = 0.2
_DIGITS_CHUNK = 4096                 # images rendered per vectorized step
_STROKE_FOOTPRINT = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)

# The machine, in dB-like units before standardization.
SOUND_TILT_DB = -20.0                # background level from the lowest to the highest bin
SOUND_HARMONICS = 12
SOUND_FUNDAMENTAL_BIN = 7.0
SOUND_HARMONIC_DB = 14.0
SOUND_HARMONIC_DECAY = 6.0           # harmonic k has SOUND_HARMONIC_DB * exp(-(k-1)/decay)
SOUND_HARMONIC_WIDTH = 1.2           # bins
SOUND_SPEED_RANGE = 0.04             # normal operation: speed within 1 +- 4 %
SOUND_LOAD_DB = 1.5                  # per-clip level standard deviation
SOUND_FRAME_DB = 0.5                 # per-frame level jitter
SOUND_NOISE_DB = 1.5                 # per-bin noise
# Device signature at writer_strength = 1.
SIGNATURE_FUNDAMENTAL = 0.08         # relative shift of the fundamental
SIGNATURE_RESONANCE_BIN = (25.0, 90.0)
SIGNATURE_RESONANCE_DB = (2.0, 6.0)
SIGNATURE_RESONANCE_WIDTH = 6.0
SIGNATURE_GAIN_DB = 3.0
SIGNATURE_FLOOR_DB = 3.0             # level change towards the high bins, +-
# Anomalies (test only).
ANOMALY_TONE_DB = (4.0, 10.0)
ANOMALY_TONE_WIDTH = 0.7
ANOMALY_BURST_DB = (3.0, 7.0)
ANOMALY_BURST_BINS = (30, 80)
ANOMALY_RESONANCE_DB = (4.0, 8.0)
ANOMALY_RESONANCE_SHIFT = (15.0, 30.0)
ANOMALY_RESONANCE_WIDTH = 3.0
_UNIFORM_TO_UNIT = np.float32(np.sqrt(12.0))  # U(-1/2, 1/2) * sqrt(12) has unit variance
_SOUND_CHUNK = 2048                  # clips rendered per vectorized step (bounds temporary memory)
_NORMALIZATION_CLIPS = 2048

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """Unusable data; the message is one line naming the file and key."""


@dataclass(frozen=True)
class DeviceData:
    """One device's data (x: float32 (n, *sample_shape), y: int64 (n,)), or many devices' stacked along a
    leading device axis when returned by ``fleet_data``."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def device(self, k: int) -> "DeviceData":
        """Device k of a stacked ``fleet_data`` result."""
        return DeviceData(self.x_train[k], self.y_train[k], self.x_test[k], self.y_test[k])


def sample_shape(spec: DataSpec) -> tuple[int, ...] | None:
    """The shape of one sample (None for npz: it is whatever the files hold)."""
    return {"digits": DIGITS_SHAPE, "machine-sound": (SOUND_FEATURES,)}.get(spec.kind)


def device_data(spec: DataSpec, seed: int, device_index: int) -> DeviceData:
    """The data of one device."""
    if spec.kind == "npz":
        return _load_npz(_npz_dir(spec) / f"device_{device_index}.npz")
    return fleet_data(spec, seed, [device_index]).device(0)


def fleet_data(spec: DataSpec, seed: int, device_indices: Sequence[int]) -> DeviceData:
    """The data of many devices, stacked: x (n_devices, n, *sample_shape), y (n_devices, n)."""
    indices = [int(i) for i in device_indices]
    if any(i < 0 for i in indices):
        raise DataError(f"device indices must be >= 0, got {min(indices)}")
    if spec.kind == "npz":
        return _stack_npz(spec, indices)
    if spec.kind == "digits":
        rngs = [np.random.default_rng([seed, _STREAM_DIGITS, i]) for i in indices]
        x, y = _digits_clips(rngs, spec)
    elif spec.kind == "machine-sound":
        rngs = [np.random.default_rng([seed, _STREAM_SOUND, i]) for i in indices]
        x, y = _sound_clips(rngs, spec, spec.writer_strength)
    else:
        raise DataError(f"unknown data kind {spec.kind!r}")
    n_train, n = spec.samples_per_device, spec.samples_per_device + spec.test_samples_per_device
    x = _read_only(x.reshape(len(indices), n, *x.shape[1:]))
    y = _read_only(y.reshape(len(indices), n))
    return DeviceData(x[:, :n_train], y[:, :n_train], x[:, n_train:], y[:, n_train:])


def global_dataset(spec: DataSpec, seed: int, n_train: int, n_test: int = 256) -> DeviceData:
    """Non-personalized data for pretraining the base model: digits without writer transforms and with
    uniform labels (test images from the device-test pool); sound from the generic machine without a device
    signature (test mixed with anomalies as for devices); npz: ``<path>/global.npz``."""
    if spec.kind == "npz":
        return _load_npz(_npz_dir(spec) / "global.npz")
    rng = np.random.default_rng([seed, _STREAM_GLOBAL])
    if spec.kind == "digits":
        pools = _digits_pools()
        train_labels = rng.integers(0, DIGITS_CLASSES, n_train)
        test_labels = rng.integers(0, DIGITS_CLASSES, n_test)
        x_train = pools.images[_pick(rng, pools.global_pool, train_labels)]
        x_test = pools.images[_pick(rng, pools.test_pool, test_labels)]
        return DeviceData(*map(_read_only, (x_train.reshape(n_train, *DIGITS_SHAPE), train_labels.astype(np.int64),
                                            x_test.reshape(n_test, *DIGITS_SHAPE), test_labels.astype(np.int64))))
    if spec.kind == "machine-sound":
        generic = dataclasses.replace(spec, samples_per_device=n_train, test_samples_per_device=n_test)
        x, y = map(_read_only, _sound_clips([rng], generic, strength=0.0))
        return DeviceData(x[:n_train], y[:n_train], x[n_train:], y[n_train:])
    raise DataError(f"unknown data kind {spec.kind!r}")


def _concat(draws: list, cls: type) -> object:
    """Per-device draws joined field by field into one draw for all their samples."""
    return cls(*(np.concatenate([getattr(d, f.name) for d in draws]) for f in dataclasses.fields(cls)))


def _read_only(array: np.ndarray) -> np.ndarray:
    """Data is shared (views into one block), so nobody may change it in place."""
    array.flags.writeable = False
    return array


# ---- digits ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _DigitPools:
    images: np.ndarray        # (1797, 8, 8) float32 in [0, 1]
    global_pool: np.ndarray   # (10, 1 + max) per label: the count, then image indices
    train_pool: np.ndarray
    test_pool: np.ndarray


@functools.cache
def _digits_pools() -> _DigitPools:
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

    digits = load_digits()
    images = _read_only((digits.images / 16.0).astype(np.float32))
    rng = np.random.default_rng(_POOL_SPLIT_SEED)
    pools: list[list[np.ndarray]] = [[], [], []]
    for label in range(DIGITS_CLASSES):
        members = rng.permutation(np.flatnonzero(digits.target == label))
        first = int(len(members) * _POOL_SHARES[0])
        second = first + int(len(members) * _POOL_SHARES[1])
        for pool, part in zip(pools, (members[:first], members[first:second], members[second:])):
            pool.append(part)
    return _DigitPools(images, *(_pad_pool(pool) for pool in pools))


def _pad_pool(per_label: list[np.ndarray]) -> np.ndarray:
    """(10, 1 + max) table: column 0 holds the count, then the indices."""
    width = max(len(p) for p in per_label)
    table = np.zeros((len(per_label), 1 + width), dtype=np.int64)
    for label, members in enumerate(per_label):
        table[label, 0] = len(members)
        table[label, 1:1 + len(members)] = members
    return table


def _pick(rng: np.random.Generator, pool: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A uniformly drawn source image index of each label."""
    counts = pool[labels, 0]
    return pool[labels, 1 + (rng.random(len(labels)) * counts).astype(np.int64)]


@dataclass(frozen=True)
class _DigitsDraw:
    """Everything random about some images; rendering them is then plain arithmetic."""
    source: np.ndarray     # (n,) index into the digits images
    labels: np.ndarray     # (n,)
    inverse: np.ndarray    # (n, 2, 2) output (row, col) -> source (row, col), about the image centre
    offset: np.ndarray     # (n, 2) shift in pixels
    thickness: np.ndarray  # (n,) in [-1, 1]
    contrast: np.ndarray   # (n,)
    noise: np.ndarray      # (n, 8, 8) already scaled by the writer's noise level


def _digits_clips(rngs: list[np.random.Generator], spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """Images of one device per generator: x (devices * n, 1, 8, 8), y (devices * n,)."""
    draws = [_draw_digits_device(rng, spec) for rng in rngs]
    if not draws:
        return np.zeros((0, *DIGITS_SHAPE), np.float32), np.zeros(0, np.int64)
    draw = _concat(draws, _DigitsDraw)
    return _render_digits(draw).reshape(-1, *DIGITS_SHAPE), draw.labels


def _draw_digits_device(rng: np.random.Generator, spec: DataSpec) -> _DigitsDraw:
    pools = _digits_pools()
    n_train, n_test = spec.samples_per_device, spec.test_samples_per_device
    n = n_train + n_test
    s = spec.writer_strength
    label_cdf = np.cumsum(rng.dirichlet(np.full(DIGITS_CLASSES, spec.dirichlet_alpha)))
    label_cdf /= label_cdf[-1]
    labels = np.minimum(np.searchsorted(label_cdf, rng.random(n), side="right"), DIGITS_CLASSES - 1)
    source = np.concatenate([_pick(rng, pools.train_pool, labels[:n_train]),
                             _pick(rng, pools.test_pool, labels[n_train:])])
    # the writer
    rotation_deg = s * rng.uniform(-WRITER_ROTATION_DEG, WRITER_ROTATION_DEG)
    slant = s * rng.uniform(-WRITER_SLANT, WRITER_SLANT)
    scale_row, scale_col = 1.0 + s * rng.uniform(-WRITER_SCALE, WRITER_SCALE, 2)
    shift = s * rng.uniform(-WRITER_SHIFT_PX, WRITER_SHIFT_PX, 2)
    thickness = np.clip(s * rng.uniform(-WRITER_THICKNESS, WRITER_THICKNESS), -1.0, 1.0)
    contrast = 1.0 + s * rng.uniform(-WRITER_CONTRAST, WRITER_CONTRAST)
    noise_std = s * rng.uniform(*WRITER_NOISE)
    # each image
    angle = np.deg2rad(rotation_deg + s * SAMPLE_ROTATION_DEG * rng.standard_normal(n))
    offset = shift + s * SAMPLE_SHIFT_PX * rng.standard_normal((n, 2))
    noise = noise_std * rng.standard_normal((n, 8, 8), dtype=np.float32)
    # forward map (row, col) -> rotation @ slant @ scale; store its inverse
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = cos * scale_row - sin * slant * scale_row, -sin * scale_col
    c, d = sin * scale_row + cos * slant * scale_row, cos * scale_col
    det = a * d - b * c
    inverse = np.stack([np.stack([d, -b], -1), np.stack([-c, a], -1)], -2) / det[:, None, None]
    return _DigitsDraw(source=source, labels=labels.astype(np.int64), inverse=inverse.astype(np.float32),
                       offset=offset.astype(np.float32), thickness=np.full(n, thickness, np.float32),
                       contrast=np.full(n, contrast, np.float32), noise=noise.astype(np.float32))


def _render_digits(draw: _DigitsDraw) -> np.ndarray:
    """(n, 8, 8) float32 in [0, 1]: stroke thickness, then the affine warp, contrast and noise."""
    n = len(draw.source)
    out = np.empty((n, 8, 8), dtype=np.float32)
    for start in range(0, n, _DIGITS_CHUNK):  # chunks small enough to stay in cache
        part = slice(start, start + _DIGITS_CHUNK)
        images = _digits_pools().images[draw.source[part]]
        thicker = ndimage.grey_dilation(images, footprint=_STROKE_FOOTPRINT)
        thinner = ndimage.grey_erosion(images, footprint=_STROKE_FOOTPRINT)
        grow = np.maximum(draw.thickness[part], 0)[:, None, None]
        shrink = np.maximum(-draw.thickness[part], 0)[:, None, None]
        images = images + grow * (thicker - images) + shrink * (thinner - images)
        warped = _warp(images, draw.inverse[part], draw.offset[part])
        out[part] = np.clip(warped * draw.contrast[part, None, None] + draw.noise[part], 0.0, 1.0)
    return out


def _warp(images: np.ndarray, inverse: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Bilinear resampling of each image through its own inverse affine map; outside the image is 0."""
    n, height, width = images.shape
    centre_row, centre_col = (height - 1) / 2, (width - 1) / 2
    rows = (np.arange(height, dtype=np.float32) - centre_row)[None, :, None] - offset[:, 0, None, None]
    cols = (np.arange(width, dtype=np.float32) - centre_col)[None, None, :] - offset[:, 1, None, None]
    src_row = inverse[:, 0, 0, None, None] * rows + inverse[:, 0, 1, None, None] * cols + centre_row
    src_col = inverse[:, 1, 0, None, None] * rows + inverse[:, 1, 1, None, None] * cols + centre_col
    src_row = np.clip(src_row, -1.0, height)
    src_col = np.clip(src_col, -1.0, width)
    row0 = np.clip(np.floor(src_row), -1, height - 1).astype(np.int64)
    col0 = np.clip(np.floor(src_col), -1, width - 1).astype(np.int64)
    frac_row, frac_col = src_row - row0.astype(np.float32), src_col - col0.astype(np.float32)
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))  # a ring of zeros: index -1 and height map into it
    image = np.arange(n)[:, None, None]
    r, c = row0 + 1, col0 + 1
    top = padded[image, r, c] * (1 - frac_col) + padded[image, r, c + 1] * frac_col
    bottom = padded[image, r + 1, c] * (1 - frac_col) + padded[image, r + 1, c + 1] * frac_col
    return top * (1 - frac_row) + bottom * frac_row


# ---- machine sound ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _SoundDraw:
    """The random numbers behind some clips, one row per clip; ``_sound_db`` turns them into levels."""
    signature: np.ndarray   # (n, 5) uniform: the device's fundamental, resonance bin, resonance dB, gain, floor
    uniform: np.ndarray     # (n, 15) uniform: speed, tone (bin, dB), shifted resonance (side, shift, dB),
    #                         burst (low bin, width, dB), burst frames (5), forced burst frame
    normal: np.ndarray      # (n, 6) standard normal: clip load, frame jitter (5)
    anomaly: np.ndarray     # (n,) 0 normal, 1 tone, 2 burst, 3 shifted resonance


def _sound_clips(rngs: list[np.random.Generator], spec: DataSpec, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Clips of one device per generator: x (devices * n, 640) standardized, y (devices * n,) 1 = anomaly.

    The per-bin noise is drawn straight into the output (it is most of the random numbers, and uniform
    noise is several times cheaper to draw than Gaussian; its shape does not matter here)."""
    n = spec.samples_per_device + spec.test_samples_per_device
    levels = np.empty((len(rngs) * n, SOUND_FRAMES, SOUND_MELS), dtype=np.float32)
    draws = []
    for k, rng in enumerate(rngs):
        draws.append(_draw_sound_device(rng, spec))
        rng.random(out=levels[k * n:(k + 1) * n], dtype=np.float32)
    if not draws:
        return levels.reshape(0, SOUND_FEATURES), np.zeros(0, np.int64)
    draw = _concat(draws, _SoundDraw)
    mean_db, scale_db = _sound_normalization()
    for start in range(0, len(levels), _SOUND_CHUNK):
        part = slice(start, start + _SOUND_CHUNK)
        _sound_levels(draw, part, strength, levels[part], mean_db, scale_db)
    return levels.reshape(-1, SOUND_FEATURES), (draw.anomaly > 0).astype(np.int64)


def _draw_sound_device(rng: np.random.Generator, spec: DataSpec) -> _SoundDraw:
    n_train, n_test = spec.samples_per_device, spec.test_samples_per_device
    n = n_train + n_test
    anomaly = np.zeros(n, dtype=np.int64)
    n_faulty = int(round(spec.anomaly_fraction * n_test))
    anomaly[n_train + rng.permutation(n_test)[:n_faulty]] = rng.integers(1, 4, n_faulty)
    return _SoundDraw(signature=np.broadcast_to(rng.random(5, dtype=np.float32), (n, 5)),
                      uniform=rng.random((n, 15), dtype=np.float32),
                      normal=rng.standard_normal((n, 6), dtype=np.float32),
                      anomaly=anomaly)


def _between(u: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    return bounds[0] + u * (bounds[1] - bounds[0])


def _bump(bins: np.ndarray, centre: np.ndarray, height: np.ndarray, width: float | np.ndarray) -> np.ndarray:
    """A Gaussian peak per clip: (clips, 1) parameters -> (clips, bins)."""
    return height * np.exp(-0.5 * ((bins - centre) / width) ** 2)


def _sound_levels(draw: _SoundDraw, part: slice, strength: float, levels: np.ndarray,
                  mean_db: np.ndarray | float = 0.0, scale_db: float = 1.0) -> None:
    """Turn ``levels`` (clips, 5, 128) of the clips in ``part`` from uniform per-bin noise in [0, 1) into
    (level_dB - mean_db) / scale_db, in place (the big array is touched four times; everything else is per
    clip or per clip and bin)."""
    f32 = np.float32
    bins = np.arange(SOUND_MELS, dtype=f32)
    position = bins / f32(SOUND_MELS - 1)
    sig, u, z, anomaly = draw.signature[part], draw.uniform[part], draw.normal[part], draw.anomaly[part, None]
    s = f32(strength)
    # the device's signature (columns of (clips, 1))
    fundamental = SOUND_FUNDAMENTAL_BIN * (1 + s * SIGNATURE_FUNDAMENTAL * (2 * sig[:, 0:1] - 1))
    resonance_bin = _between(sig[:, 1:2], SIGNATURE_RESONANCE_BIN)
    resonance_db = s * _between(sig[:, 2:3], SIGNATURE_RESONANCE_DB)
    level_db = s * SIGNATURE_GAIN_DB * (2 * sig[:, 3:4] - 1) + SOUND_LOAD_DB * z[:, 0:1]
    floor_db = s * SIGNATURE_FLOOR_DB * (2 * sig[:, 4:5] - 1)
    # harmonics of the clip's speed: each bin hears only its nearest harmonic (the others are > 4 widths away)
    fundamental = fundamental * (1 + SOUND_SPEED_RANGE * (2 * u[:, 0:1] - 1))
    k = np.clip(np.rint(bins / fundamental), 1, SOUND_HARMONICS)
    distance = (bins - k * fundamental) / SOUND_HARMONIC_WIDTH
    harmonics = SOUND_HARMONIC_DB * np.exp(-(k - 1) / SOUND_HARMONIC_DECAY - 0.5 * distance**2)
    spectrum = (SOUND_TILT_DB * position + floor_db * position + level_db + harmonics
                + _bump(bins, resonance_bin, resonance_db, SIGNATURE_RESONANCE_WIDTH))
    # faults: a tone, or the resonance moved and sharpened (one bump serves both)
    side = np.where(u[:, 3:4] < 0.5, -1, 1)
    moved_bin = np.clip(resonance_bin + side * _between(u[:, 4:5], ANOMALY_RESONANCE_SHIFT), 5, SOUND_MELS - 5)
    tone = anomaly == 1
    moved = anomaly == 3
    fault_bin = np.where(tone, _between(u[:, 1:2], (10, SOUND_MELS - 10)), moved_bin)
    fault_db = (tone * _between(u[:, 2:3], ANOMALY_TONE_DB) + moved * _between(u[:, 5:6], ANOMALY_RESONANCE_DB))
    fault_width = np.where(tone, f32(ANOMALY_TONE_WIDTH), f32(ANOMALY_RESONANCE_WIDTH))
    spectrum = spectrum + _bump(bins, fault_bin, fault_db.astype(f32), fault_width)
    # a broadband burst over a band in some frames (at least one)
    low = np.floor(_between(u[:, 6:7], (0, SOUND_MELS - ANOMALY_BURST_BINS[0])))
    high = low + np.floor(_between(u[:, 7:8], ANOMALY_BURST_BINS))
    burst_db = (anomaly == 2) * _between(u[:, 8:9], ANOMALY_BURST_DB)
    band = ((bins >= low) & (bins < high)) * burst_db
    frames_on = (u[:, 9:14] < 0.5) | (np.arange(SOUND_FRAMES) == np.floor(u[:, 14:15] * SOUND_FRAMES))
    noise_scale = f32(SOUND_NOISE_DB) * _UNIFORM_TO_UNIT / f32(scale_db)
    levels *= noise_scale
    levels += ((spectrum - mean_db) / f32(scale_db) - noise_scale / 2)[:, None, :].astype(f32)
    levels += (f32(SOUND_FRAME_DB / scale_db) * z[:, 1:, None]).astype(f32)
    bursting = np.flatnonzero(anomaly[:, 0] == 2)
    if bursting.size:
        levels[bursting] += (frames_on[bursting, :, None] * band[bursting, None, :] / f32(scale_db)).astype(f32)


@functools.cache
def _sound_normalization() -> tuple[np.ndarray, np.float32]:
    """Per-bin mean and overall standard deviation of the generic machine's normal clips (constants computed
    once from a fixed-seed sample)."""
    generic = DataSpec(kind="machine-sound", dirichlet_alpha=None, samples_per_device=_NORMALIZATION_CLIPS,
                       test_samples_per_device=1, writer_strength=0.0, anomaly_fraction=0.0)
    rng = np.random.default_rng(_POOL_SPLIT_SEED)
    draw = _draw_sound_device(rng, generic)
    levels = rng.random((_NORMALIZATION_CLIPS, SOUND_FRAMES, SOUND_MELS), dtype=np.float32)
    _sound_levels(draw, slice(0, _NORMALIZATION_CLIPS), 0.0, levels)
    mean = levels.mean(axis=(0, 1)).astype(np.float32)
    return mean, np.float32((levels - mean).std())


# ---- npz -------------------------------------------------------------------------------------------------

def _npz_dir(spec: DataSpec) -> Path:
    if not spec.path:
        raise DataError('data.path: data.kind = "npz" needs a directory')
    return Path(spec.path)


def _load_npz(file: Path) -> DeviceData:
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    try:
        archive = np.load(file, allow_pickle=False)
    except ValueError:  # neither a zip nor an .npy file: numpy would have to unpickle it
        raise DataError(f"{file}: not an .npz archive (pickled data is refused)") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{file}: cannot read: {error}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{file}: expected an .npz archive of {', '.join(NPZ_KEYS)}, got a single array")
    with archive:
        arrays = {key: _read_member(file, archive, key) for key in NPZ_KEYS}
    return _check_arrays(file, arrays)


def _read_member(file: Path, archive: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    if key not in archive.files:
        raise DataError(f"{file}: missing key '{key}' (expected {', '.join(NPZ_KEYS)})")
    try:
        return archive[key]
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise DataError(f"{file}: {key}: an object array needs pickle, which is refused") from None
        raise DataError(f"{file}: {key}: cannot read: {error}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{file}: {key}: cannot read: {error}") from None


def _check_arrays(file: Path, arrays: dict[str, np.ndarray]) -> DeviceData:
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype.kind not in "biuf" or x.ndim < 2:
            raise DataError(f"{file}: x_{split}: expected a numeric array (samples, ...), got {x.dtype} {x.shape}")
        if not np.isfinite(x).all():
            raise DataError(f"{file}: x_{split}: holds NaN or infinite values")
        if y.dtype.kind not in "biu" or y.ndim != 1:
            raise DataError(f"{file}: y_{split}: expected a 1-d integer array, got {y.dtype} {y.shape}")
        if len(x) != len(y):
            raise DataError(f"{file}: y_{split}: has {len(y)} labels for {len(x)} samples in x_{split}")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(f"{file}: x_test: samples of shape {arrays['x_test'].shape[1:]} differ from x_train's "
                        f"{arrays['x_train'].shape[1:]}")
    return DeviceData(*(_read_only(arrays[key].astype(np.float32 if key.startswith("x") else np.int64))
                        for key in NPZ_KEYS))


def check_npz_files(spec: DataSpec, device_count: int) -> None:
    """Before a run builds anything: every device_<i>.npz exists, holds the keys, has the same array shapes as
    device_0.npz (the hosts stack devices) and samples shaped like global.npz's (when there is one); only the
    .npy headers are read. The first problem is one DataError naming the file."""
    directory = _npz_dir(spec)
    first: dict[str, tuple[int, ...]] | None = None
    reference = _npz_shapes(directory / "global.npz") if (directory / "global.npz").exists() else None
    for name in [f"device_{i}.npz" for i in range(device_count)]:
        shapes = _npz_shapes(directory / name)
        for key in ("x_train", "x_test"):
            if reference is not None and shapes[key][1:] != reference["x_train"][1:]:
                raise DataError(f"{directory / name}: {key}: samples of shape {shapes[key][1:]} differ from "
                                f"global.npz's {reference['x_train'][1:]}")
        if first is None:
            first = shapes
        for key in NPZ_KEYS:
            if shapes[key] != first[key]:
                raise DataError(f"{directory / name}: {key}: shape {shapes[key]} differs from device_0.npz's "
                                f"{first[key]}; every device needs the same shapes")


def _npz_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    shapes = {}
    try:
        with zipfile.ZipFile(file) as archive:
            names = set(archive.namelist())
            for key in NPZ_KEYS:
                if f"{key}.npy" not in names:
                    raise DataError(f"{file}: missing key '{key}' (expected {', '.join(NPZ_KEYS)})")
                with archive.open(f"{key}.npy") as member:
                    version = np.lib.format.read_magic(member)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(member)
                if dtype.hasobject:
                    raise DataError(f"{file}: {key}: an object array needs pickle, which is refused")
                shapes[key] = tuple(shape)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{file}: cannot read: {error}") from None
    return shapes


def _stack_npz(spec: DataSpec, indices: list[int]) -> DeviceData:
    directory = _npz_dir(spec)
    loaded = [_load_npz(directory / f"device_{i}.npz") for i in indices]
    if not loaded:
        raise DataError("no device indices given")
    first = loaded[0]
    for i, data in zip(indices, loaded):
        for key in NPZ_KEYS:
            if getattr(data, key).shape != getattr(first, key).shape:
                raise DataError(f"{directory / f'device_{i}.npz'}: {key}: shape {getattr(data, key).shape} differs "
                                f"from device_{indices[0]}.npz's {getattr(first, key).shape}; stacking needs equal "
                                "shapes (load devices one by one with device_data)")
    return DeviceData(*(_read_only(np.stack([getattr(d, key) for d in loaded])) for key in NPZ_KEYS))
