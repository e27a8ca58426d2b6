"""ONNX → IR: read and check the model, fix the batch dimension, turn ONNX's constant inputs into
attributes, fold constants, infer every shape through the op registry, and fuse torch's Erf-GELU.

Once the batch is fixed, every shape is static, so the exporters' shape subgraphs (Shape, ConstantOfShape,
Equal, Where, Mod, Range, Gather on shapes, ...) read only constants: a node whose inputs are all constants is
evaluated at import (ops the registry lacks by ONNX's reference implementation) and never reaches the registry.
An op that is neither foldable nor registered is one error naming the node, the op and its PyTorch module."""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.ir import CompileError, Graph, NameGen, Node, Role, TensorSpec
from compiler.names import module_path, recover_names
from compiler.ops import REGISTRY, get_op
from compiler.ops.shape import ONNX_DTYPES

ONNX_TO_DTYPE = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64",
                 onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
                 onnx.TensorProto.BOOL: "bool"}

# ONNX ops rewritten on import: no registry entry of their own
IMPORT_REWRITES = ("Constant", "Flatten", "Dropout", "BatchNormalization*", "Gelu(Erf form)")


def read_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        model = source
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise CompileError(f"{path}: no such file")
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as exc:  # protobuf raises DecodeError and friends
            raise CompileError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
        if not model.graph.node:
            raise CompileError(f"{path}: not an ONNX model (no graph nodes)")
        _load_external_data(model, path)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "validation failed"
        raise CompileError(f"corrupt ONNX model: {first}") from None
    return model


def _load_external_data(model: onnx.ModelProto, path: str) -> None:
    """Tensors stored beside the model (ONNX external data): each file must exist in the model's directory."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data
    base = os.path.dirname(os.path.abspath(path))
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            location = ExternalDataInfo(tensor).location
            if not os.path.isfile(os.path.join(base, location)):
                raise CompileError(f"{path}: tensor {tensor.name!r} is stored in {os.path.join(base, location)}, "
                                   "which is missing")
    try:
        onnx.load_external_data_for_model(model, base)
    except Exception as exc:  # a short or unreadable data file
        raise CompileError(f"{path}: cannot read its external data ({type(exc).__name__}: {exc})") from None


def layer_of(node: onnx.NodeProto, weight_names: list[str]) -> str:
    """The model layer a node belongs to: the prefix of its ``<layer>.weight``/``.bias`` initializer, else
    the PyTorch module it came from (``names.module_path``), else zoo's '<layer>/<detail>' name cut at '/'."""
    for w in weight_names:
        for suffix in (".weight", ".bias"):
            if w.endswith(suffix):
                return w[: -len(suffix)]
    path = module_path(node)
    if path or (node.name or "").startswith("/") or node.metadata_props:
        return path
    return (node.name or "").split("/")[0]


