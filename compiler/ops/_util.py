"""Small helpers shared by op modules (kept private: not an op module)."""
import numpy as np


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))
