"""Programs the codegen tests compile, their data, and the parity check against NumpyDevice."""
from __future__ import annotations

import io
import warnings
from functools import lru_cache

import numpy as np

from compiler import compile_model, zoo
from compiler.program import Program

K_STEPS = 3
PARITY_RTOL = 1e-4
AE_LORA = {"strategy": "lora", "targets": ["encoder.*", "decoder.*"]}  # deep-ae has no attn/mlp layers
# sparse update: a conv's first output channels, MatMul columns (strided SGD), a bias-only layer, a full head
CCT_SPARSE = {"strategy": "sparse", "sparse": [["tokenizer.conv0", "1/4"], ["blocks.0.mlp.fc1", "1/2"],
                                                 ["blocks.0.attn.q", "bias"], ["classifier", "all"]]}
DS_CNN_SPARSE = {"strategy": "sparse", "sparse": [["blocks.2.dw", "1/2"], ["blocks.3.pw", "1/4"],
                                                    ["classifier", "5"]]}


@lru_cache(maxsize=None)
def torch_mlp_onnx() -> bytes:
    """A small MLP exported by torch: 16 → 32 → 32 → 4 with ReLU and Tanh (layers mlp.0, mlp.2, classifier)."""
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh())
            self.classifier = nn.Linear(32, 4)

        def forward(self, x):
            return self.classifier(self.mlp(x))

    torch.manual_seed(0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(MLP().eval(), (torch.zeros(2, 16),), buffer, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False,
                          opset_version=17)
    return buffer.getvalue()


@lru_cache(maxsize=None)
def compiled(model: str, tuning, batch: int = 4, momentum: float = 0.0, weight_decay: float = 0.0) -> Program:
    import onnx
    tuning = dict(tuning) if isinstance(tuning, tuple) else tuning
    source = onnx.load_from_string(torch_mlp_onnx()) if model == "torch-mlp" else model
    if model not in zoo.names() and model != "torch-mlp":
        raise ValueError(model)
    return compile_model(source, tuning=tuning, batch=batch, lr=0.05, momentum=momentum, weight_decay=weight_decay)


def frozen_tuning(tuning):
    """A hashable form of a tuning spec (for the compile cache)."""
    return tuple(sorted((k, tuple(tuple(i) if isinstance(i, list) else i for i in v) if isinstance(v, list) else v)
                        for k, v in tuning.items())) \
        if isinstance(tuning, dict) else tuning


def data_for(program: Program, samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, *program.tensors[program.input].shape[1:])).astype(np.float32)
    if not program.label:
        return x, None
    label = program.tensors[program.label]
    if label.dtype == "int64":
        return x, rng.integers(0, program.tensors[program.output].shape[-1], samples).astype(np.int64)
    return x, rng.standard_normal((samples, *label.shape[1:])).astype(np.float32)


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|"""
    scale = float(np.max(np.abs(b))) or 1.0
    return float(np.max(np.abs(np.asarray(a, np.float64) - b))) / scale


def assert_same_training(got, want, rtol: float = PARITY_RTOL) -> None:
    assert rel_diff(got.losses, want.losses) <= rtol, (got.losses, want.losses)
    assert set(got.params) == set(want.params)
    for name in want.params:
        assert rel_diff(got.params[name], want.params[name]) <= rtol, name
