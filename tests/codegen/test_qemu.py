"""QEMU integration: compiled programs run K SGD steps on qemu-system-riscv32 (rv32imf) and must match
NumpyDevice (parameters and losses within 1e-4 relative); the rdcycle/instret counters must be positive."""
from __future__ import annotations

import shutil
import subprocess
from functools import lru_cache

import numpy as np
import pytest

from compiler import compile_model, zoo
from compiler.program import Program
from compiler.quantize import Int8Options
from compiler.zoo.task_data import task_data
from compiler.codegen import generate_c
from compiler.codegen.templates import CLUSTER_KERNELS
from compiler.targets import load_target, lower_to_target
from device_runtime import NumpyDevice
from device_runtime.device import DeviceError
from device_runtime.qemu import QemuDevice
from tests.codegen.programs import AE_LORA, CCT_SPARSE, DS_CNN_SPARSE, K_STEPS, assert_same_training, compiled, data_for, frozen_tuning

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-riscv32") is None or shutil.which("riscv64-unknown-elf-gcc") is None,
    reason="needs qemu-system-riscv32 and riscv64-unknown-elf-gcc (Debian: qemu-system-misc "
           "gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf)")

CASES = [("torch-mlp", "lora+head"), ("torch-mlp", "classifier")]
for _model, _tunings in (("deep-ae", (frozen_tuning(AE_LORA), "last-1")),
                         ("cct-digits", ("lora", "last-1", frozen_tuning(CCT_SPARSE)))):
    if _model in zoo.names():
        CASES += [(_model, t) for t in _tunings]
QEMU_TIMEOUT_S = 60.0


@pytest.mark.parametrize("model, tuning", CASES, ids=[f"{m}-{t if isinstance(t, str) else dict(t)['strategy']}" for m, t in CASES])
def test_qemu_trains_like_numpy(tmp_path, model, tuning):
    program = compiled(model, tuning)
    x, y = data_for(program, 12)
    device = QemuDevice(program, tmp_path, timeout_s=QEMU_TIMEOUT_S)
    got = device.train(x, y, K_STEPS)
    assert_same_training(got, NumpyDevice(program).train(x, y, K_STEPS))
    t = got.telemetry
    assert t.steps == K_STEPS and t.samples == K_STEPS * program.batch
    assert t.measured_cycles > 0 and t.instructions > 0
    assert (device.last_step_cycles > 0).all() and (device.last_step_instructions > 0).all()
    print(f"\n{model} {tuning if isinstance(tuning, str) else 'lora'}: "
          f"{t.instructions / K_STEPS:,.0f} instructions/step, {t.measured_cycles / K_STEPS:,.0f} cycles/step, "
          f"qemu {device.last_run_s:.2f} s")


def test_qemu_evaluates_like_numpy(tmp_path):
    program = compiled("torch-mlp", "lora+head")
    x, y = data_for(program, 6)
    got = QemuDevice(program, tmp_path, timeout_s=QEMU_TIMEOUT_S).evaluate(x, y)
    want = NumpyDevice(program).evaluate(x, y)
    assert np.max(np.abs(got.outputs - want.outputs)) <= 1e-5 * np.max(np.abs(want.outputs))


def test_qemu_deadline_is_a_device_error(tmp_path):
    program = compiled("torch-mlp", "lora+head")
    x, y = data_for(program, 4)
    device = QemuDevice(program, tmp_path, timeout_s=0.001)
    with pytest.raises(DeviceError, match=r"did not finish within 0.001 s on rv32-qemu \(timeout\)"):
        device.train(x, y, 1)


def test_qemu_refuses_a_job_for_another_program(tmp_path):
    program = compiled("torch-mlp", "lora+head")
    x, y = data_for(program, 4)
    device = QemuDevice(program, tmp_path, timeout_s=QEMU_TIMEOUT_S)
    device.fingerprint ^= 1
    with pytest.raises(DeviceError, match=r"exited with code 13 .*another program layout"):
        device.train(x, y, 1)


ZFINX_CASES = [c for c in CASES if c[0] in ("deep-ae", "cct-digits")] + [("torch-mlp", "lora+head")]


@pytest.mark.parametrize("model, tuning", ZFINX_CASES,
                         ids=[f"{m}-{t if isinstance(t, str) else 'lora'}" for m, t in ZFINX_CASES])
