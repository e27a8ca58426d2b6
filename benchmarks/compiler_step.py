"""One training step (forward + backward + SGD update) of the numpy executor against PyTorch eager.

Per case (zoo model × tuning strategy × batch) both sides start from the same weights (the zoo ONNX
initializers and the compiled program's LoRA factors) and run the same step: the same loss, LoRA rank/alpha,
trainable set, and ``torch.optim.SGD`` with the program's lr/momentum. Before timing, each case checks that
the PyTorch module's forward equals onnxruntime and the executor's ``evaluate`` output, and that three steps
give the same losses and the same trained parameters on both sides, so the comparison is apples to apples.

The PyTorch baselines are hand-written ``nn.Module``s (no ONNX interpretation): ``DeepAE`` (Linear +
BatchNorm1d in eval mode, frozen + ReLU), ``Cct`` (conv tokenizer, pre-norm blocks with q/k/v/proj
Linear layers and ``F.scaled_dot_product_attention``, GELU MLP, attention pooling, classifier; used for
both CCT configs) and ``DsCnn``. LoRA is ``LoraLinear``: the frozen Linear plus (x @ A @ B) · alpha / r, and on an
ungrouped conv ``LoraConv`` (PEFT's: A a conv with the layer's window down to r channels, B a 1×1 conv back up).
Strategies: ``lora`` (auto targets), ``lora+head`` (auto targets but the classifier, which trains fully),
``classifier`` (the head alone) and ``full``. Each row also carries the train arena and its lower bound.

Timing: the executor step is ``PhaseRunner.run`` (copy the feeds into the arena, run every kernel), the
torch step is zero_grad → forward → loss → backward → optimizer step. After warm-up the two alternate in
blocks, so drifting clock speed hits both alike; the figure is the median over the repeats. Both sides use
``--threads`` threads (default: the core count): ``torch.set_num_threads`` and numpy's BLAS pool (threadpoolctl).
Multi-threaded small GEMMs are very sensitive to other load on the machine (a BLAS or OpenMP worker that is
not scheduled stalls the call): the JSON records the load average before and after; trust a quiet run.
The executor's compiled kernels (numba) are compiled, or loaded from numba's on-disk cache, inside the first
calls: those are verification calls, never timed steps; each row's ``first_call_ms`` gives them (evaluate, first
train step, and torch's first step) and ``numba_kernels`` says how many kernels were compiled in the run.

    python benchmarks/compiler_step.py                 # cct-digits and deep-ae, batch 1/8/32, every strategy
    python benchmarks/compiler_step.py --all           # also cct-2-3x2 and ds-cnn
    python benchmarks/compiler_step.py --threads 1     # single-threaded torch and BLAS
    python benchmarks/compiler_step.py --all --threads 1 --clock cpu   # CPU time: for a machine others load
    python benchmarks/compiler_step.py --profile deep-ae:lora:32   # cProfile of executor steps, no JSON

``--user-models`` runs the same comparison on the PyTorch models of tests/compiler/torch_models.py (MobileNetV2
inverted residual, MobileNetV3 block, ViTs on nn.TransformerEncoderLayer and nn.MultiheadAttention, a 1-D conv KWS
net, an autoencoder, a residual MLP) as a user has them: exported with torch.onnx.export's default (dynamo)
exporter, compiled under the parity tests' tunings (``full``, ``selective`` by module path, ``lora`` on their
targets and ``lora+head``; rank 2, alpha 4, random init) plus ``lora-auto`` (compile_model's targets,
convolutions included), and timed against the same ``nn.Module`` with LoRA as weight parametrizations and
requires_grad exactly on the program's trainable tensors. A combination that does not compile or verify is a
row with ``error`` (its one-line reason) instead of timings.

    python benchmarks/compiler_step.py --user-models --threads 1 --clock cpu \
        --out benchmarks/results/compiler_step_user_models.json

ratio = torch_ms / executor_ms: above 1 the executor is faster.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import platform
import pstats
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler import zoo  # noqa: E402
from compiler.pipeline import compile_model  # noqa: E402
from compiler.program import Program  # noqa: E402
from compiler.zoo.cct import CCT_2_3X2, CCT_DIGITS, CctConfig  # noqa: E402
from compiler.zoo.deep_ae import BN_EPSILON as AE_BN_EPSILON  # noqa: E402
from compiler.zoo.deep_ae import DECODER_DIMS, ENCODER_DIMS  # noqa: E402
from compiler.zoo.ds_cnn import BN_EPSILON as KWS_BN_EPSILON  # noqa: E402
from compiler.zoo.ds_cnn import (CHANNELS, CONV0_KERNEL, CONV0_PADS, CONV0_STRIDES, INPUT_SHAPE,  # noqa: E402
                                  NUM_BLOCKS, NUM_CLASSES)
from device_runtime import NumpyDevice  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "compiler_step.json"
REQUIRED_MODELS = ("cct-digits", "deep-ae")
OPTIONAL_MODELS = ("cct-2-3x2", "ds-cnn")
BATCHES = (1, 8, 32)
STRATEGIES = ("lora", "lora+head", "classifier", "full")  # compile_model presets (LoRA on the auto targets)
HEADS = {"deep-ae": "decoder.4*"}  # a model without a ``classifier``: its output layer is the head
LR, MOMENTUM = 0.01, 0.0        # compile_model's defaults
SEED = 0
WARMUP_STEPS = 10
REPEATS = 100                   # timed steps per side and case (fewer if the time budget runs out)
BUDGET_S = 3.0                  # per side and case
BLOCK_STEPS = 5                 # steps per alternation block
VERIFY_STEPS = 3
RTOL, ATOL_SCALE = 1e-4, 1e-4   # float32 on both sides; atol relative to the largest reference value


# ---- PyTorch baselines -----------------------------------------------------------------------------------
class LoraLinear(nn.Module):
    """A frozen Linear plus the low-rank update (x @ A @ B) · alpha / r; A: (in, r), B: (r, out)."""

    def __init__(self, base: nn.Linear, a: np.ndarray, b: np.ndarray, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.tensor(a))
        self.lora_b = nn.Parameter(torch.tensor(b))
        self.scale = alpha / a.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a @ self.lora_b) * self.scale


class LoraConv(nn.Module):
    """A frozen Conv2d plus PEFT's conv LoRA: lora_b(lora_a(x)) · alpha / r, A (r, C, kh, kw) with the layer's
    window, B (M, r, 1, 1)."""

    def __init__(self, base: nn.Conv2d, a: np.ndarray, b: np.ndarray, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.tensor(a))
        self.lora_b = nn.Parameter(torch.tensor(b))
        self.scale = alpha / a.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        s = F.conv2d(x, self.lora_a, None, base.stride, base.padding, base.dilation)
        return base(x) + F.conv2d(s, self.lora_b) * self.scale


class DeepAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        self.named: dict[str, nn.Module] = {}  # ONNX layer name -> module
        for part, sizes in (("encoder", ENCODER_DIMS), ("decoder", DECODER_DIMS)):
            for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
                layer = f"{part}.{i}"
                self.named[layer] = nn.Linear(fan_in, fan_out)
                layers.append(self.named[layer])
                if not (part == "decoder" and i == len(sizes) - 2):  # the output layer is linear
                    self.named[f"{layer}.bn"] = nn.BatchNorm1d(fan_out, eps=AE_BN_EPSILON)
                    layers += [self.named[f"{layer}.bn"], nn.ReLU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (lin(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for lin in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)   # softmax(q·kᵀ / √(d/h)) · v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Cct(nn.Module):
    def __init__(self, config: CctConfig):
        super().__init__()
        d, c_in = config.embed_dim, config.in_channels
        tokenizer: list[nn.Module] = []
        for c_out in config.conv_channels:
            tokenizer += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.ReLU(),
                          nn.MaxPool2d(config.pool_kernel, config.pool_stride, config.pool_pad)]
            c_in = c_out
        self.tokenizer = nn.Sequential(*tokenizer)
        self.pos_embedding = nn.Parameter(torch.zeros(1, config.num_tokens, d))
        self.blocks = nn.ModuleList(Block(d, config.num_heads, config.mlp_hidden) for _ in range(config.num_blocks))
        self.norm = nn.LayerNorm(d)
        self.pool_attention = nn.Linear(d, 1)
        self.classifier = nn.Linear(d, config.num_classes)
        self.named: dict[str, nn.Module] = {f"tokenizer.conv{i}": m for i, m in enumerate(
            m for m in tokenizer if isinstance(m, nn.Conv2d))}
        for i, blk in enumerate(self.blocks):
            for name in ("norm1", "norm2"):
                self.named[f"blocks.{i}.{name}"] = getattr(blk, name)
            for name in ("q", "k", "v", "proj"):
                self.named[f"blocks.{i}.attn.{name}"] = getattr(blk, name)
            for name in ("fc1", "fc2"):
                self.named[f"blocks.{i}.mlp.{name}"] = getattr(blk, name)
        self.named.update({"norm": self.norm, "pool.attention": self.pool_attention, "classifier": self.classifier})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokenizer(x).flatten(2).transpose(1, 2) + self.pos_embedding  # (B, T, d)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        weights = torch.softmax(self.pool_attention(x).transpose(1, 2), dim=-1)    # (B, 1, T)
        return self.classifier((weights @ x).flatten(1))


class DsCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        c = CHANNELS
        top, left, bottom, right = CONV0_PADS
        convs = {"conv0": nn.Conv2d(INPUT_SHAPE[0], c, CONV0_KERNEL, CONV0_STRIDES)}
        for i in range(NUM_BLOCKS):
            convs[f"blocks.{i}.dw"] = nn.Conv2d(c, c, 3, padding=1, groups=c)
            convs[f"blocks.{i}.pw"] = nn.Conv2d(c, c, 1)
        layers: list[nn.Module] = [nn.ZeroPad2d((left, right, top, bottom))]
        self.named: dict[str, nn.Module] = {}
        for name, conv in convs.items():
            bn = nn.BatchNorm2d(c, eps=KWS_BN_EPSILON)
            layers += [conv, bn, nn.ReLU()]
            self.named[name], self.named[f"{name}.bn"] = conv, bn
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, NUM_CLASSES)
        self.named["classifier"] = self.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


@dataclass(frozen=True)
class TorchModel:
    build: Callable[[], nn.Module]
    linear_kind: str  # the ONNX node of every Linear: MatMul weights are (in, out), Gemm (transB=1) (out, in)
    label: str


TORCH_MODELS = {
    "deep-ae": TorchModel(DeepAE, "Gemm", "DeepAE"),
    "cct-digits": TorchModel(lambda: Cct(CCT_DIGITS), "MatMul", "Cct(CCT_DIGITS)"),
    "cct-2-3x2": TorchModel(lambda: Cct(CCT_2_3X2), "MatMul", "Cct(CCT_2_3X2)"),
    "ds-cnn": TorchModel(DsCnn, "Gemm", "DsCnn"),
}


@dataclass
class TorchSide:
    module: nn.Module
    params: dict[str, nn.Parameter]   # program parameter name -> trainable torch parameter
    layouts: dict[str, bool]          # program parameter name -> stored transposed in torch


def torch_baseline(name: str, model: onnx.ModelProto, program: Program) -> TorchSide:
    """The hand-written module with the zoo ONNX initializers, LoRA wrappers where the program has adapters,
    and requires_grad exactly on the program's trainable parameters."""
    spec = TORCH_MODELS[name]
    module = spec.build()
    module.eval()  # BatchNorm uses its running statistics, as the inference-form ONNX does
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    named: dict[str, nn.Module] = module.named
    by_name: dict[str, torch.Tensor] = {}
    transposed: dict[str, bool] = {}
    with torch.no_grad():
        for layer, m in named.items():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    getattr(m, attr).copy_(torch.tensor(inits[f"{layer}.{attr}"]))
                continue
            for attr in ("weight", "bias"):
                key = f"{layer}.{attr}"
                if key not in inits:
                    continue
                value = inits[key]
                flip = isinstance(m, nn.Linear) and attr == "weight" and spec.linear_kind == "MatMul"
                getattr(m, attr).copy_(torch.tensor(value.T if flip else value))
                by_name[key], transposed[key] = getattr(m, attr), flip
        if isinstance(module, Cct):
            module.pos_embedding.copy_(torch.tensor(inits["pos_embedding.weight"]))
            by_name["pos_embedding.weight"], transposed["pos_embedding.weight"] = module.pos_embedding, False
    module.requires_grad_(False)
    alpha = float(program.tuning.get("alpha", 8.0))
    for layer in sorted({n.rsplit(".lora_", 1)[0] for n in program.values if n.endswith(".lora_a")}):
        wrapper = LoraConv if isinstance(named[layer], nn.Conv2d) else LoraLinear
        lora = wrapper(named[layer], program.values[f"{layer}.lora_a"], program.values[f"{layer}.lora_b"], alpha)
        _replace_module(module, named[layer], lora)
        named[layer] = lora
        for part in ("lora_a", "lora_b"):
            by_name[f"{layer}.{part}"], transposed[f"{layer}.{part}"] = getattr(lora, part), False
    trainable = set(program.trainable)
    missing = trainable - set(by_name)
    if missing:
        raise AssertionError(f"{name}: no torch parameter for {sorted(missing)}")
    for key in trainable:
        by_name[key].requires_grad_(True)
    params = {k: by_name[k] for k in program.trainable}
    return TorchSide(module, params, {k: transposed[k] for k in params})


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for child_name, child in parent.named_children():
            if child is old:
                setattr(parent, child_name, new)
                return
    raise AssertionError("module to wrap not found")


