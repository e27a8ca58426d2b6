"""Whole programs: the generated C + kernels + firmware entry compiled with the host gcc (board ``host``),
driven through QemuDevice's file protocol, against NumpyDevice. Fast; QEMU itself is in test_qemu.py."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from compiler.ops import get_op
from device_runtime import NumpyDevice
from device_runtime.device import DeviceError
from device_runtime.qemu import QemuDevice
from tests.codegen.harness import assert_close, call_kernel
from tests.codegen.programs import (AE_LORA, CCT_SPARSE, DS_CNN_SPARSE, K_STEPS, assert_same_training, compiled, data_for, frozen_tuning)

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="host gcc is not installed")

PROGRAMS = [
    ("torch-mlp", "lora+head", 0.0, 0.0),
    ("torch-mlp", "full", 0.9, 0.01),          # momentum buffers and weight decay
    ("deep-ae", frozen_tuning(AE_LORA), 0.0, 0.0),
    ("deep-ae", "last-1", 0.0, 0.0),
    ("cct-digits", "lora", 0.0, 0.0),
    ("cct-digits", "last-1", 0.0, 0.0),
    ("ds-cnn", "last-1", 0.0, 0.0),            # Conv gradients, GlobalAveragePool, Expand
    ("ds-cnn", "bias", 0.9, 0.0),
    ("ds-cnn", frozen_tuning(DS_CNN_SPARSE), 0.9, 0.0),   # sparse: channel slices, first-rows SGD, momentum
    ("cct-digits", frozen_tuning(CCT_SPARSE), 0.0, 0.01),  # sparse: MatMul columns (strided SGD), weight decay
]


def _id(p):
    return f"{p[0]}-{p[1] if isinstance(p[1], str) else dict(p[1])['strategy']}{'-momentum' if p[2] else ''}"


@pytest.mark.parametrize("model, tuning, momentum, weight_decay", PROGRAMS, ids=[_id(p) for p in PROGRAMS])
def test_host_build_trains_like_numpy(tmp_path, model, tuning, momentum, weight_decay):
    program = compiled(model, tuning, 4, momentum, weight_decay)
    x, y = data_for(program, 10)
    device = QemuDevice(program, tmp_path, board="host")
    got = device.train(x, y, K_STEPS)
    want = NumpyDevice(program).train(x, y, K_STEPS)
    assert_same_training(got, want)
    again = device.train(x, y, 2, lr=0.01)     # state (parameters, velocity) carries over between runs
    want_again = NumpyDevice(program)
    want_again.train(x, y, K_STEPS)
    assert_same_training(again, want_again.train(x, y, 2, lr=0.01))


@pytest.mark.parametrize("model, tuning", [("torch-mlp", "lora+head"), ("deep-ae", "last-1")])
def test_host_build_evaluates_like_numpy(tmp_path, model, tuning):
    program = compiled(model, tuning)
    x, y = data_for(program, 10)  # not a multiple of the batch: the last batch wraps around
    got = QemuDevice(program, tmp_path, board="host").evaluate(x, y)
    want = NumpyDevice(program).evaluate(x, y)
    assert got.samples == want.samples == 10
    assert_close(got.outputs, want.outputs, "outputs", rtol=1e-5)
    assert abs(got.loss - want.loss) <= 1e-5 * abs(want.loss)


def test_set_params_reach_the_firmware(tmp_path):
    program = compiled("torch-mlp", "lora+head")
    x, y = data_for(program, 8)
    rng = np.random.default_rng(3)
    new = {n: rng.standard_normal(v.shape).astype(np.float32) for n, v in program.initial_parameters().items()}
    device, reference = QemuDevice(program, tmp_path, board="host"), NumpyDevice(program)
    device.set_params(new)
    reference.set_params(new)
    assert_same_training(device.train(x, y, 2), reference.train(x, y, 2))
    with pytest.raises(DeviceError):
        device.set_params({"no such tensor": np.zeros(1)})


@pytest.mark.parametrize("model, tuning", [("cct-digits", "lora"), ("ds-cnn", "last-1"), ("deep-ae", "last-1")])
def test_every_step_kernel_matches_numpy_on_a_real_program(kernel_lib, model, tuning):
    """Each train step's kernel on the program's real shapes and values, step by step (localizes a failure)."""
    program = compiled(model, tuning)
    x, y = data_for(program, program.batch)
    values = {n: np.array(v) for n, v in program.values.items()}
    values[program.input] = x
    if program.label:
        values[program.label] = y
    for step in program.train.steps:
        op = get_op(step.op)
        inputs = [values[n] for n in step.inputs if n]
        want = op.run([np.array(a) for a in inputs], op.resolve_attrs(dict(step.attrs)))
        if not op.view:
            specs = [] if op.updates else [(w.shape, w.dtype) for w in want]
            got = call_kernel(kernel_lib, step.op, inputs, dict(step.attrs), specs)
            for g, w in zip(got, want):
                assert_close(g, np.asarray(w), f"step {step.name} ({step.op})")
        targets = [step.inputs[i] for i in op.updates if i < len(step.inputs)] if op.updates else step.outputs
        for name, value in zip(targets, want):
            values[name] = np.asarray(value)
