"""Tuning strategies: which parameters train, and LoRA adapters inserted as ordinary graph nodes.

``full``: every weight trains. ``selective``: layer/parameter glob patterns, the last k blocks, the classifier,
or biases only. ``lora``: for each targeted MatMul/Gemm layer, y = W·x + (α/r)·B(A·x) with new parameters A, B;
W stays frozen and is never copied. ``train`` patterns can be combined with LoRA (e.g. LoRA + trained head).
``sparse``: per layer (glob → choice), the bias only, or the bias and the weight's first k output channels
(``"1/8"``, ``"1/4"``, ``"1/2"``, ``"all"`` or an integer k), as the Tiny Training Engine's sparse update; the
rest of the weight stays frozen and autodiff computes the gradient of the chosen channels only.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Mapping

import numpy as np

from compiler.ir import CompileError, Graph, NameGen, Node, Role, TensorSpec

STRATEGIES = ("full", "selective", "lora", "sparse")
SPARSE_RATIOS = {"1/8": 0.125, "1/4": 0.25, "1/2": 0.5, "all": 1.0}
LORA_INITS = ("zero_b", "gaussian", "random")
BIAS_SUFFIXES = (".bias",)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 4
    alpha: float | None = None            # None: the rank, so the update (alpha / rank)·B·A is unscaled
    targets: tuple[str, ...] = ("auto",)  # "auto": attention and MLP layers if the model has them, else
                                          # every MatMul/Gemm layer that is not trained fully
    init: str = "zero_b"  # zero_b: A kaiming-uniform, B = 0 (the usual); gaussian: A ~ N(0, 1/r), B = 0;
    seed: int = 0         # random: A and B both small and random (tests: every gradient is non-zero)
    freeze_a: bool = False  # FFA-LoRA: A is a frozen (but replaceable) parameter, only B trains

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise CompileError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        if not self.alpha > 0:
            raise CompileError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if self.init not in LORA_INITS:
            raise CompileError(f"LoRA init must be one of {', '.join(LORA_INITS)}, got {self.init!r}")
        if not self.targets:
            raise CompileError("LoRA needs at least one target pattern")


@dataclass(frozen=True)
class TuningSpec:
    strategy: str = "lora"
    train: tuple[str, ...] = ()      # parameters or layers trained fully (glob patterns)
    last_k: int | None = None        # selective: the last k blocks (or parametrized layers)
    bias_only: bool = False          # selective: every bias
    lora: LoraConfig | None = None
    # sparse: (layer glob, choice) in order, a later pattern overriding an earlier one for the layers both match;
    # choice "bias", "1/8", "1/4", "1/2", "all" or a channel count "k" (string of digits)
    sparse: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparse", tuple((str(p), sparse_choice(c)) for p, c in self.sparse))
        if (self.strategy == "sparse") != bool(self.sparse):
            raise CompileError("sparse tuning needs per-layer choices (sparse = {layer = choice}), and only it takes them"
                               if self.strategy == "sparse" else
                               f"sparse layer choices given with strategy {self.strategy!r}")
        if self.strategy not in STRATEGIES:
            raise CompileError(f"unknown tuning strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.strategy == "lora" and self.lora is None:
            object.__setattr__(self, "lora", LoraConfig())
        if self.strategy != "lora" and self.lora is not None:
            raise CompileError(f"LoRA options given with strategy {self.strategy!r}")
        if self.strategy == "selective" and not (self.train or self.last_k or self.bias_only):
            raise CompileError("selective tuning needs train patterns, last_k or bias_only")
        if self.last_k is not None and self.last_k < 1:
            raise CompileError(f"last_k must be >= 1, got {self.last_k}")

    @classmethod
    def parse(cls, spec: "str | Mapping[str, Any] | TuningSpec") -> "TuningSpec":
        """From a preset name ('full', 'lora', 'lora+head', 'classifier', 'bias', 'last-2') or a dict
        (the TOML ``[tuning]`` table: strategy, train, last_k, bias_only, rank, alpha, targets, init, seed, sparse —
        a table of layer glob → "bias" | "1/8" | "1/4" | "1/2" | "all" | channel count)."""
        if isinstance(spec, TuningSpec):
            return spec
        if isinstance(spec, str):
            return _preset(spec)
        data = dict(spec)
        known = {"strategy", "train", "last_k", "bias_only", "rank", "alpha", "targets", "init", "seed", "freeze_a",
                 "sparse"}
        unknown = set(data) - known
        if unknown:
            raise CompileError(f"unknown tuning key(s) {sorted(unknown)}; known: {sorted(known)}")
        lora_keys = {k: data.pop(k) for k in ("rank", "alpha", "targets", "init", "seed", "freeze_a") if k in data}
        strategy = data.pop("strategy", "lora")
        if "targets" in lora_keys:
            lora_keys["targets"] = tuple(lora_keys["targets"])
        lora = LoraConfig(**lora_keys) if strategy == "lora" else None
        if lora_keys and strategy != "lora":
            raise CompileError(f"LoRA option(s) {sorted(lora_keys)} given with strategy {strategy!r}")
        sparse = data.get("sparse", {})
        pairs = sparse.items() if isinstance(sparse, Mapping) else sparse
        if isinstance(pairs, str) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise CompileError(f"tuning.sparse must be a table of layer = choice (or [layer, choice] pairs), "
                               f"got {sparse!r}")
        return cls(strategy=strategy, train=tuple(data.get("train", ())), last_k=data.get("last_k"),
                   bias_only=bool(data.get("bias_only", False)), lora=lora,
                   sparse=tuple((str(k), str(v)) for k, v in pairs))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strategy": self.strategy, "train": list(self.train)}
        if self.last_k is not None:
            out["last_k"] = self.last_k
        if self.bias_only:
            out["bias_only"] = True
        if self.lora is not None:
            out.update(rank=self.lora.rank, alpha=self.lora.alpha, targets=list(self.lora.targets),
                       init=self.lora.init, seed=self.lora.seed)
            if self.lora.freeze_a:
                out["freeze_a"] = True
        if self.sparse:
            out["sparse"] = dict(self.sparse)
        return out


def sparse_choice(choice: Any) -> str:
    """A layer's sparse-update choice, normalised: "bias", a ratio ("1/8" … "all") or a channel count."""
    text = str(choice).strip()
    if text == "bias" or text in SPARSE_RATIOS or (text.isdigit() and int(text) > 0):
        return str(int(text)) if text.isdigit() else text
    raise CompileError(f"sparse choice {choice!r}: use bias, 1/8, 1/4, 1/2, all or a channel count >= 1")


