"""The streamed cluster kernels (hal/ef_hal_stream.c) on the generic HAL, through ctypes: every op marked
``cluster = True`` on every kernel case of its op, and on shapes large enough that the HAL's 8 KiB L1 needs many
tiles (3 "cores" run in turn, so the work split is exercised). Against the op's numpy forward, and bit for bit
against the core kernel where no sum is split over cores (the partial sums of the reductions add in another
order). The same kernels run on QEMU with Zfinx inside programs lowered for siracusa (test_qemu.py) and on GVSoC
(test_gvsoc.py)."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from compiler.codegen import HAL_DIR, KERNEL_DIR
from compiler.codegen.templates import CLUSTER_KERNELS, REDMULE_KERNELS, TEMPLATES
from compiler.ops import REGISTRY
from tests.codegen.hal_harness import HAL_L1_BYTES, stats
from tests.codegen.harness import assert_close, call_kernel, expected_outputs
from tests.codegen.kernel_cases import CASES, KCase, fixed, k, normal, positive, relu_out, softmax_out, unit

STREAMED = sorted(name for name, op in REGISTRY.items() if op.cluster)
SPLIT_SUMS = ("ReduceSumTo", "LayerNormGradScale")   # partial sums per core: another order of the same additions

# shapes that need many tiles of the 8 KiB L1 (and, for the broadcast operands, resident or L2 reads)
LARGE = {
    "Relu": [k((9, 700), id="large")],
    "ReluGrad": [k(relu_out(5, 900), (5, 900), id="large")],
    "Gelu": [k((3, 1100), id="large")],
    "GeluGrad": [k((3, 1100), (3, 1100), approximate="tanh", id="large tanh")],
    "Add": [k((64, 100), (100,), id="large bias"), k((2, 3000), (2, 3000), id="large same"),
            k((1, 4000), (1, 1), id="one long row"), k((40, 1, 64), (1, 30, 64), id="large both")],
    "Mul": [k((3000,), (3000,), id="large flat"), k((50, 40), (50, 1), id="large column")],
    "Sub": [k((30, 100), (30, 100), id="large")],
    "Div": [k((30, 100), positive(100), id="large row")],
    "Neg": [k((3, 1100), id="large")], "Sigmoid": [k((3, 1100), id="large")], "Tanh": [k((3, 1100), id="large")],
    "Erf": [k((3, 1100), id="large")], "Exp": [k((3, 1100), id="large")], "Sqrt": [k(positive(3, 1100), id="large")],
    "SigmoidGrad": [k(unit(3, 1100), (3, 1100), id="large")], "TanhGrad": [k(unit(3, 1100), (3, 1100), id="large")],
    "ErfGrad": [k((3, 1100), (3, 1100), id="large")],
    "SGD": [k((3000,), (3000,), fixed(np.float32(0.1)), (3000,), momentum=0.9, weight_decay=0.01, id="large"),
            k((300, 2, 8), (150, 2, 8), fixed(np.float32(0.1)), axis=0, channels=150, id="large sparse")],
    "Softmax": [k((60, 50), id="large"), k((6, 40, 10), axis=1, id="large axis 1")],
    "SoftmaxGrad": [k(softmax_out((60, 50)), (60, 50), id="large")],
    "LayerNormalization": [k((90, 48), (48,), (48,), id="large")],
    "LayerNormGradInput": [k((90, 48), (48,), (90, 48), id="large")],
    "LayerNormGradScale": [k((90, 48), (90, 48), id="large")],
    "ReduceSumTo": [k((200, 30), shape=(30,), id="large bias"), k((40, 16, 12), shape=(16, 1), id="large middle")],
    "Transpose": [k((40, 30), id="large resident"), k((3, 40, 30), perm=(2, 0, 1), id="large from L2")],
    "MaxPool": [k((2, 16, 12, 12), kernel_shape=(2, 2), strides=(2, 2), id="large")],
    "MaxPoolGrad": [k((2, 16, 12, 12), (2, 16, 6, 6), kernel_shape=(2, 2), strides=(2, 2), id="large")],
}


def _params():
    for name in STREAMED:
        for i, c in enumerate([*CASES[name], *LARGE.get(name, ())]):
            yield pytest.param(name, c, id=f"{name}-{c.id or i}")


def test_every_streamed_op_has_a_hal_kernel_and_large_cases():
    declared = (HAL_DIR / "ef_hal_stream.h").read_text().split("#define EF_HAL_STREAMED(X)")[1].split("\n\n")[0]
    in_c = {f"ef_hal_{name}" for name in __import__("re").findall(r"X\((\w+)\)", declared)}
    assert set(CLUSTER_KERNELS.values()) == in_c, "ops marked cluster = True and ef_hal_stream.h must agree"
    assert set(CLUSTER_KERNELS) == {TEMPLATES[n].kernel for n in STREAMED}
    assert not sorted(set(STREAMED) - set(LARGE)), "every streamed op needs a case that takes many tiles"


@pytest.mark.parametrize("op_name, case", _params())
def test_streamed_kernel_matches_numpy_and_the_core_kernel(hal, op_name, case: KCase):
    rng = np.random.default_rng(1)
    inputs = [make(rng) for make in case.inputs]
    want = expected_outputs(op_name, inputs, case.attrs)
    op = REGISTRY[op_name]
    specs = [] if op.updates else [(w.shape, w.dtype) for w in want]
    kernel = CLUSTER_KERNELS[TEMPLATES[op_name].kernel]
    hal.ef_hal_generic_reset_stats()
    got = call_kernel(hal, op_name, inputs, case.attrs, specs, kernel=kernel)
    s = stats(hal)
    core = call_kernel(hal, op_name, inputs, case.attrs, specs)
    for j, (g, w, c) in enumerate(zip(got, want, core)):
        assert_close(g, w, f"{kernel} output {j}")
        if op_name not in SPLIT_SUMS:
            assert np.array_equal(g, c, equal_nan=True), f"{kernel} output {j} differs from the core kernel's"
    assert s.forks >= 1 and s.dma_bytes > 0, "the streamed path must fork onto the cores and move tiles by DMA"
    if case.id.startswith("large"):
        assert s.forks >= 2, "a large case must take several tiles"
    assert 0 < s.l1_peak_bytes <= HAL_L1_BYTES
    assert hal.ef_hal_l1_free_bytes() == HAL_L1_BYTES, "the L1 buffers must be released"


def test_streamed_kernels_compile_for_zfinx_without_warnings(tmp_path):
    """As the cluster cores run them (zig's clang, rv32imc + Zfinx)."""
    from compiler.codegen.build import ZFINX_CFLAGS, zig_cc
    obj = tmp_path / "stream.o"
    cmd = [*zig_cc(), *ZFINX_CFLAGS, "-std=gnu11", "-Wall", "-Wextra", "-Werror", f"-I{HAL_DIR}", f"-I{KERNEL_DIR}",
           "-c", str(HAL_DIR / "ef_hal_stream.c"), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    nm = shutil.which("riscv64-unknown-elf-nm") or shutil.which("nm")
    defined = {ln.split()[-1] for ln in subprocess.run([nm, "--defined-only", str(obj)], capture_output=True,
                                                       text=True, check=True).stdout.splitlines()
               if ln.split() and ln.split()[1] == "T"}
    assert defined == set(CLUSTER_KERNELS.values())


# ---- convolutions on the RedMulE path (hal/ef_hal_conv.c) --------------------------------------------------
CONV_LARGE = {"Conv": [k((2, 4, 12, 12), (8, 4, 3, 3), normal(8), pads=(1, 1, 1, 1), id="large")],
              "ConvGradWeight": [k((2, 4, 12, 12), (2, 8, 12, 12), pads=(1, 1, 1, 1), kernel_shape=(3, 3),
                                   id="large")]}


def _conv_params():
    for name in ("Conv", "ConvGradWeight"):
        for i, c in enumerate([*CASES[name], *CONV_LARGE[name]]):
            yield pytest.param(name, c, id=f"{name}-{c.id or i}")


@pytest.mark.parametrize("op_name, case", _conv_params())
def test_conv_on_the_redmule_path_matches_numpy(hal, op_name, case: KCase):
    """Every Conv and ConvGradWeight kernel case through its template with the RedMulE-path kernel: im2col tiles in
    L1 and RedMulE jobs (the generic HAL's stand-in) for ungrouped convolutions, the core kernel for grouped ones."""
    rng = np.random.default_rng(2)
    inputs = [make(rng) for make in case.inputs]
    want = expected_outputs(op_name, inputs, case.attrs)
    kernel = REDMULE_KERNELS[TEMPLATES[op_name].kernel]
    hal.ef_hal_generic_reset_stats()
    got = call_kernel(hal, op_name, inputs, case.attrs, [(w.shape, w.dtype) for w in want], kernel=kernel)
    for j, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, f"{kernel} output {j}")
    grouped = case.attrs.get("group", 1) != 1
    assert (stats(hal).redmule_jobs > 0) == (not grouped), "ungrouped convolutions run as RedMulE jobs"
    if case.id.startswith("large"):
        assert stats(hal).redmule_jobs > 2, "a large case takes several pixel tiles"
    assert hal.ef_hal_l1_free_bytes() == HAL_L1_BYTES, "the L1 buffers must be released"
