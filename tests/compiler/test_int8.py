"""int8 training (compiler/quantize.py, compiler/ops/quantized.py) against a PyTorch reference of the same integer
arithmetic (tests/compiler/int8_torch.py): the quantized forward bit for bit, one SGD step with and without QAS
(float gradients rtol 1e-5, int8/int32 parameters exactly), the sparse restriction, and one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compiler import compile_model
from compiler.ir import CompileError
from compiler.quantize import Int8Options, affine
from compiler.zoo.task_data import task_data
from device_runtime import NumpyDevice
from tests.compiler.int8_torch import QuantizedTorch

SPARSE = {"strategy": "sparse", "sparse": {"blocks.2.pw": "bias", "blocks.3.dw": "all", "blocks.3.pw": "1/2",
                                           "classifier": "1/2"}}
LR = 0.05


def _compiled(tuning=SPARSE, batch=2, qas=True, update="round", samples=32):
    x, y = task_data("ds-cnn", samples, seed=3)
    program = compile_model("ds-cnn", tuning, batch=batch, lr=LR, int8=Int8Options(x, qas=qas, update=update))
    return program, x, y


def run_phase(program, phase, feeds, device=None):
    """Run one phase in the planned arena, keeping a copy of every step's outputs as it is produced (the arena
    reuses buffers, so the end state holds only the last tensors); parameters as they are at the end."""
    device = device or NumpyDevice(program)
    runner = device.trainer if phase == "train" else device.evaluator
    steps = {s.name: s for s in getattr(program, phase).steps}
    for name, view in runner.feeds.items():
        np.copyto(view, feeds[name], casting="same_kind")
    seen = {}
    for kernel, ins, attrs, outs, name in runner.calls:
        kernel(outs, *ins, **attrs)
        seen.update({o: v.copy() for o, v in zip(steps[name].outputs, outs)})
    seen.update({n: v.copy() for n, v in device.param_views.items()})
    return seen


def test_affine_holds_zero_and_maps_relu_range_onto_the_clamp():
    scale, zero = affine(0.0, 2.55)
    assert zero == -128 and scale == pytest.approx(0.01)
    scale, zero = affine(0.5, 1.0)  # widened to hold 0
    assert zero == -128 and scale == pytest.approx(1.0 / 255)
    scale, zero = affine(-1.0, 1.0)
    assert round(-1.0 / scale) + zero == -128


def test_quantized_forward_equals_torch_integer_reference_bit_for_bit():
    program, x, y = _compiled()
    views = run_phase(program, "evaluate", {program.input: x[:2], program.label: y[:2]})
    env = QuantizedTorch(program).forward(x[:2])
    checked = 0
    for step in program.evaluate.steps:
        if step.op.startswith("Q"):
            got, want = views[step.outputs[0]], env[step.outputs[0]].detach().numpy()
            assert got.dtype == (np.float32 if step.op == "QLinear" else np.int8), step.name
            np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32), err_msg=step.name)
            checked += 1
    assert checked == 12  # the input, conv0, 4 × (dw, pw), the pool, the classifier
    assert views[program.output].dtype == np.float32 and np.abs(views[program.output]).max() > 0


@pytest.mark.parametrize("qas", [True, False])
def test_one_training_step_equals_torch_reference(qas):
    program, x, y = _compiled(qas=qas)
    feeds = {program.input: x[:2], program.label: y[:2]}
    views = run_phase(program, "train", feeds)
    loss, grads, new = QuantizedTorch(program).train_step(x[:2], y[:2], LR, qas)
    assert float(views[program.loss]) == pytest.approx(loss, rel=1e-5)
    updates = {s.inputs[0]: s for s in program.train.steps if s.op == "QSGD"}
    assert set(updates) == set(grads) == set(program.trainable)
    moved = 0
    for name, step in updates.items():
        np.testing.assert_allclose(views[step.inputs[1]], grads[name].detach().numpy(), rtol=1e-5,
                                   atol=1e-5 * float(grads[name].abs().max()), err_msg=name)
        want = new[name].numpy().astype(views[name].dtype)
        np.testing.assert_array_equal(views[name], want, err_msg=name)
        moved += int(np.sum(views[name] != program.values[name]))
    if qas:
        assert moved > 0  # QAS-scaled steps move integer weights
    else:  # without QAS the steps are ~s_w² too small: no int8 weight moves (int32 biases may)
        assert all(np.array_equal(views[n], program.values[n]) for n in updates if n.endswith(".weight"))


def test_master_update_keeps_float_copies_of_the_updated_channels_only():
    program, x, y = _compiled(update="master")
    masters = {n: t for n, t in program.tensors.items() if n.endswith(".master")}
    assert set(masters) == {f"{n}.master" for n in program.trainable if n.endswith(".weight")}
    assert masters["blocks.3.pw.weight.master"].shape == (32, 64, 1, 1)
    views = run_phase(program, "train", {program.input: x[:2], program.label: y[:2]})
    masters_torch = {n[: -len(".master")]: torch.tensor(program.values[n]) for n in masters}
    _, _, new = QuantizedTorch(program).train_step(x[:2], y[:2], LR, True, master=masters_torch)
    for name in masters_torch:
        np.testing.assert_allclose(views[name + ".master"], masters_torch[name].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(views[name], new[name].numpy().astype(np.int8), err_msg=name)


def test_sparse_int8_leaves_frozen_channels_and_layers_bit_identical():
    program, x, y = _compiled()
    device = NumpyDevice(program)
    before = {n: device.param_views[n].copy() for n in program.param_offsets}
    device.train(x, y, 4)
    w = device.param_views["blocks.3.pw.weight"]
    np.testing.assert_array_equal(w[32:], before["blocks.3.pw.weight"][32:])
    assert not np.array_equal(w[:32], before["blocks.3.pw.weight"][:32])
    for name in ("conv0.weight", "blocks.0.pw.weight", "blocks.2.pw.weight"):
        np.testing.assert_array_equal(device.param_views[name], before[name])
    assert w.dtype == np.int8 and device.param_views["blocks.3.pw.bias"].dtype == np.int32


def test_int8_program_is_smaller_than_fp32():
    program, _, _ = _compiled(batch=1)
    fp32 = compile_model("ds-cnn", SPARSE, batch=1, lr=LR)
    assert program.report["memory"]["total_bytes"] < 0.8 * fp32.report["memory"]["total_bytes"]
    assert program.report["memory"]["frozen_weights_bytes"] < fp32.report["memory"]["frozen_weights_bytes"] / 3


def test_unsupported_op_is_one_line():
    x, _ = task_data("cct-digits", 8)
    with pytest.raises(CompileError) as exc:
        compile_model("cct-digits", "full", batch=1, int8=Int8Options(x))
    message = str(exc.value)
    assert "\n" not in message and "int8" in message and "no quantized form" in message


def test_momentum_with_int8_is_one_line():
    x, _ = task_data("ds-cnn", 8)
    with pytest.raises(CompileError, match=r"int8 training takes plain SGD"):
        compile_model("ds-cnn", SPARSE, batch=1, momentum=0.9, int8=Int8Options(x))


def test_cycle_model_charges_int8_layers_at_the_int8_rate():
    import dataclasses

    from compiler.targets import load_target, lower_to_target
    program, _, _ = _compiled(batch=1)
    target = load_target("siracusa")
    lowered = lower_to_target(program, target)
    layers = [s for s in lowered.train.steps if s.op in ("QConv", "QLinear")]
    assert len(layers) == 10 and all(s.unit == "cluster" and s.cycles > 0 for s in layers)
    faster = lower_to_target(program, dataclasses.replace(target, int8_macs_per_cycle=2 * target.int8_macs_per_cycle))
    conv0 = {s.name: s.cycles for s in faster.train.steps}["conv0"]
    assert conv0 < {s.name: s.cycles for s in lowered.train.steps}["conv0"]
    fp32 = lower_to_target(compile_model("ds-cnn", SPARSE, batch=1, lr=LR), target)
    assert lowered.report["perf"]["cycles_per_step"] < fp32.report["perf"]["cycles_per_step"]
    with pytest.raises(CompileError, match=r"has no cluster.int8_macs_per_cycle_per_core for the int8 layer"):
        lower_to_target(program, dataclasses.replace(target, int8_macs_per_cycle=0.0))
