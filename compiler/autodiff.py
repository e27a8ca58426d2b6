"""Compile-time reverse-mode autodiff, pruned to the trainable parameters, with the optimizer step of each
parameter placed right after its gradient is final.

The backward graph is ordinary IR: each op's ``gradient`` rule emits nodes of other registered ops through a
``GradBuilder``; this module does the one generic reverse walk, sums partial gradients and un-broadcasts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from compiler.ir import CompileError, Graph, NameGen, Node, Role, TensorSpec
from compiler.ops import Op, get_op


@dataclass(frozen=True)
class SGDConfig:
    """PyTorch's SGD; ``proximal`` adds FedProx's term: every trainable p gets an anchor tensor p₀ (set by
    the device to the values it received) and the gradient becomes g + μ·(p − p₀), the gradient of
    loss + μ/2·‖p − p₀‖². μ is a runtime scalar (``PROXIMAL_MU_TENSOR``, 0 turns the term off)."""
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    # True: each parameter's update runs as soon as its gradient is complete, so the gradient buffer dies there.
    # False: the reference framework's accumulate-then-update loop: every update after the whole backward pass,
    # every gradient buffer alive until then.
    fused_update: bool = True
    proximal: bool = False
    # integer parameters (an int8 program, compiler/quantize.py): QAS scaling of their gradients, and
    # "round" (the int8 weight updated in place) or "master" (a float32 copy of its updated channels)
    qas: bool = True
    int_update: str = "round"

    def __post_init__(self) -> None:
        if not (self.lr > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0):
            raise CompileError(f"invalid optimizer settings {self}: need lr > 0, 0 <= momentum < 1, "
                               "weight_decay >= 0")

    def manifest(self, graph: "Graph") -> dict[str, Any]:
        """The Program's optimizer entry: settings and the runtime tensors a device sets."""
        out: dict[str, Any] = {"kind": "sgd", "lr": self.lr, "momentum": self.momentum,
                               "weight_decay": self.weight_decay, "fused_update": self.fused_update,
                               "lr_tensor": LR_TENSOR}
        if any(graph.tensors[p].dtype != "float32" for p in graph.by_role(Role.TRAINABLE)):
            out["int8"] = {"qas": self.qas, "update": self.int_update}
        if self.proximal:
            out["proximal_mu_tensor"] = PROXIMAL_MU_TENSOR
            out["anchors"] = {p: p + ANCHOR_SUFFIX for p in graph.by_role(Role.TRAINABLE)}
        return out


