"""Shape and stride arithmetic for kernel arguments: broadcasting as strides, and axis coalescing so the C
loops run over as few axes as possible."""
from __future__ import annotations

from typing import Sequence

import numpy as np

Shape = tuple[int, ...]

MAX_RANK = 8  # EF_MAX_RANK in ef_kernels.h


def size(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def contiguous_strides(shape: Sequence[int]) -> Shape:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= int(d)
    return tuple(reversed(strides))


def broadcast_strides(shape: Sequence[int], out_shape: Sequence[int]) -> Shape:
    """Element strides that read a dense tensor of ``shape`` broadcast to ``out_shape`` (0 = repeated)."""
    lead = len(out_shape) - len(shape)
    if lead < 0:
        raise ValueError(f"{tuple(shape)} has more axes than {tuple(out_shape)}")
    own = contiguous_strides(shape)
    strides = [0] * lead
    for d, (n, s) in enumerate(zip(shape, own)):
        if n not in (1, out_shape[lead + d]):
            raise ValueError(f"{tuple(shape)} does not broadcast to {tuple(out_shape)}")
        strides.append(s if n != 1 else 0)
    return tuple(strides)


def coalesce(shape: Sequence[int], *strides: Sequence[int]) -> tuple[Shape, ...]:
    """Drop size-1 axes and merge neighbours that are contiguous in every stride set.

    Returns (shape, *strides) with at least one axis; the index walk they describe is unchanged."""
    axes = [(int(n), [int(s[d]) for s in strides]) for d, n in enumerate(shape) if n != 1]
    merged: list[tuple[int, list[int]]] = []
    for n, ss in reversed(axes):  # innermost first
        if merged:
            inner_n, inner_ss = merged[-1]
            if all(s == t * inner_n for s, t in zip(ss, inner_ss)):
                merged[-1] = (inner_n * n, inner_ss)
                continue
        merged.append((n, ss))
    merged.reverse()
    if not merged:
        merged = [(1, [0] * len(strides))]
    if len(merged) > MAX_RANK:
        raise ValueError(f"{len(merged)} axes after coalescing {tuple(shape)}; the kernels take at most {MAX_RANK}")
    out_shape = tuple(n for n, _ in merged)
    out_strides = tuple(tuple(ss[i] for _, ss in merged) for i in range(len(strides)))
    return (out_shape, *out_strides)


def split_at(shape: Sequence[int], axis: int) -> tuple[int, int, int]:
    """(outer, shape[axis], inner) around one axis."""
    return size(shape[:axis]), int(shape[axis]), size(shape[axis + 1:])
