"""Compiled training equals PyTorch: every zoo model × {full, selective, LoRA, LoRA + head}, 1 and 10 SGD
steps in the numpy executor against the same steps in PyTorch (float64 autograd through an independent ONNX
interpreter, tests/oracle/torch_onnx.py) from the same weights: the loss of every step and every trainable
parameter at the end."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from compiler import zoo
from compiler.pipeline import compile_model
from compiler.program import Program
from compiler.tuning import weight_layer
from device_runtime import NumpyDevice
from tests.oracle.torch_onnx import LoraFactors, TorchOnnx

# per model: the strategies of the issue, spelled for that model
STRATEGIES = {
    "cct-digits": {"full": "full", "selective": "last-1",
                   "lora": {"strategy": "lora", "rank": 2, "init": "random"},
                   "lora+head": {"strategy": "lora", "rank": 2, "init": "random", "train": ["classifier*"]}},
    "cct-2-3x2": {"full": "full", "selective": "last-1",
                  "lora": {"strategy": "lora", "rank": 4, "init": "random"},
                  "lora+head": {"strategy": "lora", "rank": 4, "init": "random", "train": ["classifier*"]}},
    "deep-ae": {"full": "full", "selective": {"strategy": "selective", "train": ["decoder.*"]},
                "lora": {"strategy": "lora", "rank": 4, "init": "random"},
                "lora+head": {"strategy": "lora", "rank": 4, "init": "random", "targets": ["encoder.*", "decoder.[0-3]"],
                              "train": ["decoder.4"]}},
    "ds-cnn": {"full": "full", "selective": {"strategy": "selective", "train": ["blocks.3.*", "classifier*"]},
               "lora": {"strategy": "lora", "rank": 4, "init": "random"},
               "lora+head": {"strategy": "lora", "rank": 4, "init": "random", "train": ["blocks.3.pw*"]}},
}
BATCH = {"cct-2-3x2": 2, "cct-digits": 4, "deep-ae": 8, "ds-cnn": 4}
LR, MOMENTUM = 0.01, 0.9
ADAM_LR = 1e-3


def torch_reference(model: onnx.ModelProto, program: Program, x: np.ndarray, y: np.ndarray | None,
                    steps: int, optimizer: str = "sgd") -> tuple[list[float], dict[str, np.ndarray]]:
    trainable = set(program.trainable)
    lora_layers = {weight_layer(n.rsplit(".lora_", 1)[0] + ".weight") for n in trainable if ".lora_" in n}
    alpha = program.tuning.get("alpha", 8.0)
    lora = {layer: LoraFactors(program.values[f"{layer}.lora_a"], program.values[f"{layer}.lora_b"], alpha)
            for layer in lora_layers}
    oracle = TorchOnnx(model, trainable={n for n in trainable if ".lora_" not in n}, lora=lora, dtype=torch.float64)
    params = oracle.parameters()
    assert set(params) == trainable
    opt = (torch.optim.SGD(list(params.values()), lr=LR, momentum=MOMENTUM) if optimizer == "sgd" else
           torch.optim.Adam(list(params.values()), lr=ADAM_LR))
    batch, losses = program.batch, []
    for step in range(steps):
        idx = (np.arange(batch) + step * batch) % len(x)
        out = oracle(x[idx])
        if program.task == "classification":
            loss = torch.nn.functional.cross_entropy(out, torch.as_tensor(y[idx]))
        else:
            loss = torch.mean((out - torch.as_tensor(x[idx], dtype=torch.float64)) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().numpy() for n, p in params.items()}


def _data(model: str, batch: int) -> tuple[np.ndarray, np.ndarray | None]:
    entry = zoo.ZOO[model]
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3 * batch, *entry.input_shape)).astype(np.float32)
    y = rng.integers(0, entry.num_classes, 3 * batch) if entry.task == "classification" else None
    return x, y


@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.parametrize("strategy", ["full", "selective", "lora", "lora+head"])
@pytest.mark.parametrize("model", sorted(STRATEGIES))
def test_executor_training_equals_pytorch(model: str, strategy: str, steps: int) -> None:
    batch = BATCH[model]
    program = compile_model(model, STRATEGIES[model][strategy], batch=batch, lr=LR, momentum=MOMENTUM)
    x, y = _data(model, batch)
    result = NumpyDevice(program).train(x, y, steps)
    ref_losses, ref_params = torch_reference(zoo.build(model), program, x, y, steps)
    np.testing.assert_allclose(result.losses, ref_losses, rtol=1e-4, atol=1e-6)
    assert set(result.params) == set(ref_params)
    for name, ref in ref_params.items():
        scale = max(float(np.abs(ref).max()), 1e-3)
        np.testing.assert_allclose(result.params[name], ref, rtol=1e-4, atol=1e-4 * scale, err_msg=name)
        # where PyTorch moved a parameter, so did we (a key bias, say, has an exactly zero gradient)
        if np.abs(ref - program.values[name]).max() > 1e-6 * scale:
            assert not np.array_equal(result.params[name], program.values[name]), name
    assert any(not np.array_equal(v, program.values[n]) for n, v in result.params.items())


@pytest.mark.parametrize("model,strategy", [("deep-ae", "full"), ("cct-digits", "lora+head")])
def test_adam_training_equals_pytorch(model: str, strategy: str) -> None:
    """10 Adam steps (the optimizer of base-model pretraining) equal torch.optim.Adam's: losses and parameters."""
    batch = BATCH[model]
    program = compile_model(model, STRATEGIES[model][strategy], batch=batch, lr=ADAM_LR, optimizer="adam")
    assert program.optimizer["kind"] == "adam"
    x, y = _data(model, batch)
    result = NumpyDevice(program).train(x, y, 10)
    ref_losses, ref_params = torch_reference(zoo.build(model), program, x, y, 10, optimizer="adam")
    np.testing.assert_allclose(result.losses, ref_losses, rtol=1e-4, atol=1e-6)
    # Adam divides each element's gradient by its own RMS, so an element whose gradient is at rounding level
    # takes a step whose size float32 rounding decides: every element within 1 % of the largest possible move
    # (lr per step), and all but 0.1 % within the tight tolerance of the SGD tests
    for name, ref in ref_params.items():
        scale = max(float(np.abs(ref).max()), 1e-3)
        np.testing.assert_allclose(result.params[name], ref, rtol=1e-4, atol=0.01 * ADAM_LR * 10, err_msg=name)
        tight = np.isclose(result.params[name], ref, rtol=1e-4, atol=1e-4 * scale)
        assert tight.mean() >= 0.999, (name, tight.mean())
    assert ref_losses[-1] < ref_losses[0]