@dataclass(frozen=True)
class AdamConfig(SGDConfig):
    """PyTorch's Adam (L2 weight decay, no AMSGrad): two state tensors per trainable (first and second moment)
    and two bias corrections. For training from scratch (a base model's pretraining), where plain SGD stalls on
    deep, unnormalised networks; on-device tuning normally stays with SGD, whose state is one buffer or none."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.momentum or not all(0 <= b < 1 for b in self.betas) or not self.eps > 0:
            raise CompileError(f"invalid Adam settings {self}: need momentum 0 (Adam has betas), 0 <= betas < 1, "
                               "eps > 0")

    def manifest(self, graph: "Graph") -> dict[str, Any]:
        return {**super().manifest(graph), "kind": "adam", "betas": list(self.betas), "eps": self.eps}


OPTIMIZERS = ("sgd", "adam")


def optimizer_config(optimizer: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                     fused_update: bool = True, proximal: bool = False) -> SGDConfig:
    """The optimizer's settings by name: "sgd" (momentum allowed) or "adam" (PyTorch's default betas, eps)."""
    if optimizer == "sgd":
        return SGDConfig(lr, momentum, weight_decay, fused_update, proximal)
    if optimizer == "adam":
        return AdamConfig(lr, momentum, weight_decay, fused_update, proximal)
    raise CompileError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")


LR_TENSOR = "optimizer.lr"
PROXIMAL_MU_TENSOR = "optimizer.proximal_mu"
ANCHOR_SUFFIX = ".anchor"


class GradBuilder:
    """Emits backward nodes; gradient rules call it. Shapes are inferred through the registry."""

    def __init__(self, graph: Graph, requires: set[str]):
        self.tensors: dict[str, TensorSpec] = dict(graph.tensors)
        self.values: dict[str, np.ndarray] = dict(graph.values)
        self.nodes: list[Node] = []
        self.names = NameGen(self.tensors)
        self.requires = requires
        self.layer = ""
        self.phase = "backward"

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def dtype(self, name: str) -> str:
        return self.tensors[name].dtype

    def needs(self, name: str) -> bool:
        return name in self.requires

    def train_channels(self, name: str) -> tuple[int, int] | None:
        """(axis, k) when only the first k output channels of parameter ``name`` train (sparse update): its
        gradient rule must then produce the gradient of those channels only."""
        return self.tensors[name].train_channels

    def channel_slice(self, name: str, axis: int, k: int) -> str:
        """The first k entries of ``name`` along ``axis`` (a copy), e.g. the output-gradient channels a
        sparse weight update reads."""
        return self.emit("Slice", [name], "grad", starts=(0,), ends=(k,), axes=(axis,))

    def emit(self, op: str, inputs: Sequence[str], hint: str = "grad", **attrs: Any) -> str:
        return self.emit_n(op, inputs, hint, **attrs)[0]

    def emit_n(self, op_name: str, inputs: Sequence[str], hint: str = "grad", *,
               role: Role = Role.GRADIENT, **attrs: Any) -> tuple[str, ...]:
        op = get_op(op_name)
        attrs = op.resolve_attrs(attrs, where=f"backward of {self.layer or 'graph'}: ")
        specs = op.output_specs([self.shape(i) for i in inputs], [self.dtype(i) for i in inputs], attrs)
        outs = tuple(self.names(f"{hint}") for _ in specs)
        for out, (shape, dtype) in zip(outs, specs):
            self.tensors[out] = TensorSpec(out, shape, dtype, role)
        self.nodes.append(Node(self.names(f"{op_name}:{outs[0] if outs else hint}"), op_name, tuple(inputs),
                               outs, attrs, self.phase, self.layer))
        return outs

    def const(self, value: Any, hint: str = "const", dtype: str = "float32") -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.names(hint)
        self.tensors[name] = TensorSpec(name, tuple(arr.shape), dtype, Role.CONSTANT)
        self.values[name] = arr
        return name

    # conveniences used by many rules
    def sum_to(self, name: str, shape: tuple[int, ...]) -> str:
        """Un-broadcast: sum ``name`` down to ``shape`` (numpy broadcasting rules)."""
        if self.shape(name) == tuple(shape):
            return name
        return self.emit("ReduceSumTo", [name], "grad", shape=tuple(shape))

    def reshape(self, name: str, shape: tuple[int, ...]) -> str:
        if self.shape(name) == tuple(shape):
            return name
        return self.emit("Reshape", [name], "grad", shape=tuple(shape))

    def transpose(self, name: str, perm: Sequence[int] | None = None) -> str:
        rank = len(self.shape(name))
        perm = tuple(perm) if perm is not None else tuple(range(rank - 2)) + (rank - 1, rank - 2)
        return self.emit("Transpose", [name], "grad", perm=perm)


def _requires_grad(graph: Graph, trainable: set[str]) -> set[str]:
    requires = set(trainable)
    for node in graph.nodes:
        if any(i in requires for i in node.inputs):
            requires.update(node.outputs)
    return requires


def _ancestors(graph: Graph, target: str) -> set[str]:
    producers = graph.producers()
    seen, stack = set(), [target]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in producers:
            stack.extend(i for i in producers[name].inputs if i)
    return seen


def differentiate(graph: Graph, loss: str, sgd: SGDConfig | None) -> tuple[Graph, dict[str, str]]:
    """Append the backward pass and, unless ``sgd`` is None, the SGD updates to ``graph`` (a forward graph
    ending in ``loss``). Returns the new graph and the name of each trainable parameter's gradient."""
    trainable = set(graph.by_role(Role.TRAINABLE))
    if not trainable:
        raise CompileError("nothing to train: the tuning strategy selected no trainable parameters")
    relevant = _ancestors(graph, loss)
    unused = sorted(p for p in trainable if p not in relevant)
    if unused:
        raise CompileError(f"trainable parameter(s) {unused[:3]} do not affect the loss")
    requires = _requires_grad(graph, trainable) & relevant
    g = GradBuilder(graph, requires)
    lr = mu = ""
    if sgd is not None:
        lr = g.const(np.float32(sgd.lr), LR_TENSOR)
        g.tensors[lr] = g.tensors[lr].with_role(Role.HYPER)
        if sgd.proximal:
            mu = g.const(np.float32(0.0), PROXIMAL_MU_TENSOR)
            g.tensors[mu] = g.tensors[mu].with_role(Role.HYPER)
    grads: dict[str, str] = {}

    # how many forward consumers of each trainable parameter are still to be walked
    pending = {p: sum(1 for n in graph.nodes if p in n.inputs and n.outputs[0] in relevant) for p in trainable}
    partials: dict[str, list[str]] = {loss: [g.const(np.float32(1.0), "loss.seed")]}

    def total(name: str) -> str | None:
        parts = partials.pop(name, [])
        if not parts:
            return None
        acc = parts[0]
        for part in parts[1:]:
            acc = g.emit("Add", [acc, part], f"{name}.grad")
        return acc

    deferred: list[str] = []
    for node in reversed(graph.nodes):
        if not any(o in relevant for o in node.outputs) or not any(i in requires for i in node.inputs):
            continue
        dys = tuple(total(o) for o in node.outputs)
        if all(d is None for d in dys):
            raise CompileError(f"internal: no gradient reaches node {node.name!r}")
        op = get_op(node.op)
        g.layer = node.layer
        if type(op).gradient is Op.gradient:
            raise CompileError(f"node {node.name!r} (op {node.op}, layer {node.layer or '(top level)'!r}) has no "
                               "gradient rule, and a trained parameter lies behind it; freeze what comes before it "
                               "or see docs/ops.md")
        dxs = op.gradient(g, node.inputs, node.outputs, dys, **node.attrs)
        if len(dxs) != len(node.inputs):
            raise CompileError(f"internal: gradient of {node.op} returned {len(dxs)} values for "
                               f"{len(node.inputs)} inputs")
        for name, dx in zip(node.inputs, dxs):
            if dx is None or name not in requires:
                continue
            want = g.tensors[name].grad_shape
            if g.tensors[name].train_channels and g.shape(dx) != want:
                raise CompileError(f"sparse update of {name!r}: {node.op} cannot restrict its gradient to the first "
                                   f"{g.tensors[name].train_channels[1]} output channels")
            partials.setdefault(name, []).append(g.sum_to(dx, want))
        for name in node.inputs:
            if name in pending:
                pending[name] -= 1
                if pending[name] == 0:
                    grads[name] = total(name)
                    if grads[name] is None:
                        raise CompileError(f"internal: no gradient for trainable parameter {name!r}")
                    if sgd is not None and sgd.fused_update:
                        _emit_update(g, name, grads[name], lr, sgd, mu)
                    elif sgd is not None:
                        deferred.append(name)
    for name in deferred:
        _emit_update(g, name, grads[name], lr, sgd, mu)
    new = graph.replace(tensors=g.tensors, nodes=tuple(graph.nodes) + tuple(g.nodes), values=g.values)
    return new, grads


