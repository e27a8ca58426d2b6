"""LoRA on convolutions, as PEFT adapts nn.Conv2d / nn.Conv1d: a ResNet-style CNN and a 1-D keyword-spotting
net, written in PyTorch and exported with torch.onnx.export, take adapters on every ungrouped conv (depthwise
ones are left frozen by rule). K SGD steps (momentum, weight decay) equal the same training in PyTorch with
PEFT-style LoRA modules (A: the layer's conv down to r channels, B: a 1×1 conv back up); the device axis trains
D devices as D separate programs would."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compiler.ir import CompileError
from compiler.pipeline import compile_model
from device_runtime import NumpyDevice

LR, MOMENTUM, WEIGHT_DECAY, STEPS, BATCH, RANK, ALPHA = 0.05, 0.9, 1e-3, 4, 4, 2, 4.0


class ResNetish(nn.Module):
    """stem conv → BN → ReLU, one residual block (two 3×3 convs with BN, identity skip), a depthwise 3×3 and a
    pointwise 1×1 conv, global average pool, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.classifier = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.classifier(x.mean(dim=(2, 3)))


class Kws1d(nn.Module):
    """A 1-D conv keyword spotter: strided conv over MFCC frames, a dilated conv, pooling, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(10, 12, 5, stride=2, padding=2)
        self.conv2 = nn.Conv1d(12, 12, 3, padding=2, dilation=2)
        self.classifier = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.classifier(x.mean(dim=2))


class LoraConv(nn.Module):
    """PEFT's LoRA for a conv: base(x) + lora_B(lora_A(x))·scale, A with the layer's window, B 1×1, no bias."""

    def __init__(self, base: nn.Module, a: np.ndarray, b: np.ndarray, scale: float):
        super().__init__()
        conv = nn.Conv1d if isinstance(base, nn.Conv1d) else nn.Conv2d
        self.base = base
        self.lora_a = conv(base.in_channels, a.shape[0], base.kernel_size, base.stride, base.padding, base.dilation,
                           bias=False)
        self.lora_b = conv(a.shape[0], base.out_channels, 1, bias=False)
        with torch.no_grad():
            self.lora_a.weight.copy_(torch.tensor(a))
            self.lora_b.weight.copy_(torch.tensor(b))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale


def _export(net: nn.Module, shape: tuple[int, ...], path) -> None:
    net.eval()
    torch.onnx.export(net, (torch.randn(2, *shape),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}},
                      do_constant_folding=False)  # keep BatchNormalization apart from the conv it follows


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    net = ResNetish()
    with torch.no_grad():  # non-trivial statistics, and no two identical initializers for the exporter to merge
        for bn in (net.stem_bn, net.bn1, net.bn2):
            for t, low, high in ((bn.running_mean, -0.2, 0.2), (bn.running_var, 0.8, 1.2), (bn.weight, 0.8, 1.2),
                                 (bn.bias, -0.1, 0.1)):
                t.uniform_(low, high)
    path = tmp_path_factory.mktemp("export") / "resnetish.onnx"
    _export(net, (3, 8, 8), path)
    return net, path


@pytest.fixture(scope="module")
def kws(tmp_path_factory):
    torch.manual_seed(1)
    net = Kws1d()
    path = tmp_path_factory.mktemp("export") / "kws1d.onnx"
    _export(net, (10, 16), path)
    return net, path


def _data(shape: tuple[int, ...], classes: int, count: int, seed: int = 5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, *shape)).astype(np.float32), rng.integers(0, classes, count)


def _train_torch(module: nn.Module, params: dict[str, nn.Parameter], x: np.ndarray, y: np.ndarray) -> list[float]:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.SGD(list(params.values()), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    losses = []
    for step in range(STEPS):
        idx = (np.arange(BATCH) + step * BATCH) % len(x)
        loss = nn.functional.cross_entropy(module(torch.tensor(x[idx])), torch.tensor(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _adapt(net: nn.Module, program, layers: list[str]) -> dict[str, nn.Parameter]:
    """Wrap each adapted conv of ``net`` with the program's initial A and B; the torch parameters by program name."""
    params = {}
    for layer in layers:
        lora = LoraConv(getattr(net, layer), program.values[f"{layer}.lora_a"], program.values[f"{layer}.lora_b"],
                        ALPHA / RANK)
        setattr(net, layer, lora)
        params[f"{layer}.lora_a"], params[f"{layer}.lora_b"] = lora.lora_a.weight, lora.lora_b.weight
    return params


