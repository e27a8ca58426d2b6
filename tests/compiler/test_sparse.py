"""Sparse update (compiler/tuning.py, strategy "sparse"): biases and the first k output channels of chosen weights.

Checked against PyTorch autograd through the independent ONNX interpreter (tests/oracle/torch_onnx.py): the
compiled gradient of a restricted weight equals torch's full gradient restricted to those channels; training
in the arena executor equals torch SGD whose gradients are masked to the chosen channels, and the frozen
channels keep their exact initial bytes; the backward graph holds exactly the nodes the update needs.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from compiler import reference, zoo
from compiler.autodiff import differentiate
from compiler.frontend import import_onnx
from compiler.ir import CompileError, Role
from compiler.pipeline import add_loss, compile_model
from compiler.tuning import TuningSpec, apply_tuning
from device_runtime import NumpyDevice
from tests.oracle.torch_onnx import TorchOnnx

SCHEMES = {
    # a ratio on a pointwise conv, a depthwise conv (grouped: input channels follow), a transB Gemm, bias only
    "ds-cnn": {"blocks.3.pw": "1/4", "blocks.2.dw": "1/2", "classifier": "5", "blocks.1.pw": "bias"},
    # a conv without bias, MatMul weights (output channels are columns), a bias-only MatMul layer
    "cct-digits": {"tokenizer.conv0": "1/8", "blocks.0.mlp.fc1": "1/4", "classifier": "all",
                   "blocks.0.attn.q": "bias"},
}
BATCH = 3


def _data(model: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    entry = zoo.ZOO[model]
    rng = np.random.default_rng(3)
    return rng.normal(size=(n, *entry.input_shape)).astype(np.float32), rng.integers(0, entry.num_classes, n)


def _restricted(spec) -> tuple[slice, ...] | None:
    if spec.train_channels is None:
        return None
    axis, k = spec.train_channels
    return (slice(None),) * axis + (slice(0, k),)


@pytest.mark.parametrize("model", sorted(SCHEMES))
def test_chosen_channel_gradients_equal_torch(model: str) -> None:
    onnx_model = zoo.build(model, seed=2)
    graph = apply_tuning(import_onnx(onnx_model, BATCH), TuningSpec("sparse", sparse=tuple(SCHEMES[model].items())))
    forward, loss, label, _ = add_loss(graph, "auto", "classification")
    train, grads = differentiate(forward, loss, None)
    x, y = _data(model, BATCH)
    env = reference.evaluate(train, {forward.inputs[0]: x, label: y}, dtype="float64")

    oracle = TorchOnnx(onnx_model, trainable=set(grads), dtype=torch.float64)
    torch.nn.functional.cross_entropy(oracle(x), torch.as_tensor(y)).backward()
    restricted = 0
    for name, grad in grads.items():
        spec = train.tensors[name]
        full = oracle.parameters()[name].grad.numpy()
        index = _restricted(spec)
        if index is not None:
            restricted += 1
            assert env[grad].shape == spec.grad_shape != spec.shape
        np.testing.assert_allclose(env[grad], full if index is None else full[index], rtol=1e-5, atol=1e-7 * np.abs(full).max(),
                                   err_msg=name)
    assert restricted == sum(1 for v in SCHEMES[model].values() if v not in ("bias", "all"))


@pytest.mark.parametrize("model", sorted(SCHEMES))
def test_training_equals_masked_torch_sgd_and_frozen_channels_never_change(model: str) -> None:
    lr, momentum, steps = 0.05, 0.9, 3
    program = compile_model(model, {"strategy": "sparse", "sparse": SCHEMES[model]}, batch=BATCH, lr=lr,
                            momentum=momentum, seed=2)
    x, y = _data(model, BATCH * steps)
    start = {n: program.values[n].copy() for n in program.trainable}
    result = NumpyDevice(program).train(x, y, steps)

    graph = apply_tuning(import_onnx(zoo.build(model, seed=2), BATCH),
                         TuningSpec("sparse", sparse=tuple(SCHEMES[model].items())))
    oracle = TorchOnnx(zoo.build(model, seed=2), trainable=set(program.trainable), dtype=torch.float64)
    params = oracle.parameters()
    masks = {}
    for name in params:
        masks[name] = torch.zeros_like(params[name])
        index = _restricted(graph.tensors[name])
        masks[name][index if index is not None else ...] = 1.0
    opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=momentum)
    for step in range(steps):
        idx = slice(step * BATCH, (step + 1) * BATCH)
        loss = torch.nn.functional.cross_entropy(oracle(x[idx]), torch.as_tensor(y[idx]))
        opt.zero_grad()
        loss.backward()
        for name, p in params.items():
            p.grad.mul_(masks[name])
        opt.step()
        assert result.losses[step] == pytest.approx(loss.item(), rel=1e-4)
    for name, p in params.items():
        np.testing.assert_allclose(result.params[name], p.detach().numpy(), rtol=2e-4, atol=1e-6, err_msg=name)
        frozen = masks[name].numpy() == 0
        np.testing.assert_array_equal(result.params[name][frozen], start[name][frozen])  # bit for bit
        assert not np.array_equal(result.params[name][~frozen], start[name][~frozen])


def _backward_ops(model: str, scheme: dict[str, str]) -> Counter:
    program = compile_model(model, {"strategy": "sparse", "sparse": scheme}, batch=2)
    return Counter(s.op for s in program.train.steps if s.phase != "forward")


def test_backward_graph_holds_only_the_nodes_the_update_needs() -> None:
    # ds-cnn, only blocks.3.pw's first 16 channels (and its bias): from the loss back to that conv's output, one
    # gradient per op (loss, classifier dX, flatten, global pool, ReLU, BN scale), then the bias reduction and the
    # restricted weight gradient from dY[:, :16]; no input gradient of blocks.3.pw or anything below it
    assert _backward_ops("ds-cnn", {"blocks.3.pw": "1/4"}) == Counter({
        "SoftmaxCrossEntropyGrad": 1, "Gemm": 1, "Reshape": 1, "Expand": 1, "Mul": 2, "ReluGrad": 1,
        "Slice": 1, "ConvGradWeight": 1, "ReduceSum": 1, "SGD": 2})
    # bias only on blocks.2.pw: one more block to walk back through (dw conv's input gradient, BN, ReLU), no
    # weight gradient anywhere
    ops = _backward_ops("ds-cnn", {"blocks.2.pw": "bias"})
    assert ops["ConvGradWeight"] == 0 and ops["Slice"] == 0 and ops["SGD"] == 1
    assert ops["ConvGradInput"] == 2  # blocks.3.pw and blocks.3.dw; none for blocks.2.pw or below
    # every channel of blocks.3.pw: the plain weight gradient, no slice
    assert _backward_ops("ds-cnn", {"blocks.3.pw": "all"})["Slice"] == 0


def test_sparse_update_is_cheaper_in_memory_flops_and_cycles() -> None:
    from compiler.targets import load_target, lower_to_target
    target = load_target("siracusa")
    reports = {}
    for name, choice in (("all", "all"), ("quarter", "1/4")):
        program = compile_model("ds-cnn", {"strategy": "sparse", "sparse": {"blocks.*.pw": choice}}, batch=1,
                                momentum=0.9)
        reports[name] = lower_to_target(program, target).report
    full, quarter = reports["all"], reports["quarter"]
    assert quarter["params"]["trainable"] == 4 * (16 * 64) + 4 * 64
    assert full["params"]["trainable"] == 4 * (64 * 64) + 4 * 64
    assert quarter["memory"]["optimizer_state_bytes"] * 4 < full["memory"]["optimizer_state_bytes"] * 1.1
    assert quarter["memory"]["gradient_bytes"] < full["memory"]["gradient_bytes"]
    assert quarter["flops"]["backward"] < full["flops"]["backward"]
    assert quarter["perf"]["cycles_per_step"] < full["perf"]["cycles_per_step"]


def test_grouped_conv_channels_round_up_to_whole_groups() -> None:
    graph = import_onnx(zoo.build("ds-cnn"), 1)
    tuned = apply_tuning(graph, TuningSpec("sparse", sparse=(("blocks.0.dw", "3"), ("conv0", "1/8"))))
    assert tuned.tensors["blocks.0.dw.weight"].train_channels == (0, 3)  # depthwise: one channel per group
    assert tuned.tensors["conv0.weight"].train_channels == (0, 8)
    assert tuned.tensors["conv0.bias"].role == Role.TRAINABLE and tuned.tensors["conv0.bias"].train_channels is None


def test_toml_form_round_trips_and_later_patterns_override() -> None:
    spec = TuningSpec.parse({"strategy": "sparse", "sparse": {"blocks.*.pw": "bias", "blocks.3.pw": "1/2"},
                             "train": ["classifier*"]})
    assert TuningSpec.parse(spec.to_dict()) == spec
    tuned = apply_tuning(import_onnx(zoo.build("ds-cnn"), 1), spec)
    assert tuned.tensors["blocks.3.pw.weight"].train_channels == (0, 32)
    assert tuned.tensors["blocks.0.pw.weight"].role == Role.FROZEN
    assert tuned.tensors["blocks.0.pw.bias"].role == Role.TRAINABLE
    assert tuned.tensors["classifier.weight"].train_channels is None  # trained fully by the train pattern


@pytest.mark.parametrize("tuning, message", [
    ({"strategy": "sparse", "sparse": {"blocks.9.*": "bias"}}, "matches no Conv/Gemm/MatMul layer"),
    ({"strategy": "sparse", "sparse": {"classifier": "1/3"}}, "use bias, 1/8, 1/4, 1/2, all"),
    ({"strategy": "sparse", "sparse": {"classifier": "99"}}, "has 12 output channels, 99 asked"),
    ({"strategy": "sparse"}, "sparse tuning needs per-layer choices"),
    ({"strategy": "full", "sparse": {"classifier": "all"}}, "sparse layer choices given with strategy 'full'"),
    ("sparse", "--sparse LAYER=CHOICE"),
])
def test_bad_schemes_are_one_line_errors(tuning, message) -> None:
    with pytest.raises(CompileError, match=message.replace("(", r"\(")) as info:
        compile_model("ds-cnn", tuning, batch=1)
    assert "\n" not in str(info.value)


def test_bias_choice_on_a_layer_without_bias_is_an_error() -> None:
    with pytest.raises(CompileError, match="layer 'tokenizer.conv0' has no bias"):
        compile_model("cct-digits", {"strategy": "sparse", "sparse": {"tokenizer.conv0": "bias"}}, batch=1)
