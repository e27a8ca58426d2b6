"""ef_hal_lora_linear / ef_hal_lora_linear_grad (hal/ef_hal_lora.c) on the generic HAL, through ctypes.

- Every LoraLinear / LoraLinearGrad kernel case, called through the template table with the HAL kernel that
  REDMULE_KERNELS maps it to, against the op's numpy forward (same ABI as the core kernels), and bit for bit
  against the core kernel (the HAL adds in the core kernel's order).
- Shapes against a float64 numpy reference with the HAL's 8 KiB L1: one panel with W resident, and shapes whose W
  does not fit, so that the plan streams W tiles over several row panels (transposed tiles too), per-device
  adapters, every bias layout. The RedMulE job count and the DMA bytes must be those of the one-pass algorithm: x
  (and dY) read once, W once when resident and once per panel when streamed, the adapter once per device.
- The fallbacks: a gradient set whose single pass does not fit is split into passes; when nothing fits (or a
  size exceeds RedMulE's 16-bit fields) the core kernel runs.
"""
from __future__ import annotations

import numpy as np
import pytest

from compiler.codegen.templates import REDMULE_KERNELS, TEMPLATES
from compiler.ops import REGISTRY
from tests.codegen.hal_harness import HAL_L1_BYTES, close, ptr, stats
from tests.codegen.harness import assert_close, call_kernel, expected_outputs
from tests.codegen.kernel_cases import CASES

FLOAT_BYTES = 4
GUARD = 8                  # NaNs after every output: nothing may be written past it


def _case_params():
    for name in ("LoraLinear", "LoraLinearGrad"):
        for i, c in enumerate(CASES[name]):
            yield pytest.param(name, c, id=f"{name}-{c.id or i}")


@pytest.mark.parametrize("op_name, case", _case_params())
def test_hal_kernel_takes_the_template_arguments(hal, op_name, case):
    rng = np.random.default_rng(0)
    inputs = [make(rng) for make in case.inputs]
    want = expected_outputs(op_name, inputs, case.attrs)
    kernel = REDMULE_KERNELS[TEMPLATES[op_name].kernel]
    hal.ef_hal_generic_reset_stats()
    got = call_kernel(hal, op_name, inputs, case.attrs, [(w.shape, w.dtype) for w in want], kernel=kernel)
    core = call_kernel(hal, op_name, inputs, case.attrs, [(w.shape, w.dtype) for w in want])
    for j, (g, w, c) in enumerate(zip(got, want, core)):
        assert_close(g, w, f"{kernel} output {j}")
        assert np.array_equal(g, c), f"{kernel} output {j} differs from the core kernel's"
    wide = op_name == "LoraLinear" or set(case.attrs.get("grads", "")) & {"x", "b"}
    # the r-wide products (S, dS, dA) run on the cores: a gradient set of dA alone never reaches RedMulE
    assert (stats(hal).redmule_jobs > 0) == bool(wide), "the HAL path must run its wide products on RedMulE"
    assert hal.ef_hal_l1_free_bytes() == HAL_L1_BYTES, "the L1 buffers must be released"


# ---- shapes, the plan, and what went through the HAL ------------------------------------------------------
def _layer(rng, m, n, k, r, devices, trans_b, bias):
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    a = rng.standard_normal((devices, k, r)).astype(np.float32)
    b = rng.standard_normal((devices, r, n)).astype(np.float32)
    c, c_rs, c_cs = None, 0, 0
    if bias == "full":
        c, c_rs, c_cs = rng.standard_normal((m, n)).astype(np.float32), n, 1
    elif bias == "row":
        c, c_rs, c_cs = rng.standard_normal(n).astype(np.float32), 0, 1
    elif bias == "column":
        c, c_rs, c_cs = rng.standard_normal((m, 1)).astype(np.float32), 1, 0
    return x, w, a, b, c, c_rs, c_cs


