"""Run one C kernel through ctypes exactly as generated code calls it: the step's arguments come from the
codegen template table (``bind``), tensors are numpy buffers, outputs start as a NaN / sentinel fill so an
element the kernel forgot to write shows up."""
from __future__ import annotations

import ctypes
from typing import Any, Sequence

import numpy as np

from compiler.codegen.templates import TEMPLATES, Ref, bind, site_of
from compiler.ops import REGISTRY

RTOL = 1e-5
INT_SENTINEL = -7


def _fill(shape, dtype) -> np.ndarray:
    out = np.empty(shape, dtype)
    out[...] = np.nan if np.issubdtype(dtype, np.floating) else INT_SENTINEL
    return out


def _ctype(value: Any, buffers: dict[str, np.ndarray]):
    if value is None:
        return None
    if isinstance(value, Ref):
        return ctypes.c_void_p(buffers[value.name].ctypes.data)
    if isinstance(value, bool):
        return ctypes.c_int(int(value))
    if isinstance(value, (int, np.integer)):
        return ctypes.c_int(int(value))
    if isinstance(value, (float, np.floating)):
        return ctypes.c_float(float(value))
    if isinstance(value, tuple) and all(isinstance(v, Ref) for v in value):
        return (ctypes.c_void_p * len(value))(*(buffers[v.name].ctypes.data for v in value))
    if isinstance(value, tuple):
        return (ctypes.c_int * len(value))(*(int(v) for v in value))
    raise TypeError(f"cannot pass {value!r} to a kernel")


def call_kernel(lib: ctypes.CDLL, op_name: str, inputs: Sequence[np.ndarray], attrs: dict[str, Any],
                out_specs: Sequence[tuple[tuple[int, ...], np.dtype]], alias: bool = False,
                kernel: str | None = None) -> list[np.ndarray]:
    """Run the kernel of ``op_name``; returns the outputs (for SGD: the updated param and velocity).

    ``alias``: the first output is written into input 0's buffer (the memory plan's in-place case).
    ``kernel``: another function with the template's arguments (a HAL kernel of ``REDMULE_KERNELS``)."""
    template = TEMPLATES[op_name]
    in_names = [f"in{i}" for i in range(len(inputs))]
    out_names = [f"out{j}" for j in range(len(out_specs))]
    buffers = {n: np.ascontiguousarray(a).copy() for n, a in zip(in_names, inputs)}
    for n, (shape, dtype) in zip(out_names, out_specs):
        buffers[n] = _fill(shape, dtype)
    if alias:
        buffers[out_names[0]] = buffers[in_names[0]]
    shapes = {n: tuple(b.shape) for n, b in buffers.items()}
    if alias:
        shapes[out_names[0]] = tuple(out_specs[0][0])
    dtypes = {n: str(b.dtype) for n, b in buffers.items()}
    site = site_of("kernel-test", op_name, in_names, out_names, attrs, shapes, dtypes)
    args = [_ctype(v, buffers) for _, v in bind(template, site)]
    fn = getattr(lib, kernel or template.kernel)
    fn.restype = None
    fn(*args)
    op = REGISTRY[op_name]
    if op.updates:
        return [buffers[in_names[i]] for i in op.updates if i < len(inputs)]
    results = []
    for n, (shape, _) in zip(out_names, out_specs):
        results.append(buffers[n].reshape(shape))
    return results


def expected_outputs(op_name: str, inputs: Sequence[np.ndarray], attrs: dict[str, Any]) -> list[np.ndarray]:
    op = REGISTRY[op_name]
    resolved = op.resolve_attrs(dict(attrs))
    return [np.asarray(r) for r in op.run([np.array(a) for a in inputs], resolved)]


def assert_close(got: np.ndarray, want: np.ndarray, what: str, rtol: float = RTOL) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    if not np.issubdtype(want.dtype, np.floating):
        assert np.array_equal(got, want), f"{what}: {got} != {want}"
        return
    same_special = np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(np.isinf(got) * np.sign(got),
                                                                                       np.isinf(want) * np.sign(want))
    assert same_special, f"{what}: NaN/inf positions differ (an element left unwritten?)"
    finite = np.isfinite(want)
    if not finite.any():
        return
    err = float(np.max(np.abs(got[finite].astype(np.float64) - want[finite])))
    scale = float(np.max(np.abs(want[finite]))) or 1.0
    assert err <= rtol * scale + 1e-30, f"{what}: max abs error {err:.3g} > {rtol:g} x max |ref| {scale:.3g}"
