"""Memory plan: no two tensors live at the same step overlap, checked independently of the planner, over
random graphs and the zoo; and the arena executor (views at planned offsets) equals the plain interpreter."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import zoo
from compiler.autodiff import SGDConfig
from compiler.ir import Graph, Node, Role, TensorSpec
from compiler.ops import get_op
from compiler.pipeline import CompileOptions, compile_graph, compile_model
from compiler.program import Program
from compiler.reference import evaluate
from compiler.tuning import TuningSpec
from device_runtime.numpy_executor import NumpyDevice

WIDTHS = (4, 8, 12)


@st.composite
def random_graphs(draw) -> Graph:
    batch = draw(st.sampled_from([1, 3]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    width = draw(st.sampled_from(WIDTHS))
    tensors = {"x": TensorSpec("x", (batch, width), role=Role.INPUT)}
    values: dict[str, np.ndarray] = {}
    nodes: list[Node] = []
    live = ["x"]
    for i in range(draw(st.integers(2, 14))):
        kind = draw(st.sampled_from(["matmul", "relu", "add", "mul", "sigmoid", "reshape", "transpose2"]))
        src = live[-1]  # a chain with side inputs: every node reaches the loss
        shape = tensors[src].shape
        out = f"t{i}"
        if kind == "matmul":
            w = f"w{i}"
            new_width = draw(st.sampled_from(WIDTHS))
            values[w] = rng.normal(0, 0.5, (shape[1], new_width)).astype(np.float32)
            tensors[w] = TensorSpec(w, values[w].shape, role=Role.FROZEN)
            nodes.append(Node(f"n{i}", "MatMul", (src, w), (out,), {}, "forward", f"layer{i}"))
            tensors[out] = TensorSpec(out, (shape[0], new_width))
        elif kind in ("relu", "sigmoid"):
            nodes.append(Node(f"n{i}", kind.capitalize(), (src,), (out,), {}, "forward", f"layer{i}"))
            tensors[out] = TensorSpec(out, shape)
        elif kind in ("add", "mul"):
            same = [t for t in live if tensors[t].shape == shape]
            other = draw(st.sampled_from(same))
            nodes.append(Node(f"n{i}", kind.capitalize(), (src, other), (out,), {}, "forward", f"layer{i}"))
            tensors[out] = TensorSpec(out, shape)
        elif kind == "reshape":
            a = f"r{i}"
            nodes.append(Node(f"n{i}a", "Reshape", (src,), (a,), {"shape": (-1,)}, "forward", f"layer{i}"))
            tensors[a] = TensorSpec(a, (shape[0] * shape[1],))
            nodes.append(Node(f"n{i}", "Reshape", (a,), (out,), {"shape": shape}, "forward", f"layer{i}"))
            tensors[out] = TensorSpec(out, shape)
        else:
            a = f"tr{i}"
            nodes.append(Node(f"n{i}a", "Transpose", (src,), (a,), {"perm": (1, 0)}, "forward", f"layer{i}"))
            tensors[a] = TensorSpec(a, shape[::-1])
            nodes.append(Node(f"n{i}", "Transpose", (a,), (out,), {"perm": (1, 0)}, "forward", f"layer{i}"))
            tensors[out] = TensorSpec(out, shape)
        live.append(out)
    # a head so every parameter reaches the loss
    last = live[-1]
    head = "head.weight"
    values[head] = rng.normal(0, 0.5, (tensors[last].shape[1], 3)).astype(np.float32)
    tensors[head] = TensorSpec(head, values[head].shape, role=Role.FROZEN)
    tensors["logits"] = TensorSpec("logits", (batch, 3))
    nodes.append(Node("head", "MatMul", (last, head), ("logits",), {}, "forward", "head"))
    return Graph(tensors, tuple(nodes), ("x",), ("logits",), values)


def independent_overlap_check(program: Program, phase_name: str) -> None:
    """Recompute lifetimes from the steps; every pair of tensors live at one step must occupy disjoint bytes,
    unless a view or an in-place step links them and the earlier one is never read after that step."""
    phase = getattr(program, phase_name)
    first, last = {}, {}
    for name in phase.feeds:
        first[name] = 0
    for s, step in enumerate(phase.steps):
        for o in step.outputs:
            first.setdefault(o, s)
        for i in step.inputs:
            last[i] = max(last.get(i, 0), s)
    end = len(phase.steps) - 1
    for name in phase.results:
        last[name] = end
    linked: dict[str, set[str]] = {}
    for s, step in enumerate(phase.steps):
        op = get_op(step.op)
        if step.outputs and (op.view or op.inplace):
            a, b = step.inputs[0], step.outputs[0]
            if phase.arena_offsets.get(a) == phase.arena_offsets.get(b) and a in phase.arena_offsets:
                if op.inplace and not op.view:
                    assert last.get(a, 0) <= s, f"in-place step {step.name} overwrites {a}, which is read later"
                linked.setdefault(a, set()).add(b)
                linked.setdefault(b, set()).add(a)

    def connected(a: str, b: str) -> bool:
        seen, stack = {a}, [a]
        while stack:
            for n in linked.get(stack.pop(), ()):
                if n == b:
                    return True
                if n not in seen:
                    seen.add(n)
                    stack.append(n)
        return False

    names = [n for n in phase.arena_offsets if n in first or n in last]
    spans = {n: (phase.arena_offsets[n], phase.arena_offsets[n] + program.tensors[n].nbytes) for n in names}
    for i, a in enumerate(names):
        assert spans[a][1] <= phase.arena_bytes
        for b in names[i + 1:]:
            alive_together = first.get(a, 0) <= last.get(b, first.get(b, 0)) and \
                first.get(b, 0) <= last.get(a, first.get(a, 0))
            overlap = spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
            if alive_together and overlap:
                assert connected(a, b), f"{phase_name}: {a} {spans[a]} and {b} {spans[b]} overlap while both live"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=random_graphs(), momentum=st.sampled_from([0.0, 0.9]))
def test_random_graph_plans_are_sound_and_exact(graph: Graph, momentum: float) -> None:
    options = CompileOptions(TuningSpec("full"), graph.tensors["x"].shape[0], "cross_entropy",
                             SGDConfig(lr=0.05, momentum=momentum))
    program = compile_graph(graph, options)
    for phase in ("train", "evaluate"):
        independent_overlap_check(program, phase)
    assert program.train.arena_bytes >= program.train.lower_bound_bytes
    # the arena executor against the plain interpreter of the same steps
    rng = np.random.default_rng(1)
    batch = program.batch
    x = rng.normal(size=(batch, graph.tensors["x"].shape[1])).astype(np.float32)
    y = rng.integers(0, 3, batch)
    device = NumpyDevice(program)
    result = device.train(x, y, steps=2)
    env_values = {n: np.array(v) for n, v in program.values.items()}
    losses = []
    for _ in range(2):
        steps_graph = Graph({n: TensorSpec(n, t.shape, t.dtype, Role(t.role)) for n, t in program.tensors.items()},
                            tuple(Node(s.name, s.op, s.inputs, s.outputs, s.attrs, s.phase, s.layer)
                                  for s in program.train.steps),
                            program.train.feeds, program.train.results, env_values)
        env = evaluate(steps_graph, {"x": x, "labels": y})
        losses.append(float(env["loss"]))
        env_values = {n: env[n] for n in program.values}
    np.testing.assert_allclose(result.losses, losses, rtol=1e-5, atol=1e-6)
    for name, value in result.params.items():
        np.testing.assert_allclose(value, env_values[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", zoo.names())
@pytest.mark.parametrize("strategy", ["full", "selective", "lora", "lora+head"])
def test_zoo_plans_are_sound_and_tight(model: str, strategy: str) -> None:
    from tests.compiler.test_training_parity import STRATEGIES
    program = compile_model(model, STRATEGIES[model][strategy], batch=4)
    for phase in ("train", "evaluate"):
        independent_overlap_check(program, phase)
    memory = program.report["memory"]
    assert memory["arena_bytes"] <= 1.05 * memory["arena_lower_bound_bytes"], memory


# ---- models as users export them (torch.onnx.export), not only the zoo -----------------------------------------
def _vit():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int, heads: int):
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            attention = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))

    class ViT(nn.Module):
        def __init__(self, d: int = 32):
            super().__init__()
            self.patch = nn.Conv2d(3, d, 4, stride=4)
            self.pos = nn.Parameter(torch.randn(1, 16, d) * 0.02)
            self.blocks = nn.ModuleList(Block(d, 2) for _ in range(2))
            self.norm, self.classifier = nn.LayerNorm(d), nn.Linear(d, 10)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
            for block in self.blocks:
                x = block(x)
            return self.classifier(self.norm(x).mean(1))

    return ViT(), (3, 16, 16)


def _inverted_residual():
    import torch
    from torch import nn

    class InvertedResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.expand, self.project = nn.Conv2d(16, 64, 1), nn.Conv2d(64, 16, 1)
            self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
            self.classifier = nn.Linear(16, 10)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = x + self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))
            return self.classifier(x.mean((2, 3)))

    return InvertedResidual(), (3, 16, 16)


def _lora_conv_models():
    from tests.compiler.test_lora_conv import Kws1d, ResNetish
    return {"resnet": lambda: (ResNetish(), (3, 8, 8)), "kws-1d": lambda: (Kws1d(), (10, 16))}


EXPORTED = {"vit": _vit, "inverted-residual": _inverted_residual, **_lora_conv_models()}


@pytest.fixture(scope="module")
def exported_models(tmp_path_factory):
    import torch
    torch.manual_seed(0)
    paths = {}
    for name, build in EXPORTED.items():
        net, shape = build()
        paths[name] = tmp_path_factory.mktemp("plan") / f"{name}.onnx"
        torch.onnx.export(net.eval(), (torch.randn(2, *shape),), str(paths[name]), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    return paths


@pytest.mark.parametrize("model", sorted(EXPORTED))
def test_exported_model_plans_are_within_5_percent_of_the_lower_bound(exported_models, model: str) -> None:
    for strategy in ("full", "lora", "lora+head", "classifier"):
        for batch in (1, 8):
            memory = compile_model(exported_models[model], strategy, batch=batch).report["memory"]
            assert memory["arena_bytes"] <= 1.05 * memory["arena_lower_bound_bytes"], (strategy, batch, memory)


def _torch_model_cases():
    from tests.compiler.torch_models import SPECS
    cases = [(name, False) for name in SPECS]
    return cases + [(name, True) for name in SPECS if name.startswith("vit")]  # dynamo export too (slower)


@pytest.mark.parametrize("name,dynamo", _torch_model_cases())
def test_pytorch_test_model_plans_are_within_5_percent_of_the_lower_bound(name: str, dynamo: bool) -> None:
    """The models of tests/compiler/torch_models.py (MobileNetV2/V3, ViTs on TransformerEncoderLayer and on
    MultiheadAttention with a class token, KWS, autoencoder, residual MLP) under full, LoRA, LoRA + head and
    head-only training, at batch 1 and 8."""
    from tests.compiler.torch_models import SPECS, build, export
    spec = SPECS[name]
    model = export(build(name), spec.input_shape, dynamo=dynamo, opset=18 if dynamo else 17)
    strategies: list = ["full", "lora"]
    if spec.head:
        strategies += [{"strategy": "lora", "train": [f"{h}*" for h in spec.head]},
                       {"strategy": "selective", "train": [f"{h}*" for h in spec.head]}]
    for strategy in strategies:
        for batch in (1, 8):
            memory = compile_model(model, strategy, batch=batch).report["memory"]
            assert memory["arena_bytes"] <= 1.05 * memory["arena_lower_bound_bytes"], (strategy, batch, memory)
