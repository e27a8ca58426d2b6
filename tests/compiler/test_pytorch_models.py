"""Models as users export them (tests/compiler/torch_models.py), from both ONNX exporters at opsets 17-21,
compiled under full, selective (by module path), LoRA and LoRA + head tuning: K SGD steps with momentum and
weight decay equal PyTorch's own training (every loss and every trained parameter, rtol 1e-4), with the
trained tensors named by their PyTorch module paths. LoRA on convolutions is not covered here yet: the CNNs
take LoRA on their classifier only (the ``lora`` strategy), not ``lora+head``."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from compiler.pipeline import compile_model
from device_runtime import NumpyDevice
from tests.compiler.torch_models import SPECS, add_lora, build, export, train_torch

STEPS, BATCH, LR, MOMENTUM, WEIGHT_DECAY, RANK, ALPHA = 3, 4, 0.05, 0.9, 0.01, 2, 4.0
EXPORTERS = {"torchscript": (False, (17, 18, 19, 20)), "dynamo": (True, (18, 20, 21))}
STRATEGIES = ("full", "selective", "lora", "lora+head")


@functools.cache
def exported(name: str, exporter: str):
    dynamo, opsets = EXPORTERS[exporter]
    opset = opsets[sorted(SPECS).index(name) % len(opsets)]
    return export(build(name), SPECS[name].input_shape, dynamo, opset)


def data(name: str):
    spec = SPECS[name]
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3 * BATCH, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.classes, 3 * BATCH) if spec.task == "classification" else None
    return x, y


def tuning(name: str, strategy: str) -> dict:
    spec = SPECS[name]
    if strategy == "full":
        return {"strategy": "full"}
    if strategy == "selective":
        return {"strategy": "selective", "train": list(spec.selective)}
    lora = {"strategy": "lora", "rank": RANK, "alpha": ALPHA, "init": "random", "targets": list(spec.lora)}
    return dict(lora, train=list(spec.head)) if strategy == "lora+head" else lora


def cases():
    for name, spec in SPECS.items():
        for exporter in EXPORTERS:
            for strategy in STRATEGIES:
                if strategy == "lora+head" and (not spec.head or set(spec.head) & set(spec.lora)):
                    continue  # a CNN's only linear layer is its head (LoRA on convolutions: not here yet)
                yield pytest.param(name, exporter, strategy, id=f"{name}-{exporter}-{strategy}")


def _is_frozen_by_design(name: str, model: torch.nn.Module) -> bool:
    """BatchNorm in eval mode is folded to constants (docs: frozen by design)."""
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return isinstance(owner, torch.nn.modules.batchnorm._BatchNorm)


def _selected(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in patterns)


def _assert_param(got: np.ndarray, want: torch.Tensor, name: str) -> None:
    want = want.detach().numpy()
    if got.shape != want.shape and got.ndim == 2 and got.shape == want.T.shape:
        want = want.T  # a MatMul weight keeps the graph's (in, out) layout
    elif got.shape != want.shape and got.size == want.size:
        want = want.reshape(got.shape)  # a PRelu slope as the exporter broadcasts it
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name, exporter, strategy", list(cases()))
def test_training_equals_pytorch(name, exporter, strategy):
    spec = SPECS[name]
    model = exported(name, exporter)
    program = compile_model(model, tuning(name, strategy), batch=BATCH, lr=LR, momentum=MOMENTUM,
                            weight_decay=WEIGHT_DECAY)
    x, y = data(name)
    result = NumpyDevice(program).train(x, y, STEPS)

    net = build(name)
    for p in net.parameters():
        p.requires_grad_(False)
    if strategy == "full":
        chosen = {n: p for n, p in net.named_parameters() if not _is_frozen_by_design(n, net)}
    elif strategy == "selective":
        chosen = {n: p for n, p in net.named_parameters() if _selected(n, spec.selective)}
    else:
        chosen = {n: p for n, p in net.named_parameters() if _selected(n, spec.head)} if strategy == "lora+head" else {}
        scale = ALPHA / RANK
        for layer in spec.lora:
            lora = add_lora(net, layer, program.values[f"{layer}.lora_a"], program.values[f"{layer}.lora_b"], scale)
            chosen[f"{layer}.lora_a"], chosen[f"{layer}.lora_b"] = lora.a, lora.b
    for p in chosen.values():
        p.requires_grad_(True)
    assert set(program.trainable) == set(chosen), "trained tensors are not named by their PyTorch module paths"
    losses = train_torch(net, chosen, x, y, STEPS, BATCH, LR, MOMENTUM, WEIGHT_DECAY)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-4, atol=1e-6)
    for n, p in chosen.items():
        _assert_param(result.params[n], p, n)
