"""``quantize``: the int8 form of an imported CNN, as the Tiny Training Engine trains it (not fake quantization).

Per-channel symmetric int8 weights, int8 activations with a per-tensor scale and zero point found by running the
float graph on calibration data (min/max, the range always holding 0), int32 biases in units of s_x·s_w.
Inference BatchNormalization (the frontend's per-channel Mul + Add) is folded into the preceding Conv, a ReLU
after it becomes the requantization clamp (its output range starts at 0, so its zero point is −128).

    Conv [→ Mul → Add] [→ Relu]   →  QConv (int8 → int8)
    GlobalAveragePool on int8     →  QGlobalAveragePool
    Reshape / Flatten / Squeeze   →  the same view of the int8 tensor
    Gemm (the model's output)     →  QLinear with float32 logits (scale s_x·s_w); followed by Relu: int8 out

The quantized tensors keep the float tensors' names (``blocks.3.pw.weight`` is the int8 weight), so tuning
patterns and sparse schemes name layers as before. Any other op reading an int8 tensor is a CompileError
naming it: TTE's scope is CNNs. Per trainable candidate the pass adds the QAS factors as constants
``<param>.qas`` — 1/s_w² per output channel for a weight, 1/(s_w·s_x)² for a bias (Lin et al. 2022, eq. 3) —
which the update multiplies the gradient by (compiler/autodiff.py) when QAS is on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compiler.autodiff import QAS_SUFFIX
from compiler.ir import CompileError, Graph, Node, Role, TensorSpec
from compiler.ops import get_op
from compiler.ops.quantized import QMAX, QMIN
from compiler.reference import evaluate

UPDATES = ("round", "master")   # int8 weights updated in place (rounded) | float32 masters of the updated channels
MIN_SCALE = 1e-12


@dataclass(frozen=True, eq=False)
class Int8Options:
    """``calibration``: samples of the task's data, (n, *input shape) float32. ``qas``: quantization-aware
    scaling of the weight and bias gradients. ``update``: "round" (int8 weights updated in place) or "master"
    (a float32 copy of the updated channels is what SGD updates; the int8 weight is its rounding)."""
    calibration: np.ndarray = field(repr=False)
    qas: bool = True
    update: str = "round"

    def __post_init__(self) -> None:
        if self.update not in UPDATES:
            raise CompileError(f"int8 update must be one of {', '.join(UPDATES)}, got {self.update!r}")
        if np.asarray(self.calibration).ndim < 2 or len(self.calibration) == 0:
            raise CompileError("int8 needs calibration samples (n, *input shape) of the task's data")

    def manifest(self) -> dict[str, Any]:
        return {"qas": self.qas, "update": self.update, "calibration_samples": int(len(self.calibration))}


def affine(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) mapping [lo, hi] (widened to hold 0) onto [−128, 127]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max((hi - lo) / (QMAX - QMIN), MIN_SCALE)
    zero = int(np.clip(QMIN - round(lo / scale), QMIN, QMAX))
    return scale, zero


def weight_scales(w: np.ndarray) -> np.ndarray:
    """Per output channel (axis 0): max |w| / 127."""
    return np.maximum(np.abs(w.reshape(w.shape[0], -1)).max(axis=1) / QMAX, MIN_SCALE).astype(np.float64)


def _channel_constant(graph: Graph, name: str, channels: int) -> np.ndarray | None:
    """A per-channel constant (1, C, 1, 1), (C, 1, 1) or (C,) as a (C,) vector; None otherwise."""
    spec = graph.tensors.get(name)
    if spec is None or name not in graph.values or spec.role not in (Role.FROZEN, Role.CONSTANT):
        return None
    value = np.asarray(graph.values[name], np.float64)
    squeezed = value.reshape(-1) if value.size == channels else None
    if squeezed is None or max((d for i, d in enumerate(value.shape) if d != 1), default=channels) != channels:
        return None
    return squeezed


class _Builder:
    def __init__(self, graph: Graph, ranges: dict[str, tuple[float, float]]):
        self.graph, self.ranges = graph, ranges
        self.tensors: dict[str, TensorSpec] = {}
        self.values: dict[str, np.ndarray] = {}
        self.nodes: list[Node] = []
        self.qparams: dict[str, tuple[float, int]] = {}   # int8 tensor → (scale, zero point)
        self.layers: list[dict[str, Any]] = []
        self.consumers = graph.consumers()

    def param(self, name: str, value: np.ndarray, role: Role = Role.FROZEN) -> str:
        self.tensors[name] = TensorSpec(name, tuple(value.shape), str(value.dtype), role)
        self.values[name] = value
        return name

    def activation(self, name: str, dtype: str) -> None:
        self.tensors[name] = TensorSpec(name, self.graph.tensors[name].shape, dtype, Role.ACTIVATION)

    def range_of(self, name: str, relu: bool) -> tuple[float, int]:
        lo, hi = self.ranges[name]
        return affine(0.0 if relu else lo, hi)

    def sole_consumer(self, name: str) -> Node | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.graph.outputs else None


def quantize_graph(graph: Graph, calibration: np.ndarray) -> Graph:
    """The int8 form of ``graph`` (an imported float CNN), calibrated on ``calibration``."""
    if len(graph.inputs) != 1:
        raise CompileError(f"int8: the model must have one input, it has {len(graph.inputs)}")
    source = graph.inputs[0]
    x = np.asarray(calibration, np.float32)
    if tuple(x.shape[1:]) != tuple(graph.tensors[source].shape[1:]):
        raise CompileError(f"int8: calibration samples of shape {tuple(x.shape[1:])} do not fit input {source!r} "
                           f"{tuple(graph.tensors[source].shape[1:])}")
    b = _Builder(graph, _ranges(graph, source, x))
    b.tensors[source] = graph.tensors[source]
    scale, zero = affine(float(x.min()), float(x.max()))
    quantized_input = f"{source}.q"
    b.tensors[quantized_input] = TensorSpec(quantized_input, graph.tensors[source].shape, "int8", Role.ACTIVATION)
    b.nodes.append(Node(f"{source}/Quantize", "Quantize", (source,), (quantized_input,),
                        {"scale": scale, "zero_point": zero}, "forward", "input"))
    b.qparams[quantized_input] = (scale, zero)
    alias = {source: quantized_input}    # float tensor → the int8 tensor standing for it
    done: set[str] = set()
    for node in graph.nodes:
        if node.name in done:
            continue
        ins = [alias.get(i, i) for i in node.inputs]
        if node.op == "Conv" and ins[0] in b.qparams:
            done.update(_conv(b, node, ins, alias))
        elif node.op == "Gemm" and ins[0] in b.qparams:
            done.update(_gemm(b, node, ins, alias))
        elif node.op == "GlobalAveragePool" and ins[0] in b.qparams:
            out = node.outputs[0]
            b.activation(out, "int8")
            b.nodes.append(Node(node.name, "QGlobalAveragePool", (ins[0],), (out,), {}, "forward", node.layer))
            b.qparams[out] = b.qparams[ins[0]]
            alias[out] = out
        elif get_op(node.op).view and ins[0] in b.qparams:
            out = node.outputs[0]
            b.activation(out, "int8")
            b.nodes.append(Node(node.name, node.op, (ins[0], *ins[1:]), (out,), node.attrs, "forward", node.layer))
            b.qparams[out] = b.qparams[ins[0]]
            alias[out] = out
        elif any(i in b.qparams for i in ins):
            raise CompileError(f"int8: node {node.name!r} ({node.op}, layer {node.layer or '(top level)'!r}) reads an "
                               "int8 tensor and has no quantized form (int8 covers CNNs: Conv, BatchNormalization, "
                               "Relu, GlobalAveragePool, Reshape, Gemm)")
        else:
            for name in (*node.inputs, *node.outputs):
                if name and name not in b.tensors:
                    b.tensors[name] = graph.tensors[name]
                    if name in graph.values:
                        b.values[name] = graph.values[name]
            b.nodes.append(node)
    if any(graph.tensors[o].dtype != b.tensors[o].dtype for o in graph.outputs):
        raise CompileError("int8: the model's output must come from a Gemm (float logits)")
    notes = dict(graph.notes)
    notes["int8"] = {"input": {"scale": scale, "zero_point": zero}, "layers": b.layers}
    out = Graph(b.tensors, tuple(b.nodes), graph.inputs, graph.outputs, b.values, graph.name, notes)
    out.check()
    return out


def _ranges(graph: Graph, source: str, x: np.ndarray) -> dict[str, tuple[float, float]]:
    """(min, max) of every float activation over the calibration samples, run at the graph's batch (its
    Reshape shapes are fixed); a last partial batch is padded with the first samples."""
    batch = graph.tensors[source].shape[0]
    ranges: dict[str, tuple[float, float]] = {}
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, x[:batch - len(chunk)]])
        for name, v in evaluate(graph, {source: chunk}).items():
            if graph.tensors[name].role == Role.ACTIVATION and v.dtype.kind == "f":
                lo, hi = ranges.get(name, (np.inf, -np.inf))
                ranges[name] = (min(lo, float(v.min())), max(hi, float(v.max())))
    return ranges


def _chain(b: _Builder, start: str) -> tuple[list[Node], np.ndarray | None, np.ndarray | None, bool, str]:
    """The Mul/Add (folded BatchNorm) and Relu nodes after a layer's output: (nodes, bn scale, bn shift, relu,
    the float tensor the chain ends in)."""
    nodes, mul, add, relu, end = [], None, None, False, start
    channels = b.graph.tensors[start].shape[1]
    nxt = b.sole_consumer(end)
    if nxt is not None and nxt.op == "Mul" and nxt.inputs[0] == end:
        mul = _channel_constant(b.graph, nxt.inputs[1], channels)
        if mul is not None:
            nodes.append(nxt)
            end = nxt.outputs[0]
            nxt = b.sole_consumer(end)
    if nxt is not None and nxt.op == "Add" and nxt.inputs[0] == end:
        add = _channel_constant(b.graph, nxt.inputs[1], channels)
        if add is not None:
            nodes.append(nxt)
            end = nxt.outputs[0]
            nxt = b.sole_consumer(end)
    if nxt is not None and nxt.op == "Relu":
        nodes.append(nxt)
        relu, end = True, nxt.outputs[0]
    return nodes, mul, add, relu, end


def _layer(b: _Builder, node: Node, x: str, w: np.ndarray, bias: np.ndarray, relu: bool, end: str,
           float_out: bool) -> tuple[str, str, str]:
    """Quantize one layer's folded weight and bias; returns the names of the int8 weight, int32 bias and the
    requantization multiplier."""
    sx, _ = b.qparams[x]
    sw = weight_scales(w)
    wq = np.clip(np.rint(w / sw.reshape(-1, *(1,) * (w.ndim - 1))), QMIN, QMAX).astype(np.int8)
    bq = np.rint(bias / (sx * sw)).astype(np.int64)
    if np.abs(bq).max(initial=0) >= 2 ** 31:
        raise CompileError(f"int8: the bias of layer {node.layer!r} does not fit int32 at input scale {sx:g}")
    weight = node.inputs[1]
    bias_name = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else f"{node.layer}.bias"
    b.param(weight, wq)
    b.param(bias_name, bq.astype(np.int32))
    if float_out:
        multiplier = sx * sw
        b.activation(end, "float32")
    else:
        sy, zy = b.range_of(end, relu)
        multiplier = sx * sw / sy
        b.activation(end, "int8")
        b.qparams[end] = (sy, zy)
    scale_name = b.param(f"{node.layer}.requant", multiplier.astype(np.float32), Role.CONSTANT)
    b.param(weight + QAS_SUFFIX, (1.0 / sw ** 2).astype(np.float32), Role.CONSTANT)
    b.param(bias_name + QAS_SUFFIX, (1.0 / (sw * sx) ** 2).astype(np.float32), Role.CONSTANT)
    b.layers.append({"layer": node.layer, "op": node.op, "x_scale": sx, "y_scale": b.qparams.get(end, (None,))[0],
                     "relu": relu, "weight_scale_max": float(sw.max()), "weight_scale_min": float(sw.min())})
    return weight, bias_name, scale_name


def _conv(b: _Builder, node: Node, ins: list[str], alias: dict[str, str]) -> set[str]:
    w = np.asarray(b.graph.values.get(node.inputs[1]), np.float64) if node.inputs[1] in b.graph.values else None
    if w is None:
        raise CompileError(f"int8: Conv {node.name!r} (layer {node.layer!r}) has no constant weight")
    bias = (np.asarray(b.graph.values[node.inputs[2]], np.float64) if len(node.inputs) > 2 and node.inputs[2]
            else np.zeros(w.shape[0]))
    chain, mul, add, relu, end = _chain(b, node.outputs[0])
    if mul is not None:
        w, bias = w * mul.reshape(-1, *(1,) * (w.ndim - 1)), bias * mul
    if add is not None:
        bias = bias + add
    weight, bias_name, scale = _layer(b, node, ins[0], w, bias, relu, end, float_out=False)
    attrs = {k: v for k, v in node.attrs.items() if k != "kernel_shape"}
    attrs.update(x_zero=b.qparams[ins[0]][1], y_zero=b.qparams[end][1])
    b.nodes.append(Node(node.name, "QConv", (ins[0], weight, bias_name, scale), (end,), attrs, "forward", node.layer))
    alias[end] = end
    return {n.name for n in chain}


def _gemm(b: _Builder, node: Node, ins: list[str], alias: dict[str, str]) -> set[str]:
    a = node.attrs
    if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or \
            node.inputs[1] not in b.graph.values:
        raise CompileError(f"int8: Gemm {node.name!r} (layer {node.layer!r}) needs a constant weight, transA=0, "
                           "alpha = beta = 1")
    w = np.asarray(b.graph.values[node.inputs[1]], np.float64)
    w = w if a.get("transB", 0) else w.T
    bias = (np.asarray(b.graph.values[node.inputs[2]], np.float64).reshape(-1) if len(node.inputs) > 2
            and node.inputs[2] else np.zeros(w.shape[0]))
    if bias.shape != (w.shape[0],):
        raise CompileError(f"int8: Gemm {node.name!r} (layer {node.layer!r}) needs a bias per output")
    chain, relu, end = [], False, node.outputs[0]
    nxt = b.sole_consumer(end)
    if nxt is not None and nxt.op == "Relu":
        chain, relu, end = [nxt], True, nxt.outputs[0]
    float_out = end in b.graph.outputs and not relu
    weight, bias_name, scale = _layer(b, node, ins[0], w, bias, relu, end, float_out)
    attrs = {"x_zero": b.qparams[ins[0]][1], "y_zero": 0 if float_out else b.qparams[end][1],
             "output": "float32" if float_out else "int8"}
    b.nodes.append(Node(node.name, "QLinear", (ins[0], weight, bias_name, scale), (end,), attrs, "forward",
                        node.layer))
    if not float_out:
        alias[end] = end
    return {n.name for n in chain}