# ---- one case --------------------------------------------------------------------------------------------
@dataclass
class Case:
    model: str
    strategy: str
    batch: int
    program: Program
    device: NumpyDevice
    torch_side: TorchSide
    feeds: dict[str, np.ndarray]
    step_torch: Callable[[], torch.Tensor]
    first_step_s: dict[str, float] = field(default_factory=dict)  # per side: the first step (JIT compile or load)

    def step_executor(self) -> None:
        self.device.trainer.run(self.feeds)

    def executor_loss(self) -> float:
        return float(self.device.trainer.results[self.program.loss])


def tuning_for(model: str, strategy: str) -> str | dict:
    """The preset, with the head renamed for a model whose output layer is not called ``classifier``."""
    head = HEADS.get(model)
    if head is None or strategy not in ("lora+head", "classifier"):
        return strategy
    if strategy == "classifier":
        return {"strategy": "selective", "train": [head]}
    return {"strategy": "lora", "train": [head]}


def batch_and_loss(program: Any, input_shape: tuple[int, ...], task: str, classes: int, batch: int):
    """One seeded batch (numpy, torch, the program's feeds) and the PyTorch loss the program's task uses."""
    rng = np.random.default_rng(batch)
    x = rng.normal(size=(batch, *input_shape)).astype(np.float32)
    feeds = {program.input: x}
    xt = torch.from_numpy(x)
    if task == "classification":
        y = rng.integers(0, classes, batch)
        feeds[program.label] = y
        yt = torch.from_numpy(y)
        return x, xt, feeds, lambda out: F.cross_entropy(out, yt)
    return x, xt, feeds, lambda out: F.mse_loss(out, xt)


