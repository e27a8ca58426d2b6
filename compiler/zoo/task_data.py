"""Small labelled samples of each zoo model's task, for analyses that need data at compile time (the sparse
update's contribution analysis). Seeded; nothing is downloaded.

- ``cct-digits``: scikit-learn's 8×8 handwritten digits (bundled with scikit-learn), scaled to [0, 1].
- ``ds-cnn``: synthetic keywords — 12 classes, each a fixed random 49×10 MFCC pattern (smoothed over time)
  spoken with a random time shift, loudness and additive noise.
- ``cct-2-3x2``: synthetic 10-class 32×32 RGB images — a class colour blob at a class position, jittered,
  on noise.
- ``deep-ae``: synthetic machine-sound frames (640 features) around one spectral template (no labels).
"""
from __future__ import annotations

import numpy as np

from compiler.zoo import ZOO


def task_data(model: str, samples: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y) with x of shape (samples, *input_shape) float32 and y int64 labels (None for reconstruction)."""
    if model not in ZOO:
        raise ValueError(f"no task data for {model!r}; zoo models: {', '.join(ZOO)}")
    rng = np.random.default_rng(seed)
    if model == "cct-digits":
        return _digits(rng, samples)
    if model == "ds-cnn":
        return _keywords(rng, samples)
    if model == "cct-2-3x2":
        return _images(rng, samples)
    return _frames(rng, samples, ZOO[model].input_shape), None


def _digits(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # slow to import: only here
    digits = load_digits()
    pick = rng.choice(len(digits.target), n, replace=n > len(digits.target))
    return (digits.images[pick] / 16.0).astype(np.float32)[:, None], digits.target[pick].astype(np.int64)


def _keywords(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    classes, (c, frames, coeffs) = ZOO["ds-cnn"].num_classes, ZOO["ds-cnn"].input_shape
    templates = np.random.default_rng(1234).normal(size=(classes, frames + 8, coeffs))
    kernel = np.ones(5) / 5.0  # smooth over time, as MFCC frames of one word are
    templates = np.apply_along_axis(lambda t: np.convolve(t, kernel, mode="same"), 1, templates)
    y = rng.integers(0, classes, n)
    shift = rng.integers(0, 9, n)
    x = np.stack([templates[label, s:s + frames] for label, s in zip(y, shift)])
    x = x * rng.uniform(0.7, 1.3, (n, 1, 1)) + rng.normal(0.0, 0.6, x.shape)
    return x.astype(np.float32).reshape(n, c, frames, coeffs), y.astype(np.int64)


def _images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    classes, (c, h, w) = ZOO["cct-2-3x2"].num_classes, ZOO["cct-2-3x2"].input_shape
    fixed = np.random.default_rng(4321)
    colours, centres = fixed.uniform(-1, 1, (classes, c)), fixed.uniform(8, 24, (classes, 2))
    y = rng.integers(0, classes, n)
    rows, cols = np.mgrid[0:h, 0:w]
    x = rng.normal(0.0, 0.5, (n, c, h, w))
    for i, label in enumerate(y):
        cy, cx = centres[label] + rng.normal(0, 2, 2)
        blob = np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / 30.0)
        x[i] += colours[label][:, None, None] * blob
    return x.astype(np.float32), y.astype(np.int64)


def _frames(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    template = np.random.default_rng(99).normal(size=shape)
    return (template + rng.normal(0.0, 0.3, (n, *shape))).astype(np.float32)