def _copy(net: nn.Module) -> nn.Module:
    clone = type(net)()
    clone.load_state_dict(net.state_dict())
    return clone.eval()


def _assert_same(result, losses, params):
    np.testing.assert_allclose(result.losses, losses, rtol=1e-4, atol=1e-6)
    for name, p in params.items():
        np.testing.assert_allclose(result.params[name], p.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_lora_plus_head_adapts_every_ungrouped_conv_and_trains_as_pytorch(resnet):
    net, path = resnet
    tuning = {"strategy": "lora", "rank": RANK, "alpha": ALPHA, "init": "random", "train": ["classifier*"]}
    program = compile_model(path, tuning, batch=BATCH, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    convs = ["stem", "conv1", "conv2", "pw"]  # dw is depthwise: no adapter, by rule
    assert set(program.trainable) == {f"{c}.lora_{p}" for c in convs for p in "ab"} | {"classifier.weight",
                                                                                        "classifier.bias"}
    assert [s.op for s in program.train.steps].count("LoraConv") == len(convs)
    assert program.values["conv1.lora_a"].shape == (RANK, 8, 3, 3)
    assert program.values["pw.lora_b"].shape == (16, RANK, 1, 1)
    x, y = _data((3, 8, 8), 5, 3 * BATCH)
    result = NumpyDevice(program).train(x, y, STEPS)
    torch_net = _copy(net)
    params = _adapt(torch_net, program, convs)
    params.update({"classifier.weight": torch_net.classifier.weight, "classifier.bias": torch_net.classifier.bias})
    _assert_same(result, _train_torch(torch_net, params, x, y), params)


def test_lora_on_1d_convs_trains_as_pytorch(kws):
    net, path = kws
    tuning = {"strategy": "lora", "rank": RANK, "alpha": ALPHA, "init": "random", "targets": ["conv*"]}
    program = compile_model(path, tuning, batch=BATCH, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    assert program.values["conv1.lora_a"].shape == (RANK, 10, 5)
    x, y = _data((10, 16), 4, 3 * BATCH)
    result = NumpyDevice(program).train(x, y, STEPS)
    torch_net = _copy(net)
    params = _adapt(torch_net, program, ["conv1", "conv2"])
    _assert_same(result, _train_torch(torch_net, params, x, y), params)


def test_device_axis_trains_each_device_as_its_own_program(resnet):
    _, path = resnet
    tuning = {"strategy": "lora", "rank": RANK, "alpha": ALPHA, "init": "random", "targets": ["conv1", "pw"]}
    devices = 2
    batched = compile_model(path, tuning, batch=BATCH, lr=LR, momentum=MOMENTUM, devices=devices)
    assert batched.values["conv1.lora_a"].shape == (devices, RANK, 8, 3, 3)
    single = compile_model(path, tuning, batch=BATCH, lr=LR, momentum=MOMENTUM)
    xs, ys = zip(*(_data((3, 8, 8), 5, BATCH, seed=10 + d) for d in range(devices)))
    device = NumpyDevice(batched)
    for _ in range(STEPS):
        device.trainer.run({batched.input: np.concatenate(xs), batched.label: np.concatenate(ys)})
    trained = device.get_params()
    for d in range(devices):
        alone = NumpyDevice(single).train(xs[d], ys[d], STEPS)
        for name, value in alone.params.items():
            np.testing.assert_allclose(trained[name][d], value, rtol=1e-4, atol=1e-6, err_msg=f"device {d}: {name}")


def test_lora_on_a_depthwise_conv_is_refused_by_name(resnet):
    _, path = resnet
    with pytest.raises(CompileError, match="LoRA target pattern 'dw' matches no MatMul/Gemm/Conv layer"):
        compile_model(path, {"strategy": "lora", "targets": ["dw"]}, batch=BATCH)