def build_case(model: str, strategy: str, batch: int) -> Case:
    entry = zoo.ZOO[model]
    onnx_model = zoo.build(model, SEED)
    program = compile_model(onnx_model, tuning_for(model, strategy), batch=batch, lr=LR, momentum=MOMENTUM)
    x, xt, feeds, loss_fn = batch_and_loss(program, entry.input_shape, entry.task, entry.num_classes, batch)
    case = sgd_case(model, strategy, batch, program, torch_baseline(model, onnx_model, program), feeds, xt,
                    loss_fn)
    verify(case, onnx_model)
    return case


def sgd_case(model: str, strategy: str, batch: int, program: Any, side: Any, feeds: dict, xt: torch.Tensor,
             loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> Case:
    """A Case whose PyTorch step is ``side``'s module trained by SGD with the program's lr and momentum."""
    opt = torch.optim.SGD(list(side.params.values()), lr=program.optimizer["lr"],
                          momentum=program.optimizer["momentum"])

    def step_torch() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(side.module(xt))
        loss.backward()
        opt.step()
        return loss

    return Case(model, strategy, batch, program, NumpyDevice(program), side, feeds, step_torch)


def verify(case: Case, onnx_model: onnx.ModelProto | None) -> None:
    """Forward equal to onnxruntime (unless ``onnx_model`` is None: the caller checked the module without its
    adapters) and to the executor; VERIFY_STEPS steps with equal losses and parameters."""
    x = case.feeds[case.program.input]
    with torch.no_grad():
        out = case.torch_side.module(torch.from_numpy(x)).numpy()
    start = time.perf_counter()
    executor_out = case.device.evaluate(x, case.feeds.get(case.program.label)).outputs
    case.first_step_s["executor_evaluate"] = time.perf_counter() - start
    references = [("executor evaluate", executor_out)]
    if onnx_model is not None:
        references.append(("onnxruntime", _onnxruntime(onnx_model, x)))
    for what, ref in references:
        np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL_SCALE * float(np.abs(ref).max()),
                                   err_msg=f"{case.model}/{case.strategy}/{case.batch}: torch forward vs {what}")
    executor_losses, torch_losses = [], []
    for i in range(VERIFY_STEPS):
        start = time.perf_counter()
        case.step_executor()
        if i == 0:
            case.first_step_s["executor"] = time.perf_counter() - start
        executor_losses.append(case.executor_loss())
        start = time.perf_counter()
        torch_losses.append(case.step_torch().item())
        if i == 0:
            case.first_step_s["torch"] = time.perf_counter() - start
    np.testing.assert_allclose(executor_losses, torch_losses, rtol=RTOL,
                               err_msg=f"{case.model}/{case.strategy}/{case.batch}: losses")
    trained = case.device.get_params()
    for name, param in case.torch_side.params.items():
        ref = param.detach().numpy()
        ref = ref.T if case.torch_side.layouts[name] else ref
        ref = ref.reshape(trained[name].shape)  # a PRelu slope as the exporter broadcasts it (same size)
        atol = ATOL_SCALE * max(float(np.abs(ref).max()), 1e-3)
        np.testing.assert_allclose(trained[name], ref, rtol=RTOL, atol=atol,
                                   err_msg=f"{case.model}/{case.strategy}/{case.batch}: {name}")


