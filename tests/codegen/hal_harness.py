"""The generic HAL (hal/generic) + the kernels written against ef_hal.h as a host shared object, called through
ctypes: signatures, the structs the HAL returns, and small helpers. The library is built with a small L1 and a team
of 3 "cores" run in turn, so that realistic shapes need many tiles and the work split is exercised."""
from __future__ import annotations

import ctypes

import numpy as np

HAL_L1_BYTES = 8192          # small, so that realistic shapes need many tiles
HAL_CORES = 3                # the generic HAL runs a team of 3 "cores" in turn: the work split is exercised
HAL_RTOL = 1e-5
HAL_DEFINES = (f"EF_HAL_L1_BYTES={HAL_L1_BYTES}", f"EF_HAL_GENERIC_CORES={HAL_CORES}")


class Tile(ctypes.Structure):
    _fields_ = [("m", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int)]


class Stats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("forks", "dma_transfers", "dma_bytes", "redmule_jobs", "redmule_macs", "l1_peak_bytes")]


class LoraPlan(ctypes.Structure):
    _fields_ = [("mt", ctypes.c_int), ("nt", ctypes.c_int), ("w_resident", ctypes.c_int),
                ("in_buffers", ctypes.c_int), ("l1_bytes", ctypes.c_uint32)]


P, I, U, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_float
SIGNATURES = {
    "ef_hal_dma_in": ([P, P, U], U), "ef_hal_dma_out": ([P, P, U], U),
    "ef_hal_dma_in_2d": ([P, P, U, U, U], U), "ef_hal_dma_out_2d": ([P, P, U, U, U], U),
    "ef_hal_dma_wait": ([U], None),
    "ef_hal_gemm": ([P, P, P, P, I, I, I, I, I, F, F, I, I], None),
    "ef_gemm": ([P, P, P, P, I, I, I, I, I, F, F, I, I], None),
    "ef_hal_gemm_tiled": ([P, P, P, P, I, I, I, I, I, F, F, I, I, Tile], I),
    "ef_hal_gemm_tile": ([I, I, I, I, I, U], Tile),
    "ef_hal_gemm_l1_bytes": ([Tile, I, I], U),
    "ef_hal_mat_mul": ([P, P, P, I, I, I, I, P, P, P], None),
    "ef_hal_lora_linear": ([P] * 6 + [I] * 6 + [F, F, I, I, F], None),
    "ef_hal_lora_linear_grad": ([P] * 8 + [I] * 6 + [F, F], None),
    "ef_lora_linear": ([P] * 6 + [I] * 6 + [F, F, I, I, F], None),
    "ef_lora_linear_grad": ([P] * 8 + [I] * 6 + [F, F], None),
    "ef_hal_lora_linear_plan": ([I] * 6 + [U], LoraPlan),
    "ef_hal_lora_linear_grad_plan": ([I] * 9 + [U], LoraPlan),
    "ef_hal_l1_free_bytes": ([], U), "ef_hal_l1_mark": ([], U), "ef_hal_l1_alloc": ([U], P),
    "ef_hal_l1_release": ([U], None),
    "ef_hal_generic_stats": ([ctypes.POINTER(Stats)], None), "ef_hal_generic_reset_stats": ([], None),
}


def load_hal(path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (args, res) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data


def stats(hal) -> Stats:
    s = Stats()
    hal.ef_hal_generic_stats(ctypes.byref(s))
    return s


def close(got, want, rtol=HAL_RTOL):
    assert got.shape == want.shape
    scale = float(np.max(np.abs(want))) or 1.0
    assert float(np.max(np.abs(got - want))) <= rtol * scale
