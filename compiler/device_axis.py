"""The device axis: one program that trains D devices at once.

The graph is imported with batch D·B, so every frozen layer is one GEMM over all devices' samples. Each
per-device parameter (trainables, and LoRA's A when it is frozen but replaceable) gets a leading axis D, and
only the nodes that read one are rewritten, with reshapes that expose the device axis:

    MatMul(x, P)        x (D·B, …, in) → (D, ·, in) @ P (D, in, out) → back to (D·B, …, out)
    Gemm(x, P, C)       the same via MatMul (transB handled by a Transpose of P)
    Add/Sub/Mul/Div     x (D·B, …) → (D, B, …) against P reshaped to (D, 1…, p)
    LayerNormalization  normalise with unit scale/zero bias, then the Mul/Add rules
    LoraLinear(x, W, A, B)  unchanged: A (D, in, r) and B (D, r, out) split x's rows into D slices itself
    LoraConv(x, W, A, B)    unchanged: A (D, r, C, k…) and B (D, M, r, 1…) split x's samples into D slices itself

The loss is scaled by D (the sum of the devices' mean losses), so each device's gradient is its own. An op
that reads a per-device parameter in any other way is an error: such programs run one device at a time.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from compiler.ir import CompileError, Graph, NameGen, Node, Role, TensorSpec
from compiler.ops import ops_where
from compiler.ops.elementwise import Binary
from compiler.ops.shape import resolve_reshape

ELEMENTWISE = ops_where(lambda op: isinstance(op, Binary))  # Add, Sub, Mul, Div, Pow


def per_device_tensors(graph: Graph) -> set[str]:
    return {n for n, s in graph.tensors.items() if s.is_per_device}


class _Rewriter:
    def __init__(self, graph: Graph, devices: int):
        self.graph = graph
        self.d = devices
        self.tensors = dict(graph.tensors)
        self.values = dict(graph.values)
        self.names = NameGen(self.tensors)
        self.node_names = NameGen(n.name for n in graph.nodes)
        self.nodes: list[Node] = []
        self.per_device = per_device_tensors(graph)
        self.original = {n: graph.tensors[n].shape for n in self.per_device}

    def tensor(self, hint: str, shape: tuple[int, ...], dtype: str = "float32") -> str:
        name = self.names(hint)
        self.tensors[name] = TensorSpec(name, tuple(int(s) for s in shape), dtype, Role.ACTIVATION)
        return name

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.names(hint)
        self.tensors[name] = TensorSpec(name, value.shape, str(value.dtype), Role.CONSTANT)
        self.values[name] = value
        return name

    def emit(self, base: Node, op: str, inputs: tuple[str, ...], output: str, **attrs) -> str:
        self.nodes.append(Node(self.node_names(f"{base.name}/dev.{op}"), op, inputs, (output,), attrs,
                               base.phase, base.layer))
        return output

    def reshape(self, base: Node, name: str, shape: tuple[int, ...]) -> str:
        shape = resolve_reshape(self.tensors[name].shape, shape)
        out = self.tensor(f"{name}.dev", shape, self.tensors[name].dtype)
        return self.emit(base, "Reshape", (name,), out, shape=tuple(shape))

    # ---- the rules -----------------------------------------------------------------------------------
    def run(self) -> Graph:
        for name in self.per_device:
            spec = self.tensors[name]
            self.tensors[name] = dataclasses.replace(spec, shape=(self.d,) + spec.shape)
            self.values[name] = np.ascontiguousarray(np.broadcast_to(self.values[name], (self.d,) + spec.shape))
        for node in self.graph.nodes:
            touched = [i for i in node.inputs if i in self.per_device]
            if not touched:
                self.nodes.append(node)
            elif node.op == "MatMul" and node.inputs[1] in self.per_device and node.inputs[0] not in self.per_device:
                self.matmul(node, node.inputs[0], node.inputs[1], node.outputs[0])
            elif node.op == "Gemm":
                self.gemm(node)
            elif node.op == "LoraLinear" and node.inputs[1] not in self.per_device:
                self.lora(node)
            elif node.op == "LoraConv" and not {node.inputs[1], *node.inputs[4:]} & self.per_device:
                self.nodes.append(node)
            elif node.op in ELEMENTWISE and len(touched) == 1:
                self.elementwise(node)
            elif node.op == "LayerNormalization":
                self.layer_norm(node)
            else:
                raise CompileError(f"device axis: node {node.name!r} ({node.op}) reads per-device parameter "
                                   f"{touched[0]!r} in a way that cannot be batched across devices")
        return self.graph.replace(tensors=self.tensors, values=self.values, nodes=tuple(self.nodes))

    def matmul(self, node: Node, x: str, p: str, y: str, transpose_p: bool = False) -> str:
        x_shape, y_shape = self.tensors[x].shape, self.tensors[y].shape
        x3 = self.reshape(node, x, (self.d, -1, x_shape[-1]))
        weight = p
        if transpose_p:
            shape = self.tensors[p].shape
            weight = self.emit(node, "Transpose", (p,), self.tensor(f"{p}.T", (shape[0], shape[2], shape[1])),
                               perm=(0, 2, 1))
        rows = int(np.prod(x_shape[:-1])) // self.d
        y3 = self.emit(node, "MatMul", (x3, weight), self.tensor(f"{y}.dev3", (self.d, rows, y_shape[-1])))
        return self.emit(node, "Reshape", (y3,), y, shape=tuple(y_shape))

    def gemm(self, node: Node) -> None:
        attrs = dict(node.attrs)
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise CompileError(f"device axis: Gemm {node.name!r} with transA/alpha/beta is not supported")
        x, w = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        y = node.outputs[0]
        if w in self.per_device:
            target = y if c is None else self.tensor(f"{y}.noc", self.tensors[y].shape)
            self.matmul(node, x, w, target, transpose_p=bool(attrs.get("transB", 0)))
        else:
            target = y if c is None else self.tensor(f"{y}.noc", self.tensors[y].shape)
            self.nodes.append(dataclasses.replace(node, inputs=(x, w), outputs=(target,)))
        if c is not None:
            bias = Node(f"{node.name}/bias", "Add", (target, c), (y,), {}, node.phase, node.layer)
            if c in self.per_device:
                self.elementwise(bias)
            else:  # a shared bias, or an activation accumulated onto the product (LoRA's B)
                self.nodes.append(bias)

    def lora(self, node: Node) -> None:
        """LoraLinear batches devices itself: A and B with a leading D split x's rows into D slices."""
        c = node.inputs[4] if len(node.inputs) > 4 else None
        if c is None or c not in self.per_device:
            self.nodes.append(node)
            return
        if node.attrs.get("beta", 1.0) != 1.0:
            raise CompileError(f"device axis: LoraLinear {node.name!r} with a trained C and beta != 1 is not supported")
        y = node.outputs[0]
        product = self.tensor(f"{y}.noc", self.tensors[y].shape)
        self.nodes.append(dataclasses.replace(node, inputs=node.inputs[:4], outputs=(product,)))
        self.elementwise(Node(f"{node.name}/bias", "Add", (product, c), (y,), {}, node.phase, node.layer))

    def device_view(self, base: Node, p: str, rank: int) -> str:
        """Per-device parameter P (D, *p) as (D, 1, …, *p) against an activation of rank ``rank`` + 1."""
        p_shape = self.original[p]
        ones = rank - len(p_shape)
        if ones < 0:
            raise CompileError(f"device axis: parameter {p!r} {p_shape} has a higher rank than its activation")
        return self.reshape(base, p, (self.d,) + (1,) * ones + tuple(p_shape))

    def elementwise(self, node: Node) -> None:
        a, b = node.inputs
        p_index = 0 if a in self.per_device else 1
        h = node.inputs[1 - p_index]
        h_shape, y_shape = self.tensors[h].shape, self.tensors[node.outputs[0]].shape
        if h_shape != y_shape:
            raise CompileError(f"device axis: node {node.name!r} broadcasts its activation; not supported")
        h_dev = self.reshape(node, h, (self.d, h_shape[0] // self.d) + tuple(h_shape[1:]))
        p_dev = self.device_view(node, node.inputs[p_index], len(h_shape))
        y_dev = self.tensor(f"{node.outputs[0]}.dev", (self.d, h_shape[0] // self.d) + tuple(h_shape[1:]))
        inputs = (p_dev, h_dev) if p_index == 0 else (h_dev, p_dev)
        self.emit(node, node.op, inputs, y_dev)
        self.emit(node, "Reshape", (y_dev,), node.outputs[0], shape=tuple(y_shape))

    def layer_norm(self, node: Node) -> None:
        x, scale = node.inputs[0], node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if x in self.per_device:
            raise CompileError(f"device axis: LayerNormalization {node.name!r} normalises a parameter")
        y = node.outputs[0]
        shape = self.tensors[y].shape
        plain_scale = scale if scale not in self.per_device else \
            self.const(f"{scale}.unit", np.ones(self.original[scale], np.float32))
        plain_bias = None if bias is None else (bias if bias not in self.per_device else None)
        normed = self.tensor(f"{y}.normed", shape)
        inputs = (x, plain_scale) + ((plain_bias,) if plain_bias else ())
        self.nodes.append(dataclasses.replace(node, inputs=inputs, outputs=(normed,)))
        current = normed
        if scale in self.per_device:
            scaled = self.tensor(f"{y}.scaled", shape) if bias in self.per_device else y
            self.elementwise(Node(f"{node.name}/scale", "Mul", (current, scale), (scaled,), {}, node.phase, node.layer))
            current = scaled
        if bias in self.per_device:
            self.elementwise(Node(f"{node.name}/bias", "Add", (current, bias), (y,), {}, node.phase, node.layer))
        elif current != y:
            raise CompileError(f"device axis: internal: LayerNormalization {node.name!r} output not produced")


def add_device_axis(graph: Graph, devices: int) -> Graph:
    """Rewrite a tuned forward graph imported with batch D·B into one that trains D devices at once."""
    if devices < 1:
        raise CompileError(f"devices must be >= 1, got {devices}")
    if devices == 1:
        return graph
    batch = graph.tensors[graph.inputs[0]].shape[0]
    if batch % devices:
        raise CompileError(f"device axis: batch {batch} is not a multiple of {devices} devices")
    restricted = sorted(n for n, s in graph.tensors.items() if s.train_channels)
    if restricted:
        raise CompileError(f"device axis: sparse channel subsets ({restricted[0]}) run one device per program")
    return _Rewriter(graph, devices).run()


def scale_loss(graph: Graph, loss: str, devices: int) -> tuple[Graph, str]:
    """loss := devices × mean loss = the sum of the devices' mean losses."""
    if devices == 1:
        return graph, loss
    nodes = list(graph.nodes)
    producer = next(i for i, n in enumerate(nodes) if loss in n.outputs)
    mean = f"{loss}.mean"
    tensors = dict(graph.tensors)
    tensors[mean] = dataclasses.replace(tensors[loss], name=mean, role=Role.ACTIVATION)
    nodes[producer] = dataclasses.replace(nodes[producer], outputs=(mean,))
    count = f"{loss}.devices"
    tensors[count] = TensorSpec(count, (), "float32", Role.CONSTANT)
    values = dict(graph.values)
    values[count] = np.asarray(devices, np.float32)
    nodes.insert(producer + 1, Node("loss/devices", "Mul", (mean, count), (loss,), {}, "forward", "loss"))
    return graph.replace(nodes=tuple(nodes), tensors=tensors, values=values), loss