def test_unfused_updates_run_after_the_backward_pass_and_train_the_same():
    """fused_update=False (accumulate-then-update): every SGD step after the last backward step, the arena holds
    the gradients until then, and training gives the same parameters as the fused schedule."""
    fused = compile_model("cct-digits", tuning="last-1", batch=2, lr=0.05)
    late = compile_model("cct-digits", tuning="last-1", batch=2, lr=0.05, fused_update=False)
    phases = [s.phase for s in late.train.steps]
    first_update = phases.index("update")
    assert set(phases[first_update:]) == {"update"} and "update" in phases
    assert [s.phase for s in fused.train.steps].index("update") < first_update
    assert late.train.arena_bytes > fused.train.arena_bytes
    d = late.report["dynamic_memory"]
    assert d["fused_update"] is False and fused.report["dynamic_memory"]["fused_update"] is True
    assert d["arena_plus_gradient_buffers_bytes"] == d["arena_bytes"] + d["gradient_buffers_bytes"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, *fused.tensors[fused.input].shape[1:])).astype(np.float32)
    y = rng.integers(0, 10, 4).astype(np.int64)
    a, b = NumpyDevice(fused).train(x, y, 2), NumpyDevice(late).train(x, y, 2)
    np.testing.assert_array_equal(a.losses, b.losses)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])


@pytest.mark.parametrize("strategy", ["full", "classifier"])
def test_fused_batch_norm_passes_train_and_evaluate_bit_for_bit_as_the_separate_ops(strategy):
    """The executor runs each folded BatchNorm (Mul → Add → Relu, intermediates read by nothing else) as one pass:
    every one of ds-cnn's, in both phases, and the losses, parameters and outputs equal the step-by-step run."""
    from device_runtime.numpy_executor import PhaseRunner, _skip
    program = compile_model("ds-cnn", tuning=strategy, batch=4, lr=0.05)
    norms = sum(s.name.endswith(".bn/Mul") for s in program.train.steps)
    fused, plain = NumpyDevice(program), NumpyDevice(program)
    plain.trainer = PhaseRunner(program, program.train, plain.params, plain.param_views, fuse=False)
    plain.evaluator = PhaseRunner(program, program.evaluate, plain.params, plain.param_views, fuse=False)
    assert norms == 9
    for runner in (fused.trainer, fused.evaluator):
        assert sum(call[0] is _skip for call in runner.calls) == 2 * norms  # the Add and the Relu of each
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, *program.tensors[program.input].shape[1:])).astype(np.float32)
    y = rng.integers(0, 12, 8).astype(np.int64)
    a, b = fused.train(x, y, 2), plain.train(x, y, 2)
    np.testing.assert_array_equal(a.losses, b.losses)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    np.testing.assert_array_equal(fused.evaluate(x, y).outputs, plain.evaluate(x, y).outputs)


def test_report_separates_gemm_and_optimizer_flops_and_cycles():
    from compiler.ops import get_op
    from compiler.targets import load_target, lower_to_target
    program = lower_to_target(compile_model("deep-ae", tuning="last-1", batch=2), load_target("siracusa"))
    flops, perf = program.report["flops"], program.report["perf"]
    gemm = [s for s in program.train.steps if get_op(s.op).kind in ("gemm", "conv")]
    assert flops["gemm_forward"] == sum(s.flops for s in gemm if s.phase == "forward") > 0
    assert flops["gemm_backward"] == sum(s.flops for s in gemm if s.phase == "backward") > 0
    assert flops["gemm_macs"] * 2 == flops["gemm_forward"] + flops["gemm_backward"]
    assert flops["optimizer"] == sum(s.flops for s in program.train.steps if s.op == "SGD") > 0
    assert perf["training_cycles"] + perf["optimizer_cycles"] == perf["cycles_per_step"]
    assert perf["optimizer_cycles"] == sum(s.cycles for s in program.train.steps if s.phase == "update") > 0