def _preset(name: str) -> TuningSpec:
    if name == "sparse":
        raise CompileError("sparse tuning needs per-layer choices: --sparse LAYER=CHOICE (bias, 1/8, 1/4, 1/2, "
                           "all or k), or --memory-budget to choose them")
    if name == "full":
        return TuningSpec("full")
    if name == "lora":
        return TuningSpec("lora")
    if name == "lora+head":
        return TuningSpec("lora", train=("classifier*",))
    if name in ("classifier", "head"):
        return TuningSpec("selective", train=("classifier*",))
    if name in ("bias", "bias-only"):
        return TuningSpec("selective", bias_only=True)
    match = re.fullmatch(r"last-(\d+)", name)
    if match:
        return TuningSpec("selective", last_k=int(match.group(1)))
    if name == "selective":
        raise CompileError("selective tuning needs patterns: use --train PATTERN, --last-k K or --bias-only")
    raise CompileError(f"unknown tuning strategy {name!r}; choose from full, selective, lora, lora+head, "
                       "classifier, bias, last-K")


# ---- passes ------------------------------------------------------------------------------------------------
def weight_layer(name: str) -> str:
    for suffix in (".weight", ".bias", ".bn_scale", ".bn_shift"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _weights(graph: Graph) -> list[str]:
    """Float initializers that are model parameters, in the order the graph first uses them. Folded
    inference-form BatchNormalization constants are frozen by design and never listed."""
    seen: list[str] = []
    for node in graph.nodes:
        for name in node.inputs:
            spec = graph.tensors.get(name)
            if spec is not None and spec.role == Role.FROZEN and name not in seen and not _is_folded_bn(name):
                seen.append(name)
    return seen


def _is_folded_bn(name: str) -> bool:
    return ".bn_scale" in name or ".bn_shift" in name


def select_trainable(graph: Graph, spec: TuningSpec) -> Graph:
    """Mark the parameters that train fully (Role.TRAINABLE); everything else stays frozen. A pattern that
    selects part of a layer (its bias without its weight) is a warning naming both (``notes["warnings"]``)."""
    weights = _weights(graph)
    chosen: set[str] = set()
    warnings: list[str] = []
    if spec.strategy == "full":
        chosen = set(weights)
    for pattern in spec.train:
        hits = {w for w in weights if fnmatchcase(w, pattern) or fnmatchcase(weight_layer(w), pattern)}
        if not hits:
            raise CompileError(f"train pattern {pattern!r} matches no parameter; parameters: "
                               f"{_listing(weights)}")
        warnings += _partial_layers(pattern, hits, weights)
        chosen |= hits
    if spec.bias_only:
        hits = {w for w in weights if w.endswith(BIAS_SUFFIXES)}
        if not hits:
            raise CompileError("bias_only: the model has no bias parameters")
        chosen |= hits
    if spec.last_k:
        chosen |= _last_k(graph, weights, spec.last_k)
    tensors = dict(graph.tensors)
    for name in chosen:
        tensors[name] = tensors[name].with_role(Role.TRAINABLE)
    for name, channels in sparse_parameters(graph, weights, spec.sparse).items():
        if name not in chosen:  # a parameter trained fully by a train pattern stays fully trained
            tensors[name] = dataclasses.replace(tensors[name], role=Role.TRAINABLE, train_channels=channels)
    return graph.replace(tensors=tensors, notes=_noted(graph, warnings=warnings))


def _noted(graph: Graph, **lists: list[str]) -> dict[str, Any]:
    notes = dict(graph.notes)
    for key, values in lists.items():
        notes[key] = list(notes.get(key, [])) + list(values)
    return notes


def _partial_layers(pattern: str, hits: set[str], weights: list[str]) -> list[str]:
    """Warnings for layers of which ``pattern`` selects some parameters but not all."""
    out = []
    for layer in sorted({weight_layer(w) for w in hits}):
        params = [w for w in weights if weight_layer(w) == layer and not _is_folded_bn(w)]
        left = [w for w in params if w not in hits]
        if left:
            out.append(f"train pattern {pattern!r} selects {', '.join(sorted(w for w in params if w in hits))} "
                       f"but not {', '.join(left)} of layer {layer!r}")
    return out


def sparse_layers(graph: Graph) -> dict[str, tuple[str | None, str | None]]:
    """Layers a sparse scheme can name, in graph order: layer → (weight, bias) parameter names (None if absent).
    A layer has a weight read by Conv, Gemm or MatMul."""
    weights = _weights(graph)
    found: dict[str, tuple[str | None, str | None]] = {}
    for name in weights:
        layer = weight_layer(name)
        if name.endswith(".weight") and _channel_axis(graph, name) is not None:
            bias = f"{layer}.bias" if f"{layer}.bias" in weights else None
            found[layer] = (name, bias)
    return found


def _channel_axis(graph: Graph, weight: str) -> int | None:
    """The output-channel axis of a weight from the op that reads it (None: not a Conv/Gemm/MatMul weight)."""
    axes = set()
    for node in graph.nodes:
        if len(node.inputs) < 2 or node.inputs[1] != weight:
            continue
        if node.op in ("Conv", "QConv", "QLinear"):
            axes.add(0)
        elif node.op == "Gemm" and not node.attrs.get("transA", 0):
            axes.add(0 if node.attrs.get("transB", 0) else 1)
        elif node.op == "MatMul" and len(graph.tensors[weight].shape) == 2:
            axes.add(1)
        else:
            return None
    return axes.pop() if len(axes) == 1 else None


def sparse_parameters(graph: Graph, weights: list[str],
                      scheme: tuple[tuple[str, str], ...]) -> dict[str, tuple[int, int] | None]:
    """The parameters a sparse scheme trains: name → (axis, k) for a weight restricted to its first k output
    channels, None for a tensor trained whole (biases; weights with "all")."""
    if not scheme:
        return {}
    layers = sparse_layers(graph)
    choice: dict[str, str] = {}
    for pattern, value in scheme:
        hits = [layer for layer in layers if fnmatchcase(layer, pattern)]
        if not hits:
            raise CompileError(f"sparse layer pattern {pattern!r} matches no Conv/Gemm/MatMul layer; layers: "
                               f"{_listing(list(layers))}")
        choice.update({layer: value for layer in hits})
    out: dict[str, tuple[int, int] | None] = {}
    for layer, value in choice.items():
        weight, bias = layers[layer]
        if bias is not None:
            out[bias] = None
        if value == "bias":
            if bias is None:
                raise CompileError(f"sparse: layer {layer!r} has no bias to train")
            continue
        out[weight] = _restriction(graph, layer, weight, value)
    return out


def _restriction(graph: Graph, layer: str, weight: str, value: str) -> tuple[int, int] | None:
    axis = _channel_axis(graph, weight)
    channels = graph.tensors[weight].shape[axis]
    k = int(value) if value.isdigit() else max(1, int(channels * SPARSE_RATIOS[value]))
    if k > channels:
        raise CompileError(f"sparse: layer {layer!r} has {channels} output channels, {k} asked")
    group = max((int(n.attrs.get("group", 1)) for n in graph.nodes if n.op in ("Conv", "QConv") and n.inputs[1] == weight),
                default=1)
    per_group = channels // group if group > 1 else 1
    if k % per_group:
        k = min(channels, -(-k // per_group) * per_group)  # whole groups: a grouped conv's channels go by group
    return None if k == channels else (axis, k)


def _last_k(graph: Graph, weights: list[str], k: int) -> set[str]:
    blocks: dict[str, list[str]] = {}
    for w in weights:
        match = re.match(r"^(.*?blocks\.\d+)\.", w)
        if match:
            blocks.setdefault(match.group(1), []).append(w)
    if blocks:
        order = sorted(blocks, key=lambda b: int(b.rsplit(".", 1)[1]))
        if k > len(order):
            raise CompileError(f"last_k={k} but the model has {len(order)} blocks")
        return {w for b in order[-k:] for w in blocks[b]}
    layers: list[str] = []
    for w in weights:
        if weight_layer(w) not in layers:
            layers.append(weight_layer(w))
    if k > len(layers):
        raise CompileError(f"last_k={k} but the model has {len(layers)} parametrized layers")
    keep = set(layers[-k:])
    return {w for w in weights if weight_layer(w) in keep}


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


@dataclass(frozen=True)
class LoraSite:
    """A layer LoRA can adapt: its GEMM node and its weight, read as is or through a Transpose."""
    node: Node
    weight: str
    transposed: bool = False  # MatMul(x, Transpose(W)): W is (out, in), PyTorch's layout


def _is_weight(graph: Graph, name: str) -> bool:
    spec = graph.tensors.get(name)
    return spec is not None and spec.role in (Role.FROZEN, Role.TRAINABLE) and len(spec.shape) == 2


def lora_layers(graph: Graph) -> dict[str, LoraSite]:
    """GEMM nodes with a 2-D weight, by layer name: the layers LoRA can adapt. A weight is an initializer read
    directly (Gemm, MatMul(x, W)) or through a 2-D Transpose (MatMul(x, Transpose(W)), as TorchScript exports a
    3-D nn.Linear without constant folding). Ungrouped Conv nodes are adapted too (depthwise and grouped convolutions
    take no adapter: see compiler/ops/lora_conv.py)."""
    producers = graph.producers()
    found: dict[str, LoraSite] = {}
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
            continue
        if node.op == "Conv":
            spec = graph.tensors.get(node.inputs[1])
            if spec is not None and spec.role in (Role.FROZEN, Role.TRAINABLE) and node.attrs.get("group", 1) == 1:
                found.setdefault(node.layer or node.name, LoraSite(node, node.inputs[1]))
            continue
        if _is_weight(graph, node.inputs[1]):
            found.setdefault(node.layer or node.name, LoraSite(node, node.inputs[1]))
            continue
        source = producers.get(node.inputs[1])
        if node.op == "MatMul" and source is not None and source.op == "Transpose" and \
                _is_weight(graph, source.inputs[0]) and source.attrs.get("perm") in (None, (1, 0), [1, 0]):
            found.setdefault(node.layer or node.name, LoraSite(node, source.inputs[0], transposed=True))
    return found


AUTO_TARGETS = ("*attn.*", "*mlp.*")


def insert_lora(graph: Graph, cfg: LoraConfig, exclude: tuple[str, ...] = ()) -> Graph:
    """y = W·x (+ b) becomes y = W·x (+ b) + (α/r)·(x·A)·B, one LoraLinear step, for every targeted layer; A, B
    are new trainables. A targeted (ungrouped) Conv becomes one LoraConv step the same way.
    ``exclude``: patterns of layers trained fully, which "auto" leaves without adapters."""
    layers = lora_layers(graph)
    targets: dict[str, LoraSite] = {}
    if cfg.targets == ("auto",):
        auto = {k: v for k, v in layers.items() if any(fnmatchcase(k, p) for p in AUTO_TARGETS)
                and not any(fnmatchcase(k, p) for p in exclude)}
        if not auto:
            auto = {k: v for k, v in layers.items() if not any(fnmatchcase(k, p) for p in exclude)}
        if not auto:
            raise CompileError(f"LoRA: no layer to adapt (MatMul/Gemm/Conv layers: {_listing(list(layers))})")
        targets.update(auto)
    for pattern in cfg.targets if cfg.targets != ("auto",) else ():
        hits = {layer: node for layer, node in layers.items() if fnmatchcase(layer, pattern)}
        if not hits:
            raise CompileError(f"LoRA target pattern {pattern!r} matches no MatMul/Gemm/Conv layer; layers: "
                               f"{_listing(list(layers))}")
        targets.update(hits)
    rng = np.random.default_rng(cfg.seed)
    tensors, values = dict(graph.tensors), dict(graph.values)
    names = NameGen(tensors)
    nodes: list[Node] = []
    for node in graph.nodes:
        nodes.append(node)
        layer = node.layer or node.name
        if targets.get(layer) is None or targets[layer].node.name != node.name:
            continue
        site = targets[layer]
        if node.op == "Conv":
            nodes[-1] = _lora_conv(node, layer, graph.tensors[site.weight].shape, cfg, rng, tensors, values, names)
            continue
        x, w = node.inputs[0], site.weight
        w_shape = graph.tensors[w].shape
        if node.op == "Gemm":
            if node.attrs.get("transA", 0):
                raise CompileError(f"LoRA on layer {layer!r}: Gemm with transA=1 is not supported")
            d_out, d_in = w_shape if node.attrs.get("transB", 0) else w_shape[::-1]
        else:
            d_in, d_out = w_shape[::-1] if site.transposed else w_shape
        if cfg.rank > min(d_in, d_out):
            raise CompileError(f"LoRA rank {cfg.rank} is larger than layer {layer!r} allows "
                               f"(min(in, out) = {min(d_in, d_out)})")
        a, b = names(f"{layer}.lora_a"), names(f"{layer}.lora_b")
        values[a], values[b] = _lora_init(rng, cfg, d_in, d_out)
        tensors[a] = TensorSpec(a, (d_in, cfg.rank), "float32", Role.FROZEN if cfg.freeze_a else Role.TRAINABLE,
                                per_device=True)
        tensors[b] = TensorSpec(b, (cfg.rank, d_out), "float32", Role.TRAINABLE)
        # one fused step replaces the layer's GEMM (compiler/ops/linear.py, LoraLinear): a single pass over x
        # feeds W and A, B's product accumulates onto W's (Z = X·W + Y), the α/r scale sits on the rank-r
        # intermediate, and nothing activation-sized is added for the branch
        attrs = {"scale": cfg.alpha / cfg.rank}
        if node.op == "Gemm":
            attrs.update(transB=int(node.attrs.get("transB", 0)), alpha=float(node.attrs.get("alpha", 1.0)),
                         beta=float(node.attrs.get("beta", 1.0)))
        elif site.transposed:
            attrs.update(transB=1)  # the Transpose node is left without readers and pruned
        nodes[-1] = dataclasses.replace(node, op="LoraLinear", inputs=(x, w, a, b, *node.inputs[2:]), attrs=attrs)
    return graph.replace(tensors=tensors, values=values, nodes=tuple(nodes),
                         notes={**graph.notes, "lora_targets": sorted(targets), "lora_auto": cfg.targets == ("auto",)})


def _lora_conv(node: Node, layer: str, w_shape: tuple[int, ...], cfg: LoraConfig, rng: np.random.Generator,
               tensors: dict, values: dict, names: NameGen) -> Node:
    """PEFT's Conv LoRA as one LoraConv step: A (r, C, kernel) with the layer's window, B (M, r, 1…) a 1×1 conv."""
    d_out, d_in = w_shape[0], int(np.prod(w_shape[1:]))
    if cfg.rank > min(d_in, d_out):
        raise CompileError(f"LoRA rank {cfg.rank} is larger than conv layer {layer!r} allows "
                           f"(min(in·kernel, out) = {min(d_in, d_out)})")
    a, b = names(f"{layer}.lora_a"), names(f"{layer}.lora_b")
    a_val, b_val = _lora_init(rng, cfg, d_in, d_out)
    ones = (1,) * (len(w_shape) - 2)
    values[a] = np.ascontiguousarray(a_val.T).reshape(cfg.rank, *w_shape[1:])
    values[b] = np.ascontiguousarray(b_val.T).reshape(d_out, cfg.rank, *ones)
    tensors[a] = TensorSpec(a, values[a].shape, "float32", Role.FROZEN if cfg.freeze_a else Role.TRAINABLE)
    tensors[b] = TensorSpec(b, values[b].shape, "float32", Role.TRAINABLE)
    attrs = {k: v for k, v in node.attrs.items() if k in ("strides", "pads", "dilations", "auto_pad")}
    return dataclasses.replace(node, op="LoraConv", inputs=(node.inputs[0], node.inputs[1], a, b, *node.inputs[2:]),
                               attrs={"scale": cfg.alpha / cfg.rank, **attrs})


def _lora_init(rng: np.random.Generator, cfg: LoraConfig, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
    bound = 1.0 / np.sqrt(d_in)  # kaiming_uniform(a=√5), as PEFT initialises lora_A
    if cfg.init == "gaussian":
        a = rng.normal(0.0, 1.0 / cfg.rank, (d_in, cfg.rank))
    else:
        a = rng.uniform(-bound, bound, (d_in, cfg.rank))
    b = rng.uniform(-bound, bound, (cfg.rank, d_out)) if cfg.init == "random" else np.zeros((cfg.rank, d_out))
    return a.astype(np.float32), b.astype(np.float32)


def apply_tuning(graph: Graph, spec: TuningSpec) -> Graph:
    if spec.lora is not None:
        graph = insert_lora(graph, spec.lora, exclude=spec.train)
    return select_trainable(graph, spec)
