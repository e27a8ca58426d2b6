"""Importing models as users export them: fixed-batch exports, names by module path (--list-layers, partial-layer
warnings, LoRA's automatic targets), merged initializers untied, LoRA on MatMul(x, Transpose(W)), and each bad
input's one-line error."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compiler.ir import CompileError
from compiler.pipeline import compile_model
from device_runtime import NumpyDevice
from tests.compiler.test_pytorch_models import (ALPHA, BATCH, LR, MOMENTUM, RANK, STEPS, WEIGHT_DECAY, _assert_param,
                                                data, exported)
from tests.compiler.torch_models import SPECS, add_lora, build, export, train_torch

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet.cli", "compile", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={"PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0",
                                                       "PATH": "/usr/bin:/bin"})


def _one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(exc.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_fixed_batch_export_rebatches_and_trains_like_pytorch(dynamo):
    model = export(build("autoencoder"), SPECS["autoencoder"].input_shape, dynamo, 18, batch=1)
    program = compile_model(model, "full", batch=BATCH, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    assert program.report["batch"] == BATCH and program.report["import"]["rebatched"] == {"x": [1, 16]}
    assert program.tensors["x"].shape == (BATCH, 16)
    x, _ = data("autoencoder")
    result = NumpyDevice(program).train(x, None, STEPS)
    net = build("autoencoder")
    losses = train_torch(net, dict(net.named_parameters()), x, None, STEPS, BATCH, LR, MOMENTUM, WEIGHT_DECAY)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-4, atol=1e-6)


class BakedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(1, 8))  # the batch of 1 is baked into the graph


def test_fixed_batch_that_cannot_rebatch_is_one_line():
    model = export(BakedBatch().eval(), (2, 4), False, 17, batch=1)
    with pytest.raises(CompileError) as exc:
        compile_model(model, "full", batch=BATCH)
    _one_line(exc, "input 'x'", "fixed batch", "(1, 2, 4)", f"batch {BATCH}", "--batch 1")


class WithCumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.blocks = nn.Sequential(nn.Sequential(nn.Identity()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(self.fc(x), dim=1)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_unsupported_op_names_node_op_and_module(dynamo):
    model = export(WithCumsum().eval(), (4,), dynamo, 18)
    with pytest.raises(CompileError) as exc:
        compile_model(model, "full", batch=BATCH)
    _one_line(exc, "op 'CumSum'", "node '", "docs/ops.md")


def test_every_public_op_but_shape_has_a_gradient_rule():
    from compiler.ops import REGISTRY, Op
    no_rule = sorted(n for n, op in REGISTRY.items() if type(op).gradient is Op.gradient and not op.backward_only
                     and not op.internal and n != "Shape")
    assert not no_rule, f"public ops without a gradient rule: {no_rule}"


def test_missing_gradient_rule_names_node_and_layer():
    from compiler.autodiff import differentiate
    from compiler.ir import Graph, Node, Role, TensorSpec
    tensors = {"w": TensorSpec("w", (3,), "float32", Role.TRAINABLE), "x": TensorSpec("x", (3,), "float32", Role.INPUT),
               "m": TensorSpec("m", (3,)), "loss": TensorSpec("loss", (), "float32", Role.LOSS)}
    nodes = (Node("/enc/mask", "EqualMask", ("x", "w"), ("m",), layer="enc"),
             Node("sum", "ReduceSum", ("m",), ("loss",), {"keepdims": 0}, layer="loss"))
    graph = Graph(tensors, nodes, ("x",), ("loss",), {"w": np.zeros(3, np.float32)})
    with pytest.raises(CompileError) as exc:
        differentiate(graph, "loss", None)
    _one_line(exc, "node '/enc/mask'", "EqualMask", "layer 'enc'", "no gradient rule")


def test_list_layers_shows_paths_ops_shapes_and_strategy(tmp_path):
    path = tmp_path / "vit.onnx"
    onnx.save(exported("vit_mha", "dynamo"), str(path))
    result = _cli(str(path), "--strategy", "lora", "--lora-targets", "blocks.0.mlp.*", "--train", "head",
                  "--list-layers")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "LoraLinear" in rows["blocks.0.mlp.0"] and rows["blocks.0.mlp.0"].endswith("lora")
    assert rows["head"].endswith("full") and "Gemm" in rows["head"]
    assert rows["blocks.0.attn"].endswith("frozen") and "in_proj_weight (16, 48)" in rows["blocks.0.attn"]
    assert rows["blocks.0.norm2"].endswith("frozen") and "weight (16,)" in rows["blocks.0.norm2"]


def test_partial_layer_pattern_is_a_warning_naming_both(tmp_path):
    path = tmp_path / "vit.onnx"
    onnx.save(exported("vit_encoder", "torchscript"), str(path))
    result = _cli(str(path), "--strategy", "selective", "--train", "blocks.0.linear1.bias")
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "blocks.0.linear1.bias" in warning[0] and "blocks.0.linear1.weight" in warning[0]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_lora_auto_targets_are_attention_and_mlp_and_reported(exporter):
    program = compile_model(exported("vit_mha", exporter), "lora", batch=BATCH)
    assert program.report["lora_targets"] == ["blocks.0.attn.out_proj", "blocks.0.mlp.0", "blocks.0.mlp.2"]


def test_merged_layer_norms_are_untied_and_reported():
    program = compile_model(exported("residual_mlp", "torchscript"), "full", batch=BATCH)
    untied = program.report["import"]["untied"]
    assert {"norm_a.weight", "norm_b.weight"} & set(untied) and {"norm_a.weight", "norm_b.weight"} <= set(
        program.trainable)


def test_lora_on_matmul_of_a_transposed_weight_equals_pytorch():
    """Without constant folding TorchScript exports a 3-D nn.Linear as MatMul(x, Transpose(W))."""
    name = "vit_encoder"
    model = export(build(name), SPECS[name].input_shape, False, 17, folding=False)
    assert any(n.op_type == "Transpose" and n.input[0] == "blocks.0.linear1.weight" for n in model.graph.node)
    layers = ("blocks.0.linear1", "blocks.0.linear2")
    tuning = {"strategy": "lora", "rank": RANK, "alpha": ALPHA, "init": "random", "targets": list(layers)}
    program = compile_model(model, tuning, batch=BATCH, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    assert program.report["lora_targets"] == list(layers)
    x, y = data(name)
    result = NumpyDevice(program).train(x, y, STEPS)
    net = build(name)
    for p in net.parameters():
        p.requires_grad_(False)
    chosen = {}
    for layer in layers:
        lora = add_lora(net, layer, program.values[f"{layer}.lora_a"], program.values[f"{layer}.lora_b"],
                        ALPHA / RANK)
        chosen[f"{layer}.lora_a"], chosen[f"{layer}.lora_b"] = lora.a, lora.b
    losses = train_torch(net, chosen, x, y, STEPS, BATCH, LR, MOMENTUM, WEIGHT_DECAY)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-4, atol=1e-6)
    for n, p in chosen.items():
        _assert_param(result.params[n], p, n)