def _onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@dataclass(frozen=True)
class Timing:
    executor_s: list[float]
    torch_s: list[float]


def time_case(case: Case, repeats: int, budget_s: float, clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Per-step times of both sides after warm-up, the sides alternating in blocks. ``clock``: wall time, or this
    process's CPU time (``time.process_time``), which on a loaded machine leaves out the time spent waiting for a
    core; only meaningful with one thread per side."""
    for _ in range(WARMUP_STEPS):
        case.step_executor()
        case.step_torch()
    executor_s: list[float] = []
    torch_s: list[float] = []
    deadline = time.perf_counter() + 2 * budget_s
    while len(executor_s) < repeats and time.perf_counter() < deadline:
        for fn, times in ((case.step_executor, executor_s), (case.step_torch, torch_s)):
            for _ in range(BLOCK_STEPS):
                start = clock()
                fn()
                times.append(clock() - start)
    return Timing(executor_s, torch_s)


def numba_cache_stats() -> dict:
    """How the executor's compiled kernels (compiler/ops/_jit.py) were obtained in this process: compiled here
    (inside the first calls, which ``first_call_ms`` then includes) or loaded from numba's on-disk cache."""
    import numba

    import compiler.ops._jit as jit_module
    hits = misses = 0
    for value in vars(jit_module).values():
        if isinstance(value, numba.core.registry.CPUDispatcher):
            hits += sum(value.stats.cache_hits.values())
            misses += sum(value.stats.cache_misses.values())
    return {"compiled_in_this_run": misses, "loaded_from_cache": hits}


def machine() -> dict:
    info = {"cpu_count": os.cpu_count(), "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()],
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "processor": _cpu_model()}
    try:
        from threadpoolctl import threadpool_info
        info["numpy_blas"] = [{k: p.get(k) for k in ("internal_api", "num_threads", "version", "architecture")}
                              for p in threadpool_info() if p.get("user_api") == "blas"]
    except ImportError:
        info["numpy_blas"] = "threadpoolctl not installed"
    return info


def _limit_blas_threads(threads: int) -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("threadpoolctl is not installed: numpy keeps its BLAS thread count", file=sys.stderr)
        return
    threadpool_limits(threads, user_api="blas")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def profile(spec: str, steps: int, top: int) -> None:
    model, strategy, batch = spec.split(":")
    case = build_case(model, strategy, int(batch))
    for _ in range(WARMUP_STEPS):
        case.step_executor()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        case.step_executor()
    profiler.disable()
    stats = pstats.Stats(profiler).strip_dirs()
    print(f"executor, {spec}, {steps} steps")
    stats.sort_stats("tottime").print_stats(top)


def run_case(model: str, strategy: str, batch: int, repeats: int, budget_s: float,
             clock: Callable[[], float] = time.perf_counter) -> dict:
    case = build_case(model, strategy, batch)
    return case_row(case, time_case(case, repeats, budget_s, clock),
                    f"hand-written nn.Module {TORCH_MODELS[model].label}, float32 eager",
                    f"forward == onnxruntime and executor evaluate; {VERIFY_STEPS} steps: losses and "
                    f"parameters equal (rtol {RTOL})")


def case_row(case: Case, timing: Timing, torch_baseline: str, verified: str) -> dict:
    executor_ms, torch_ms = (1e3 * statistics.median(t) for t in (timing.executor_s, timing.torch_s))
    program = case.program
    return {"model": case.model, "strategy": case.strategy, "batch": case.batch,
            "executor_ms": round(executor_ms, 4), "torch_ms": round(torch_ms, 4),
            "ratio": round(torch_ms / executor_ms, 3), "steps_timed": len(timing.executor_s),
            "executor_min_ms": round(1e3 * min(timing.executor_s), 4),
            "first_call_ms": {k: round(1e3 * v, 2) for k, v in case.first_step_s.items()},
            "torch_min_ms": round(1e3 * min(timing.torch_s), 4),
            "trainable_params": int(sum(program.values[n].size for n in program.trainable)),
            "tuning": dict(program.tuning),
            "arena_bytes": program.report["memory"]["arena_bytes"],
            "arena_lower_bound_bytes": program.report["memory"]["arena_lower_bound_bytes"],
            "arena_over_lower_bound": program.report["memory"]["arena_over_lower_bound"],
            "torch_baseline": torch_baseline, "verified": verified}


# ---- user-style PyTorch models (tests/compiler/torch_models.py) -----------------------------------------
USER_STRATEGIES = ("full", "selective", "lora", "lora+head", "lora-auto")
USER_RANK, USER_ALPHA = 2, 4.0    # the parity tests' (tests/compiler/test_pytorch_models.py)
USER_OPSET = 18                   # default exporter (torch.onnx.export, dynamo=True) at the parity tests' opset


def user_tuning(name: str, strategy: str) -> dict | None:
    """The parity tests' tunings, plus ``lora-auto`` (compile_model's LoRA targets, convolutions included);
    ``lora+head`` on a CNN, whose head is its only linear layer and a parity-test LoRA target, is LoRA on the
    automatic targets with the head trained fully; None where the strategy means nothing (no head)."""
    from tests.compiler.torch_models import SPECS
    spec = SPECS[name]
    if strategy == "full":
        return {"strategy": "full"}
    if strategy == "selective":
        return {"strategy": "selective", "train": list(spec.selective)}
    lora = {"strategy": "lora", "rank": USER_RANK, "alpha": USER_ALPHA, "init": "random"}
    if strategy == "lora-auto":
        return lora
    lora["targets"] = list(spec.lora)
    if strategy == "lora":
        return lora
    if not spec.head:
        return None
    if set(spec.head) & set(spec.lora):  # a CNN's only linear layer is its head: LoRA on the automatic targets
        del lora["targets"]
    return dict(lora, train=list(spec.head))


@functools.cache
def _user_export(name: str) -> onnx.ModelProto:
    from tests.compiler.torch_models import SPECS, build, export
    return export(build(name), SPECS[name].input_shape, dynamo=True, opset=USER_OPSET)


def _user_torch_side(name: str, program: Program) -> TorchSide:
    """The same nn.Module (tests.compiler.torch_models.build), LoRA parametrizations where the program has
    adapters, and requires_grad exactly on the program's trainable tensors (named by module path)."""
    from tests.compiler.torch_models import LoraConvWeight, add_lora, build
    net = build(name)
    net.requires_grad_(False)
    by_name = dict(net.named_parameters())
    alpha = float(program.tuning.get("alpha", USER_ALPHA))
    for layer in sorted({n.rsplit(".lora_", 1)[0] for n in program.values if n.endswith(".lora_a")}):
        a, b = program.values[f"{layer}.lora_a"], program.values[f"{layer}.lora_b"]
        module = net.get_submodule(layer)
        if isinstance(module, nn.Linear):
            lora = add_lora(net, layer, a, b, alpha / a.shape[1])
        else:
            lora = LoraConvWeight(a, b, alpha / a.shape[0])
            parametrize.register_parametrization(module, "weight", lora)
        by_name[f"{layer}.lora_a"], by_name[f"{layer}.lora_b"] = lora.a, lora.b
    missing = set(program.trainable) - set(by_name)
    if missing:
        raise AssertionError(f"{name}: no torch parameter for {sorted(missing)}")
    params = {k: by_name[k].requires_grad_(True) for k in program.trainable}
    layouts = {k: p.ndim == 2 and tuple(p.shape) != program.values[k].shape for k, p in params.items()}
    return TorchSide(net, params, layouts)


def build_user_case(name: str, strategy: str, batch: int, tuning: dict) -> Case:
    from tests.compiler.torch_models import SPECS, build
    spec = SPECS[name]
    onnx_model = _user_export(name)
    program = compile_model(onnx_model, tuning, batch=batch, lr=LR, momentum=MOMENTUM)
    x, xt, feeds, loss_fn = batch_and_loss(program, spec.input_shape, spec.task, spec.classes, batch)
    with torch.no_grad():  # the module as exported (no adapters: random-init LoRA changes the forward)
        np.testing.assert_allclose(build(name)(xt).numpy(), ref := _onnxruntime(onnx_model, x), rtol=RTOL,
                                   atol=ATOL_SCALE * float(np.abs(ref).max()), err_msg=f"{name}: torch vs onnxruntime")
    case = sgd_case(name, strategy, batch, program, _user_torch_side(name, program), feeds, xt, loss_fn)
    verify(case, None)
    return case


def run_user_case(name: str, strategy: str, batch: int, repeats: int, budget_s: float,
                  clock: Callable[[], float] = time.perf_counter) -> dict:
    """One row; a combination that does not compile or verify is a row with the one-line reason in ``error``."""
    row = {"model": name, "strategy": strategy, "batch": batch}
    tuning = user_tuning(name, strategy)
    if tuning is None:
        return dict(row, error="not meaningful: the model has no head")
    try:
        case = build_user_case(name, strategy, batch, tuning)
    except Exception as exc:  # noqa: BLE001 - the reason goes into the row, the run goes on
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return dict(row, tuning=tuning, error=f"{type(exc).__name__}: {'; '.join(lines[:2])}")
    return case_row(case, time_case(case, repeats, budget_s, clock),
                    f"the same nn.Module (tests.compiler.torch_models.build({name!r})), float32 eager",
                    f"exported with torch.onnx.export (dynamo, opset {USER_OPSET}); forward == onnxruntime and "
                    f"executor evaluate; {VERIFY_STEPS} steps: losses and parameters equal (rtol {RTOL})")


def user_model_names() -> list[str]:
    from tests.compiler.torch_models import SPECS
    return list(SPECS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--all", action="store_true", help=f"also {', '.join(OPTIONAL_MODELS)}")
    parser.add_argument("--user-models", action="store_true",
                        help="the PyTorch models of tests/compiler/torch_models.py instead of the zoo's")
    parser.add_argument("--models", nargs="+", help="only these models (zoo names, or with --user-models theirs)")
    parser.add_argument("--strategies", nargs="+", choices=sorted(set(STRATEGIES + USER_STRATEGIES)),
                        help=f"default: {', '.join(STRATEGIES)}; with --user-models {', '.join(USER_STRATEGIES)}")
    parser.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or process CPU time (with --threads 1, on a machine other jobs load)")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="time limit per side and case")
    parser.add_argument("--profile", metavar="MODEL:STRATEGY:BATCH", help="cProfile executor steps instead")
    parser.add_argument("--profile-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads and numpy BLAS threads (default: the machine's core count)")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread's work: use it with --threads 1")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    _limit_blas_threads(args.threads)
    if args.profile:
        profile(args.profile, args.profile_steps, top=25)
        return 0
    if args.user_models:
        known, strategies, run = user_model_names(), args.strategies or USER_STRATEGIES, run_user_case
    else:
        known, strategies, run = REQUIRED_MODELS + OPTIONAL_MODELS, args.strategies or STRATEGIES, run_case
        if set(strategies) - set(STRATEGIES):
            parser.error(f"zoo models take the strategies {', '.join(STRATEGIES)}")
    models = args.models or (known if args.user_models else REQUIRED_MODELS + (OPTIONAL_MODELS if args.all else ()))
    if set(models) - set(known):
        parser.error(f"unknown models {sorted(set(models) - set(known))}; known: {', '.join(known)}")
    machine_before = machine()
    print(f"{'model':<13} {'strategy':<10} {'batch':>5} {'executor_ms':>12} {'torch_ms':>9} {'ratio':>6} "
          f"{'arena/lb':>8}")
    rows = []
    for model in models:
        for strategy in strategies:
            for batch in args.batches:
                rows.append(run(model, strategy, batch, args.repeats, args.budget_s, clock))
                row = rows[-1]
                if "error" in row:
                    print(f"{model:<13} {strategy:<10} {batch:>5} {row['error']}", flush=True)
                    continue
                print(f"{model:<13} {strategy:<10} {batch:>5} {row['executor_ms']:>12.3f} {row['torch_ms']:>9.3f} "
                      f"{row['ratio']:>6.2f} {row['arena_over_lower_bound']:>8.3f}", flush=True)
    result = {"benchmark": "one training step (forward + backward + SGD), numpy executor vs PyTorch eager"
                           + (" (tests/compiler/torch_models.py)" if args.user_models else " (zoo models)"),
              "machine": machine_before,
              "load_average_after": [round(v, 2) for v in os.getloadavg()],
              "numba_kernels": numba_cache_stats(),
              "settings": {"lr": LR, "momentum": MOMENTUM, "warmup_steps": WARMUP_STEPS, "repeats": args.repeats,
                           "budget_s_per_side": args.budget_s, "threads": args.threads,
                           "statistic": f"median per-step {'process CPU' if args.clock == 'cpu' else 'wall'} time",
                           "executor_step": "PhaseRunner.run (feeds copied into the arena + every kernel)",
                           "torch_step": "zero_grad, forward, loss, backward, SGD step"},
              "cases": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