class _Importer:
    def __init__(self, model: onnx.ModelProto, batch: int):
        self.model = model
        self.batch = batch
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        graph = model.graph
        self.tensors: dict[str, TensorSpec] = {}
        self.values: dict[str, np.ndarray] = {}
        self.nodes: list[Node] = []
        self.names = NameGen([])        # tensor names
        self.node_names = NameGen([])   # node names (ONNX allows empty and repeated ones)
        for init in graph.initializer:
            value = numpy_helper.to_array(init)
            if value.dtype.kind == "f" and not np.isfinite(value).all():  # a weight, never a mask: refuse
                nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
                raise CompileError(f"initializer {init.name!r} holds non-finite values ({nan} NaN, {inf} Inf "
                                   f"of {value.size})")
            self._constant(init.name, value, weight=True)
        init_names = {i.name for i in graph.initializer}
        self.inputs = [i for i in graph.input if i.name not in init_names]
        self.rebatched: dict[str, tuple[int, ...]] = {}  # input -> its exported shape, when its batch was fixed
        for inp in self.inputs:
            self._input(inp)

    # ---- tensors --------------------------------------------------------------------------------------
    def _constant(self, name: str, value: np.ndarray, weight: bool = False) -> None:
        value = np.asarray(value)
        if value.dtype == np.float64:
            value = value.astype(np.float32)
        role = Role.FROZEN if weight and value.dtype.kind == "f" and value.size > 1 else Role.CONSTANT
        self.tensors[name] = TensorSpec(name, tuple(value.shape), str(value.dtype), role)
        self.values[name] = value
        self.names.taken.add(name)

    def _input(self, info: onnx.ValueInfoProto) -> None:
        ttype = info.type.tensor_type
        if ttype.elem_type not in ONNX_TO_DTYPE:
            raise CompileError(f"input {info.name!r}: unsupported element type "
                               f"{onnx.TensorProto.DataType.Name(ttype.elem_type)}")
        shape = []
        for axis, dim in enumerate(ttype.shape.dim):
            if axis == 0:
                if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != self.batch:
                    self.rebatched[info.name] = tuple(d.dim_value if d.HasField("dim_value") else -1
                                                      for d in ttype.shape.dim)
                shape.append(self.batch)
            elif dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            else:
                label = dim.dim_param or "?"
                raise CompileError(f"input {info.name!r} has an unknown dimension {label!r} at axis {axis}; "
                                   "only the batch axis (0) may be dynamic")
        self.tensors[info.name] = TensorSpec(info.name, tuple(shape), ONNX_TO_DTYPE[ttype.elem_type], Role.INPUT)
        self.names.taken.add(info.name)

    def is_const(self, name: str) -> bool:
        return name in self.values and self.tensors[name].role == Role.CONSTANT

    def const_value(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | None:
        if index >= len(node.input) or not node.input[index]:
            return None
        name = node.input[index]
        if name not in self.values:
            raise CompileError(f"node {node.name!r} ({node.op_type}): {what} must be a constant, "
                               f"but {name!r} is computed at run time")
        return self.values[name]

    # ---- nodes ----------------------------------------------------------------------------------------
    def run(self) -> Graph:
        try:
            for node in self.model.graph.node:
                self.import_node(node)
        except CompileError as exc:
            if self.rebatched:
                raise CompileError(f"{self._fixed_batch()}: re-batching fails ({exc})") from None
            raise
        outputs = tuple(o.name for o in self.model.graph.output)
        for name in outputs:
            if name not in self.tensors:
                raise CompileError(f"graph output {name!r} is never computed")
            shape = self.tensors[name].shape
            if self.rebatched and (not shape or shape[0] != self.batch):
                raise CompileError(f"{self._fixed_batch()}: re-batched, output {name!r} has shape {shape}, not "
                                   f"batch {self.batch} first")
        return Graph(self.tensors, tuple(self.nodes), tuple(i.name for i in self.inputs), outputs,
                     self.values, self.model.graph.name or "model",
                     {"rebatched": {k: list(v) for k, v in self.rebatched.items()}})

    def _fixed_batch(self) -> str:
        name, shape = next(iter(self.rebatched.items()))
        return (f"input {name!r} was exported with a fixed batch (shape {shape}) and the model does not run at "
                f"batch {self.batch}; export it with a dynamic batch axis or compile with --batch {shape[0]}")

    def import_node(self, node: onnx.NodeProto) -> None:
        attrs = {a.name: _attr(a) for a in node.attribute}
        where = f"node {node.name!r} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            raise CompileError(f"{where}: unsupported op domain {node.domain!r}")
        if node.op_type == "Constant":
            self._constant(node.output[0], _constant_value(node, attrs))
            return
        if node.op_type not in REGISTRY and all(self.is_const(i) for i in node.input if i):
            self.fold(node)
            return
        rewrite = REWRITES.get(node.op_type)
        op_type, inputs, attrs = rewrite(self, node, attrs) if rewrite else (node.op_type, list(node.input), attrs)
        if op_type is None:  # folded away entirely (e.g. BatchNormalization → Mul/Add emitted by the rewrite)
            return
        if op_type not in REGISTRY:
            raise CompileError(unsupported_message(node))
        self.add(op_type, inputs, list(node.output), attrs, node)

    def fold(self, node: onnx.NodeProto) -> None:
        """Evaluate a node whose inputs are all constants with ONNX's reference implementation."""
        from onnx.reference.ops import load_op  # ~0.3 s to import: only models with shape subgraphs pay it
        try:
            op = load_op(node.domain or "", node.op_type, self.opset)(node, _REFERENCE_PARAMS)
            results = op.run(*(self.values[i] if i else None for i in node.input))
        except Exception as exc:  # the reference raises whatever its numpy code raises
            if not _is_reference_op(node.op_type, self.opset):
                raise CompileError(unsupported_message(node)) from None
            raise CompileError(f"node {node.name!r} ({node.op_type}): cannot fold it at compile time "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        for out, value in zip(node.output, results if isinstance(results, tuple) else (results,)):
            if out:
                self._constant(out, np.asarray(value))

    def add(self, op_type: str, inputs: list[str], outputs: list[str], attrs: dict[str, Any],
            node: onnx.NodeProto, name: str | None = None) -> None:
        where = f"node {node.name!r} ({node.op_type}): "
        op = get_op(op_type)
        inputs = [i for i in inputs]
        while inputs and not inputs[-1]:
            inputs.pop()
        for i in inputs:
            if i and i not in self.tensors:
                raise CompileError(f"{where}input {i!r} is not defined")
        attrs = op.resolve_attrs(attrs, where)
        in_specs = [self.tensors[i] for i in inputs if i]
        if op_type == "Shape":  # static shapes: always a constant
            value = np.array(in_specs[0].shape[attrs["start"]:attrs["end"]], np.int64)
            self._constant(outputs[0], value)
            return
        try:
            specs = op.output_specs([s.shape for s in in_specs], [s.dtype for s in in_specs], attrs)
        except CompileError as exc:
            raise CompileError(f"{where}{exc}") from None
        outputs = [o for o in outputs if o][: len(specs)]
        if op.foldable and all(self.is_const(i) for i in inputs if i) and not op.updates:
            results = op.run([self.values[i] for i in inputs], attrs)
            for out, value in zip(outputs, results):
                self._constant(out, value)
            return
        for out, (shape, dtype) in zip(outputs, specs):
            self.tensors[out] = TensorSpec(out, shape, dtype, Role.ACTIVATION)
            self.names.taken.add(out)
        weights = [i for i in inputs if i in self.values and self.tensors[i].role == Role.FROZEN]
        self.nodes.append(Node(self.node_names(name or node.name or op_type), op_type, tuple(inputs),
                               tuple(outputs), attrs, "forward", layer_of(node, weights)))


_REFERENCE_PARAMS = {"log": lambda *args: None, "opsets": {"": 21}, "verbose": 0, "new_ops": None,
                     "evaluator_cls": None}


def _is_reference_op(op_type: str, opset: int) -> bool:
    from onnx.reference.ops import load_op
    try:
        load_op("", op_type, opset)
        return True
    except Exception:  # noqa: BLE001 - onnx raises several types for unknown ops
        return False


def unsupported_message(node: onnx.NodeProto) -> str:
    module = module_path(node)
    origin = f"PyTorch module {module!r}" if module else "no PyTorch module recorded"
    return (f"node {node.name!r}: op {node.op_type!r} ({origin}) is not supported; the supported ops are "
            "listed in docs/ops.md")


def _attr(a: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(a)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return tuple(v.decode() if isinstance(v, bytes) else v for v in value)
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return value


def _constant_value(node: onnx.NodeProto, attrs: dict[str, Any]) -> np.ndarray:
    for key, cast in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                      ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=cast) if cast else np.asarray(attrs[key])
    raise CompileError(f"node {node.name!r} (Constant): unsupported constant form {sorted(attrs)}")


# ---- rewrites: ONNX's constant inputs become attributes; a few ops become others ---------------------
Rewrite = Callable[[_Importer, onnx.NodeProto, dict], tuple]


def _ints(value: np.ndarray | None) -> tuple[int, ...] | None:
    return None if value is None else tuple(int(v) for v in np.asarray(value).reshape(-1))


def _reshape(imp, node, attrs):
    return "Reshape", [node.input[0]], {**attrs, "shape": _ints(imp.const_value(node, 1, "shape"))}


def _flatten(imp, node, attrs):
    axis = attrs.get("axis", 1)
    shape = imp.tensors[node.input[0]].shape
    axis = axis + len(shape) if axis < 0 else axis
    return "Reshape", [node.input[0]], {"shape": (int(np.prod(shape[:axis], dtype=np.int64)), -1)}


def _slice(imp, node, attrs):
    new = {"starts": _ints(imp.const_value(node, 1, "starts")), "ends": _ints(imp.const_value(node, 2, "ends")),
           "axes": _ints(imp.const_value(node, 3, "axes")), "steps": _ints(imp.const_value(node, 4, "steps"))}
    return "Slice", [node.input[0]], new


def _split(imp, node, attrs):
    axis = attrs.get("axis", 0)
    split = _ints(imp.const_value(node, 1, "split")) or attrs.get("split")
    if split is None:
        dim = imp.tensors[node.input[0]].shape[axis]
        parts = attrs.get("num_outputs", len(node.output))
        step = -(-dim // parts)
        split = tuple(min(step, dim - i * step) for i in range(parts))
    return "Split", [node.input[0]], {"axis": axis, "split": tuple(split)}


def _axes_input(op_type):
    def rewrite(imp, node, attrs):
        axes = _ints(imp.const_value(node, 1, "axes")) if len(node.input) > 1 else attrs.pop("axes", None)
        new = {k: v for k, v in attrs.items() if k != "axes"}
        if op_type.startswith("Reduce"):
            if attrs.get("noop_with_empty_axes", 0) and not axes:
                return "Identity", [node.input[0]], {}
            new.pop("noop_with_empty_axes", None)
        if axes is not None or not op_type.startswith("Reduce"):
            new["axes"] = axes
        return op_type, [node.input[0]], new
    return rewrite


def _clip(imp, node, attrs):
    """Clip's bounds are inputs from opset 11 on (attributes before); absent ones stay at ±FLT_MAX."""
    new = dict(attrs)
    for index, key in ((1, "min"), (2, "max")):
        value = imp.const_value(node, index, key)
        if value is not None:
            new[key] = float(np.asarray(value).reshape(()))
    return "Clip", [node.input[0]], new


def _cast_like(imp, node, attrs):
    """CastLike(x, like) casts to like's dtype, which is static: a Cast (folded when x is a constant)."""
    codes = {dtype: code for code, dtype in ONNX_DTYPES.items()}
    return "Cast", [node.input[0]], {"to": codes[imp.tensors[node.input[1]].dtype]}


def _expand(imp, node, attrs):
    return "Expand", [node.input[0]], {"shape": _ints(imp.const_value(node, 1, "shape"))}


def _dropout(imp, node, attrs):
    return "Identity", [node.input[0]], {}


def _batchnorm(imp, node, attrs):
    """Inference-form BatchNormalization is frozen: fold it to y = x·s + t with per-channel constants."""
    if attrs.get("training_mode", 0):
        raise CompileError(f"node {node.name!r} (BatchNormalization): training_mode=1 is not supported")
    eps = float(attrs.get("epsilon", 1e-5))
    scale, bias, mean, var = (imp.const_value(node, i, n) for i, n in
                              ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var")))
    s = (scale / np.sqrt(var.astype(np.float64) + eps)).astype(np.float32)
    t = (bias - mean * s).astype(np.float32)
    rank = len(imp.tensors[node.input[0]].shape)
    bshape = (-1,) + (1,) * (rank - 2)
    base = node.name or node.output[0]
    s_name, t_name, mid = imp.names(f"{base}.bn_scale"), imp.names(f"{base}.bn_shift"), imp.names(f"{base}.bn_mul")
    imp._constant(s_name, s.reshape(bshape), weight=True)
    imp._constant(t_name, t.reshape(bshape), weight=True)
    imp.add("Mul", [node.input[0], s_name], [mid], {}, node, name=f"{base}/Mul")
    imp.add("Add", [mid, t_name], [node.output[0]], {}, node, name=f"{base}/Add")
    return None, [], {}


def _softmax_legacy(imp, node, attrs):
    """Before opset 13 Softmax flattened to 2-D at ``axis`` (default 1): the same as ours only on the last axis."""
    rank = len(imp.tensors[node.input[0]].shape)
    axis = attrs.get("axis", 1 if imp.opset < 13 else -1) % rank
    if imp.opset < 13 and axis != rank - 1:
        raise CompileError(f"node {node.name!r} (Softmax): opset {imp.opset} softmax over axes {axis}.. is not "
                           "supported; export at opset 13 or newer")
    return "Softmax", list(node.input), {**attrs, "axis": axis}


REWRITES: dict[str, Rewrite] = {
    "Reshape": _reshape, "Flatten": _flatten, "Slice": _slice, "Split": _split,
    "Squeeze": _axes_input("Squeeze"), "Unsqueeze": _axes_input("Unsqueeze"),
    "ReduceMean": _axes_input("ReduceMean"), "ReduceSum": _axes_input("ReduceSum"),
    "ReduceMax": _axes_input("ReduceMax"), "Clip": _clip, "CastLike": _cast_like,
    "Expand": _expand, "Dropout": _dropout, "BatchNormalization": _batchnorm, "Softmax": _softmax_legacy,
}


def supported_onnx_ops() -> set[str]:
    ops = {name for name, op in REGISTRY.items() if not op.backward_only and op.kind not in ("loss", "optimizer")}
    return ops | {"Constant", "Flatten", "Dropout", "BatchNormalization"}


def import_onnx(source: str | os.PathLike | onnx.ModelProto, batch: int) -> Graph:
    """Read, check and import an ONNX model with the batch dimension fixed to ``batch``."""
    if batch < 1:
        raise CompileError(f"batch must be >= 1, got {batch}")
    model, recovery = recover_names(fuse_softplus_threshold(read_model(source)))
    graph = _Importer(model, batch).run()
    graph = fuse_gelu(graph).pruned(keep=graph.outputs)
    graph = graph.replace(notes={**graph.notes, **recovery.to_dict()})
    graph.check()
    return graph


# ---- ONNX rewrites ---------------------------------------------------------------------------------------
SOFTPLUS_THRESHOLD = 20.0


def fuse_softplus_threshold(model: onnx.ModelProto) -> onnx.ModelProto:
    """The dynamo exporter writes nn.Softplus as Where(x > 20, x, Softplus(x)); our Softplus has that threshold
    built in (PyTorch's), so the three nodes become one."""
    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    producers = {o: n for n in graph.node for o in n.output}
    drop, renames = set(), {}
    for node in graph.node:
        if node.op_type != "Where" or len(node.input) != 3:
            continue
        greater, soft = producers.get(node.input[0]), producers.get(node.input[2])
        if greater is None or soft is None or greater.op_type != "Greater" or soft.op_type != "Softplus":
            continue
        x = soft.input[0]
        threshold = consts.get(greater.input[1])
        if greater.input[0] != x or node.input[1] != x or threshold is None or threshold.size != 1 \
                or float(threshold.reshape(-1)[0]) != SOFTPLUS_THRESHOLD:
            continue
        drop.update({id(node), id(greater)})
        renames[soft.output[0]] = node.output[0]
    if not drop:
        return model
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    nodes = [n for n in graph.node if id(n) not in drop]
    del fused.graph.node[:]
    for n in nodes:
        copy = fused.graph.node.add()
        copy.CopyFrom(n)
        copy.output[:] = [renames.get(o, o) for o in copy.output]
    return fused


# ---- IR rewrites -----------------------------------------------------------------------------------------
def fuse_gelu(graph: Graph) -> Graph:
    """x·0.5·(1 + erf(x/√2)) in any of torch's operand orders → Gelu(x)."""
    producers, users = graph.producers(), graph.consumers()

    def const_near(name: str, value: float) -> bool:
        v = graph.values.get(name)
        return v is not None and v.size == 1 and abs(float(v.reshape(-1)[0]) - value) < 1e-4 * abs(value)

    def other(node: Node, name: str) -> str:
        return node.inputs[1] if node.inputs[0] == name else node.inputs[0]

    drop: set[str] = set()
    replace: dict[str, Node] = {}
    for erf in graph.nodes:
        if erf.op != "Erf":
            continue
        scale = producers.get(erf.inputs[0])
        if scale is None or len(users[erf.inputs[0]]) != 1:
            continue
        if scale.op == "Div" and const_near(scale.inputs[1], np.sqrt(2)):
            x = scale.inputs[0]
        elif scale.op == "Mul" and (const_near(scale.inputs[1], np.sqrt(0.5)) or const_near(scale.inputs[0], np.sqrt(0.5))):
            x = other(scale, scale.inputs[1] if const_near(scale.inputs[1], np.sqrt(0.5)) else scale.inputs[0])
        else:
            continue
        chain = [scale, erf]
        add = _single_user(users, erf.outputs[0], "Add")
        if add is None or not const_near(other(add, erf.outputs[0]), 1.0):
            continue
        chain.append(add)
        m1 = _single_user(users, add.outputs[0], "Mul")
        if m1 is None:
            continue
        chain.append(m1)
        partner = other(m1, add.outputs[0])
        if partner == x:  # (x · (1+erf)) · 0.5
            m2 = _single_user(users, m1.outputs[0], "Mul")
            if m2 is None or not const_near(other(m2, m1.outputs[0]), 0.5):
                continue
            chain.append(m2)
        else:  # (x · 0.5) · (1+erf)
            half = producers.get(partner)
            if half is None or half.op != "Mul" or x not in half.inputs or not const_near(other(half, x), 0.5):
                continue
            if len(users[partner]) != 1:
                continue
            chain.insert(0, half)
        last = chain[-1]
        if any(len(users[n.outputs[0]]) != 1 for n in chain[:-1] if n is not scale) or len(users[scale.outputs[0]]) != 1:
            continue
        for n in chain:
            drop.add(n.name)
        replace[last.name] = Node(last.name.rsplit("/", 1)[0] + "/Gelu" if "/" in last.name else last.name + ".gelu",
                                  "Gelu", (x,), last.outputs, {"approximate": "none"}, "forward", last.layer)
    if not replace:
        return graph
    nodes = tuple(replace.get(n.name, n) for n in graph.nodes if n.name not in drop or n.name in replace)
    used = {i for n in nodes for i in n.inputs} | set(graph.outputs) | set(graph.inputs)
    produced = {o for n in nodes for o in n.outputs}
    tensors = {k: v for k, v in graph.tensors.items() if k in used or k in produced}
    values = {k: v for k, v in graph.values.items() if k in tensors}
    return graph.replace(nodes=nodes, tensors=tensors, values=values)


def _single_user(users: dict[str, list[Node]], name: str, op: str) -> Node | None:
    found = users.get(name, [])
    return found[0] if len(found) == 1 and found[0].op == op else None