def _emit_update(g: GradBuilder, param: str, grad: str, lr: str, sgd: SGDConfig, mu: str = "") -> None:
    if g.dtype(param) != "float32":
        _emit_integer_update(g, param, grad, lr, sgd)
        return
    if sgd.proximal:  # FedProx: g + μ·(p − p₀), from ordinary ops (the backward stays ordinary IR)
        if g.train_channels(param):
            raise CompileError(f"parameter {param!r}: the proximal option (FedProx) does not combine with a "
                               "sparse channel subset yet")
        anchor = param + ANCHOR_SUFFIX
        if anchor in g.tensors:
            raise CompileError(f"internal: tensor {anchor!r} exists already")
        g.tensors[anchor] = TensorSpec(anchor, g.shape(param), "float32", Role.OPT_STATE)
        g.values[anchor] = np.zeros(g.shape(param), np.float32)
        g.phase, g.layer = "update", param.rsplit(".", 1)[0]
        pull = g.emit("Mul", [g.emit("Sub", [param, anchor], f"{param}.prox"), mu], f"{param}.prox")
        grad = g.emit("Add", [grad, pull], f"{param}.grad")
    if isinstance(sgd, AdamConfig):
        _emit_adam(g, param, grad, lr, sgd)
        return
    inputs = [param, grad, lr]
    if sgd.momentum:
        inputs.append(_new_state(g, f"{param}.momentum", np.zeros(g.shape(grad), np.float32)))
    g.phase, g.layer = "update", param.rsplit(".", 1)[0]
    axis, channels = g.train_channels(param) or (0, 0)
    g.emit_n("SGD", inputs, f"{param}.update", momentum=sgd.momentum, weight_decay=sgd.weight_decay,
             axis=axis, channels=channels)
    g.phase = "backward"