def _f64(*arrays):
    return [None if t is None else t.astype(np.float64) for t in arrays]


def _guarded(shape):
    buf = np.full(int(np.prod(shape)) + GUARD, np.nan, np.float32)
    return buf, buf[:-GUARD].reshape(shape)


def _panels(plan, m, devices):
    return devices * -(-(m // devices) // plan.mt)


LAYERS = [  # m, n, k, r, devices, trans_b, bias, alpha, beta, scale
    (6, 4, 5, 3, 1, 0, None, 1.0, 1.0, 0.5),             # one panel, W resident
    (8, 4, 5, 3, 2, 1, "row", 0.75, 2.0, 0.25),          # two devices, transB
    (32, 48, 64, 4, 1, 0, "full", 1.0, 1.0, 2.0),        # W is 12 KiB: streamed tiles, several panels
    (32, 48, 64, 4, 2, 1, "column", -0.5, 0.5, 0.5),     # streamed tiles moved transposed, two devices
    (40, 100, 30, 8, 4, 1, "row", 1.0, -1.0, 0.125),     # four devices, many column tiles
    (3, 5, 8, 70, 1, 0, None, 1.0, 1.0, 1.0),            # a rank above the core kernel's stack chunk
]
LAYER_IDS = [f"{c[0]}x{c[1]}x{c[2]}-r{c[3]}-d{c[4]}-t{c[5]}-{c[6]}" for c in LAYERS]


@pytest.mark.parametrize("m, n, k, r, devices, trans_b, bias, alpha, beta, scale", LAYERS, ids=LAYER_IDS)
def test_forward_is_one_pass_over_the_rows(hal, m, n, k, r, devices, trans_b, bias, alpha, beta, scale):
    rng = np.random.default_rng(m * 100 + n)
    x, w, a, b, c, c_rs, c_cs = _layer(rng, m, n, k, r, devices, trans_b, bias)
    plan = hal.ef_hal_lora_linear_plan(m, n, k, r, devices, trans_b, HAL_L1_BYTES)
    assert plan.mt > 0 and plan.l1_bytes <= HAL_L1_BYTES
    buf, y = _guarded((m, n))
    assert hal.ef_hal_l1_free_bytes() == HAL_L1_BYTES
    hal.ef_hal_generic_reset_stats()
    hal.ef_hal_lora_linear(ptr(buf), ptr(x), ptr(w), ptr(a), ptr(b), ptr(c), m, n, k, r, devices, trans_b, alpha,
                           beta, c_rs, c_cs, scale)
    assert np.isnan(buf[-GUARD:]).all()
    c64 = None if c is None else (c.reshape(m, 1) if bias == "column" else c)
    want = REGISTRY["LoraLinear"].forward(*_f64(x, w, a, b, c64), scale=scale, transB=trans_b, alpha=alpha, beta=beta)
    close(y, want)
    core = np.full((m, n), np.nan, np.float32)
    hal.ef_lora_linear(ptr(core), ptr(x), ptr(w), ptr(a), ptr(b), ptr(c), m, n, k, r, devices, trans_b, alpha, beta,
                       c_rs, c_cs, scale)
    assert np.array_equal(y, core), "the HAL path must add in ef_lora_linear's order"
    panels, tiles = _panels(plan, m, devices), -(-n // plan.nt)
    s = stats(hal)
    assert s.redmule_jobs == panels * 2 * tiles               # per tile x·W_t and S·B_t + Z (S is on the cores)
    w_reads = 1 if plan.w_resident else panels
    assert s.dma_bytes == FLOAT_BYTES * (m * k + m * n + devices * (k * r + r * n) + w_reads * k * n)
    assert 0 < s.l1_peak_bytes <= HAL_L1_BYTES
    assert hal.ef_hal_l1_free_bytes() == HAL_L1_BYTES


GRADS = ("xab", "ab", "b", "xb", "x", "a")


def _grad_reference(dy, x, w, a, b, grads, **attrs):
    outs = REGISTRY["LoraLinearGrad"].forward(*_f64(dy, x, w, a, b), grads=grads, **attrs)
    return dict(zip(grads, outs))


def _grad_call(hal, dy, x, w, a, b, grads, m, n, k, r, devices, trans_b, alpha, scale,
               kernel="ef_hal_lora_linear_grad"):
    shapes = {"x": x.shape, "a": a.shape, "b": b.shape}
    bufs = {g: _guarded(shapes[g]) for g in grads}
    getattr(hal, kernel)(*(ptr(bufs[g][0]) if g in bufs else None for g in "xab"), ptr(dy), ptr(x), ptr(w), ptr(a),
                         ptr(b), m, n, k, r, devices, trans_b, alpha, scale)
    for g, (buf, _) in bufs.items():
        assert np.isnan(buf[-GUARD:]).all(), f"d{g} written past its end"
    return {g: view for g, (_, view) in bufs.items()}


@pytest.mark.parametrize("grads", GRADS)
@pytest.mark.parametrize("m, n, k, r, devices, trans_b, bias, alpha, beta, scale", LAYERS[:4], ids=LAYER_IDS[:4])
def test_backward_is_one_pass_over_the_rows(hal, grads, m, n, k, r, devices, trans_b, bias, alpha, beta, scale):
    rng = np.random.default_rng(m * 100 + n + len(grads))
    x, w, a, b, *_ = _layer(rng, m, n, k, r, devices, trans_b, None)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    dx, da, db = (int(g in grads) for g in "xab")
    plan = hal.ef_hal_lora_linear_grad_plan(m, n, k, r, devices, trans_b, dx, da, db, HAL_L1_BYTES)
    assert plan.mt > 0 and plan.l1_bytes <= HAL_L1_BYTES
    hal.ef_hal_generic_reset_stats()
    got = _grad_call(hal, dy, x, w, a, b, grads, m, n, k, r, devices, trans_b, alpha, scale)
    want = _grad_reference(dy, x, w, a, b, grads, scale=scale, transB=trans_b, alpha=alpha)
    core = _grad_call(hal, dy, x, w, a, b, grads, m, n, k, r, devices, trans_b, alpha, scale, "ef_lora_linear_grad")
    for g in grads:
        close(got[g], want[g])
        assert np.array_equal(got[g], core[g]), f"d{g}: the HAL path must add in ef_lora_linear_grad's order"
    panels, tiles = _panels(plan, m, devices), -(-k // plan.nt)
    s = stats(hal)
    low = dx or da                                             # dS = dY·(scale·Bᵀ)
    assert s.redmule_jobs == panels * (2 * tiles * dx + db)     # dS, dA and S run on the cores
    w_reads = (1 if plan.w_resident else panels) if dx else 0
    panel_bytes = m * n + (m * k if da or db else 0) + dx * m * k
    adapter_bytes = devices * (dx * k * r + low * r * n + db * k * r + da * k * r + db * r * n)
    assert s.dma_bytes == FLOAT_BYTES * (panel_bytes + adapter_bytes + w_reads * k * n)
    assert hal.ef_hal_l1_free_bytes() == HAL_L1_BYTES


def test_small_l1_streams_w_tiles_over_several_panels(hal):
    """The 8 KiB L1 cannot hold this W (12 KiB): it is streamed tile by tile, once per row panel."""
    m, n, k, r = 32, 48, 64, 4
    for trans_b in (0, 1):
        fwd = hal.ef_hal_lora_linear_plan(m, n, k, r, 1, trans_b, HAL_L1_BYTES)
        bwd = hal.ef_hal_lora_linear_grad_plan(m, n, k, r, 1, trans_b, 1, 1, 1, HAL_L1_BYTES)
        for plan, cols in ((fwd, n), (bwd, k)):
            assert not plan.w_resident and plan.mt < m and plan.nt < cols
    roomy = hal.ef_hal_lora_linear_plan(m, n, k, r, 1, 0, 1 << 20)
    assert roomy.w_resident and roomy.mt == m and roomy.nt == n and roomy.in_buffers == 1


def test_gradients_that_do_not_fit_one_pass_are_split(hal):
    m, n, k, r, devices, trans_b, alpha, scale = 40, 100, 30, 8, 4, 1, 0.5, 0.25
    assert hal.ef_hal_lora_linear_grad_plan(m, n, k, r, devices, trans_b, 1, 1, 1, HAL_L1_BYTES).mt == 0
    assert hal.ef_hal_lora_linear_grad_plan(m, n, k, r, devices, trans_b, 1, 0, 0, HAL_L1_BYTES).mt > 0
    rng = np.random.default_rng(3)
    x, w, a, b, *_ = _layer(rng, m, n, k, r, devices, trans_b, None)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    hal.ef_hal_generic_reset_stats()
    got = _grad_call(hal, dy, x, w, a, b, "xab", m, n, k, r, devices, trans_b, alpha, scale)
    want = _grad_reference(dy, x, w, a, b, "xab", scale=scale, transB=trans_b, alpha=alpha)
    for g in "xab":
        close(got[g], want[g])
    s = stats(hal)
    assert s.redmule_jobs > 0 and s.dma_bytes > 2 * FLOAT_BYTES * m * n   # dY read by more than one pass
    assert hal.ef_hal_l1_free_bytes() == HAL_L1_BYTES


def test_no_room_in_l1_falls_back_to_the_core_kernels(hal):
    m, n, k, r, devices, trans_b = 8, 6, 5, 3, 2, 1
    rng = np.random.default_rng(4)
    x, w, a, b, c, c_rs, c_cs = _layer(rng, m, n, k, r, devices, trans_b, "row")
    dy = rng.standard_normal((m, n)).astype(np.float32)
    left_bytes = 64                                            # not even a 1-row panel fits
    assert hal.ef_hal_lora_linear_plan(m, n, k, r, devices, trans_b, left_bytes).mt == 0
    mark = hal.ef_hal_l1_mark()
    assert hal.ef_hal_l1_alloc(HAL_L1_BYTES - left_bytes)
    try:
        hal.ef_hal_generic_reset_stats()
        y = np.full((m, n), np.nan, np.float32)
        hal.ef_hal_lora_linear(ptr(y), ptr(x), ptr(w), ptr(a), ptr(b), ptr(c), m, n, k, r, devices, trans_b, 1.0,
                               1.0, c_rs, c_cs, 0.5)
        got = _grad_call(hal, dy, x, w, a, b, "xab", m, n, k, r, devices, trans_b, 1.0, 0.5)
        s = stats(hal)
        assert s.redmule_jobs == 0 and s.dma_transfers == 0
        assert hal.ef_hal_l1_free_bytes() == left_bytes
    finally:
        hal.ef_hal_l1_release(mark)
    close(y, REGISTRY["LoraLinear"].forward(*_f64(x, w, a, b, c), scale=0.5, transB=trans_b))
    want = _grad_reference(dy, x, w, a, b, "xab", scale=0.5, transB=trans_b, alpha=1.0)
    for g in "xab":
        close(got[g], want[g])


def test_sizes_past_redmule_fields_take_the_core_kernel(hal):
    big = 0x10000                                              # RedMulE's size fields are 16 bits
    assert hal.ef_hal_lora_linear_plan(4, 8, big, 2, 1, 0, 1 << 30).mt == 0
    assert hal.ef_hal_lora_linear_grad_plan(4, big, 8, 2, 1, 0, 1, 1, 1, 1 << 30).mt == 0
    assert hal.ef_hal_lora_linear_plan(4, 8, 16, 2, 1, 0, 1 << 30).mt == 4