def test_zfinx_build_trains_like_numpy_on_qemu(tmp_path, model, tuning):
    """The kernels built as the siracusa cluster runs them (zig's clang, rv32imc + Zfinx), on QEMU with
    zfinx=true: same training as the numpy executor."""
    program = compiled(model, tuning)
    x, y = data_for(program, 12)
    device = QemuDevice(program, tmp_path, board="rv32-zfinx-qemu", timeout_s=QEMU_TIMEOUT_S)
    got = device.train(x, y, K_STEPS)
    assert_same_training(got, NumpyDevice(program).train(x, y, K_STEPS))
    objdump = shutil.which("riscv64-unknown-elf-objdump")
    text = subprocess.run([objdump, "-d", str(device.executable)], capture_output=True, text=True).stdout
    assert "fmul.s\ta" in text or "fmadd.s\ta" in text, "float ops must use integer registers (Zfinx)"
    assert "flw\t" not in text and "fsw\t" not in text, "no F registers on the cluster cores"


@lru_cache(maxsize=None)
def _int8_program(update: str) -> Program:
    x, _ = task_data("ds-cnn", 32, seed=3)
    return compile_model("ds-cnn", dict(DS_CNN_SPARSE), batch=2, lr=0.05, int8=Int8Options(x, update=update))


@pytest.mark.parametrize("board", ["rv32-qemu", "rv32-zfinx-qemu"])
@pytest.mark.parametrize("update", ["round", "master"])
def test_int8_training_on_qemu_equals_the_executor(tmp_path, board, update):
    """The int8 kernels (ef_quant.c) on QEMU, built for rv32imf and as the cluster runs them (Zfinx): the same int8
    and int32 parameters as the numpy executor bit for bit after K SGD steps, the float32 masters and losses within
    the codegen parity tolerance."""
    program = _int8_program(update)
    x, y = task_data("ds-cnn", 12, seed=4)
    device = QemuDevice(program, tmp_path, board=board, timeout_s=QEMU_TIMEOUT_S)
    got = device.train(x, y, K_STEPS)
    reference = NumpyDevice(program)
    want = reference.train(x, y, K_STEPS)
    np.testing.assert_allclose(got.losses, want.losses, rtol=1e-5)
    for name, value in want.params.items():
        assert got.params[name].dtype == value.dtype
        np.testing.assert_array_equal(got.params[name], value, err_msg=name)
    assert any(not np.array_equal(want.params[n], program.values[n]) for n in want.params)
    np.testing.assert_array_equal(device.evaluate(x, y).outputs, reference.evaluate(x, y).outputs)


LOWERED_ZFINX_CASES = [("deep-ae", frozen_tuning(AE_LORA)), ("cct-digits", "lora"), ("cct-digits", "full"),
                       ("torch-mlp", "lora+head")]


@pytest.mark.parametrize("model, tuning", LOWERED_ZFINX_CASES,
                         ids=[f"{m}-{t if isinstance(t, str) else 'lora'}" for m, t in LOWERED_ZFINX_CASES])
def test_zfinx_build_of_a_program_lowered_for_siracusa_trains_like_numpy_on_qemu(tmp_path, model, tuning):
    """A program lowered for siracusa calls the HAL's cluster kernels (the streamed non-GEMM kernels and, for its
    larger GEMMs, the tiled GEMM and LoRA kernels); built for the cluster's ISA and run on QEMU with zfinx=true
    (the generic HAL's team of 8 "cores" run in turn), it trains like the numpy executor."""
    program = lower_to_target(compiled(model, tuning), load_target("siracusa"))
    source = generate_c(program)
    streamed = sorted(k for k in CLUSTER_KERNELS.values() if f"{k}(" in source)
    assert streamed, "a lowered program calls the streamed cluster kernels"
    x, y = data_for(program, 12)
    device = QemuDevice(program, tmp_path, board="rv32-zfinx-qemu", timeout_s=QEMU_TIMEOUT_S)
    assert_same_training(device.train(x, y, K_STEPS), NumpyDevice(program).train(x, y, K_STEPS))
    print(f"\n{model}: {len(streamed)} streamed kernels: {', '.join(streamed)}")
