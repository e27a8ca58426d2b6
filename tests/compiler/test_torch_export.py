"""A model written in PyTorch (not from the zoo), exported with torch.onnx.export, compiled and trained, equals
the same training in PyTorch itself — full tuning, and LoRA on its linear layers plus a trained head."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compiler.pipeline import compile_model
from device_runtime import NumpyDevice

LR, MOMENTUM, STEPS, BATCH = 0.05, 0.9, 6, 4


class SmallNet(nn.Module):
    """Conv → BatchNorm (eval) → ReLU → MaxPool → flatten → Linear → GELU → LayerNorm → Linear → Tanh-gated
    Linear head: a spread of ops torch exports (Gemm, Erf-GELU, LayerNormalization, Flatten/Reshape...)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 4 * 4, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        x = x.flatten(1)
        x = self.norm(nn.functional.gelu(self.fc1(x)))
        return self.head(torch.tanh(self.fc2(x)))


class Lora(nn.Module):
    def __init__(self, base: nn.Linear, a: np.ndarray, b: np.ndarray, scale: float):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a @ self.b) * self.scale


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():  # non-trivial running statistics
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.8, 1.2)
    net.eval()
    path = tmp_path_factory.mktemp("export") / "smallnet.onnx"
    torch.onnx.export(net, (torch.randn(2, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}},
                      do_constant_folding=False)  # keep BatchNormalization (folding would fuse it into the conv)
    return net, path


def _data():
    rng = np.random.default_rng(5)
    return rng.normal(size=(3 * BATCH, 1, 8, 8)).astype(np.float32), rng.integers(0, 5, 3 * BATCH)


def _train_torch(module: nn.Module, params: list[nn.Parameter], x: np.ndarray, y: np.ndarray) -> list[float]:
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    losses = []
    for step in range(STEPS):
        idx = (np.arange(BATCH) + step * BATCH) % len(x)
        loss = nn.functional.cross_entropy(module(torch.tensor(x[idx])), torch.tensor(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_full_training_equals_pytorch(exported):
    net, path = exported
    net = _copy(net)
    program = compile_model(path, "full", batch=BATCH, lr=LR, momentum=MOMENTUM)
    x, y = _data()
    result = NumpyDevice(program).train(x, y, STEPS)
    trainable = {n: p for n, p in net.named_parameters() if not n.startswith("bn.")}
    for p in net.bn.parameters():
        p.requires_grad_(False)
    losses = _train_torch(net, list(trainable.values()), x, y)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-4, atol=1e-6)
    assert set(result.params) == set(trainable)
    for name, p in trainable.items():
        np.testing.assert_allclose(result.params[name], p.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_lora_plus_head_equals_pytorch(exported):
    net, path = exported
    net = _copy(net)
    tuning = {"strategy": "lora", "rank": 2, "alpha": 4.0, "init": "random", "targets": ["fc1", "fc2"],
              "train": ["head"]}
    program = compile_model(path, tuning, batch=BATCH, lr=LR, momentum=MOMENTUM)
    assert set(program.trainable) == {"fc1.lora_a", "fc1.lora_b", "fc2.lora_a", "fc2.lora_b", "head.weight",
                                      "head.bias"}
    x, y = _data()
    result = NumpyDevice(program).train(x, y, STEPS)
    for p in net.parameters():
        p.requires_grad_(False)
    for layer in ("fc1", "fc2"):
        setattr(net, layer, Lora(getattr(net, layer), program.values[f"{layer}.lora_a"],
                                 program.values[f"{layer}.lora_b"], 4.0 / 2))
    for p in net.head.parameters():
        p.requires_grad_(True)
    params = {"fc1.lora_a": net.fc1.a, "fc1.lora_b": net.fc1.b, "fc2.lora_a": net.fc2.a, "fc2.lora_b": net.fc2.b,
              "head.weight": net.head.weight, "head.bias": net.head.bias}
    losses = _train_torch(net, list(params.values()), x, y)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-4, atol=1e-6)
    for name, p in params.items():
        np.testing.assert_allclose(result.params[name], p.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def _copy(net: SmallNet) -> SmallNet:
    clone = SmallNet()
    clone.load_state_dict(net.state_dict())
    return clone.eval()
