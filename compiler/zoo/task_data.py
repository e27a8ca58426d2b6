"""Small labelled samples of each zoo model's task, for analyses that need data at compile time (the sparse
update's contribution analysis). Seeded; nothing is downloaded.

- ``cct-digits``: scikit-learn's 8×8 handwritten digits (bundled with scikit-learn), scaled to [0, 1].
- ``ds-cnn``: synthetic keywords — 12 classes, each a fixed pair of 8 fixed "phonemes" (7-frame × 10-MFCC
  patterns, smoothed over time) spoken in order with a random onset, gap and loudness over noise (σ 0.5).
  (An earlier generator — one smoothed random 49×10 pattern per class — did not train above chance: a
  time-shifted noise pattern gives a pooled CNN nothing local to detect.)
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


KEYWORD_PHONEMES = 8          # a bank of fixed "phonemes": short spectral patterns
PHONEME_FRAMES = 7
KEYWORD_NOISE = 0.5


def _keywords(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each keyword is a fixed pair of phonemes (the 12 classes use 12 distinct pairs of 8), spoken in order with a
    random onset, gap and loudness over noise. The phonemes are what a conv stack detects; the pair is what a
    pooled classifier reads, so DS-CNN (global average pooling) can learn the task."""
    classes, (c, frames, coeffs) = ZOO["ds-cnn"].num_classes, ZOO["ds-cnn"].input_shape
    fixed = np.random.default_rng(1234)
    phonemes = fixed.normal(size=(KEYWORD_PHONEMES, PHONEME_FRAMES + 2, coeffs))
    kernel = np.ones(3) / 3.0  # smooth over time, as MFCC frames of one sound are
    phonemes = np.apply_along_axis(lambda t: np.convolve(t, kernel, mode="valid"), 1, phonemes)
    phonemes /= phonemes.std(axis=(1, 2), keepdims=True)
    pairs = [(a, b) for a in range(KEYWORD_PHONEMES) for b in range(a + 1, KEYWORD_PHONEMES)]
    words = [pairs[i] for i in fixed.permutation(len(pairs))[:classes]]
    y = rng.integers(0, classes, n)
    x = rng.normal(0.0, KEYWORD_NOISE, (n, frames, coeffs))
    onset = rng.integers(0, 12, n)
    gap = rng.integers(2, 14, n)
    gain = rng.uniform(0.8, 1.25, (n, 2))
    for i, label in enumerate(y):
        for j, (start, phoneme) in enumerate(((onset[i], words[label][0]),
                                              (onset[i] + PHONEME_FRAMES + gap[i], words[label][1]))):
            x[i, start:start + PHONEME_FRAMES] += gain[i, j] * phonemes[phoneme]
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