QAS_SUFFIX = ".qas"        # the per-channel QAS factor of an integer parameter (compiler/quantize.py)
MASTER_SUFFIX = ".master"  # the float32 copy of an int8 weight's updated channels


def _emit_integer_update(g: GradBuilder, param: str, grad: str, lr: str, sgd: SGDConfig) -> None:
    """QSGD of an int8 weight or int32 bias, its gradient first multiplied by the QAS factor when QAS is on."""
    if sgd.momentum or sgd.weight_decay or sgd.proximal or isinstance(sgd, AdamConfig):
        raise CompileError(f"parameter {param!r} is {g.dtype(param)}: int8 training takes plain SGD (no momentum, "
                           "weight decay, proximal term or Adam)")
    g.phase, g.layer = "update", param.rsplit(".", 1)[0]
    axis, channels = g.train_channels(param) or (0, 0)
    shape = g.tensors[param].grad_shape
    if sgd.qas:
        if param + QAS_SUFFIX not in g.values:
            raise CompileError(f"internal: integer parameter {param!r} has no QAS factor")
        factor = np.asarray(g.values[param + QAS_SUFFIX], np.float32)[:shape[axis]]
        factor = factor.reshape((1,) * axis + (-1,) + (1,) * (len(shape) - axis - 1))
        grad = g.emit("Mul", [grad, g.const(factor, f"{param}.qas_factor")], f"{param}.grad")
    inputs = [param, grad, lr]
    if sgd.int_update == "master" and g.dtype(param) == "int8":
        index = (slice(None),) * axis + (slice(0, shape[axis]),)
        inputs.append(_new_state(g, param + MASTER_SUFFIX, np.asarray(g.values[param])[index].astype(np.float32)))
    g.emit_n("QSGD", inputs, f"{param}.update", axis=axis, channels=channels)
    g.phase = "backward"


def _emit_adam(g: GradBuilder, param: str, grad: str, lr: str, adam: AdamConfig) -> None:
    inputs = [param, grad, lr] + [_new_state(g, f"{param}.{state}", np.zeros(shape, np.float32)) for state, shape in
                                  (("adam_m", g.shape(grad)), ("adam_v", g.shape(grad)), ("adam_corrections", (2,)))]
    g.phase, g.layer = "update", param.rsplit(".", 1)[0]
    axis, channels = g.train_channels(param) or (0, 0)
    g.emit_n("Adam", inputs, f"{param}.update", beta1=adam.betas[0], beta2=adam.betas[1], eps=adam.eps,
             weight_decay=adam.weight_decay, axis=axis, channels=channels)
    g.phase = "backward"


def _new_state(g: GradBuilder, hint: str, value: np.ndarray) -> str:
    """A new optimizer-state tensor (momentum, Adam's moments, an int8 weight's float32 master) with its
    initial value; returns its name."""
    name = g.names(hint)
    g.tensors[name] = TensorSpec(name, value.shape, "float32", Role.OPT_STATE)
    g.values[name] = value
    return name
