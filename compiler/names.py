"""PyTorch module paths for an exported ONNX model, whatever the exporter did to the names.

- Module path of a node: the dynamo exporter records it in the node's metadata (``pkg.torch.onnx.name_scopes``,
  the last entry being the aten op); TorchScript in the node name, ``/blocks/blocks.0/mlp/fc1/MatMul``, where a
  child of an ``nn.Sequential`` repeats the parent's prefix (``blocks`` then ``blocks.0``), undone here.
- Untying: TorchScript's constant folding merges initializers of equal value (fresh LayerNorm weights, zero
  biases) into one read through Identity nodes named after the other parameters; the dynamo exporter merges
  them too and lets layers read another layer's parameter. Each such reader gets its own copy under its own
  name, so each trains on its own as in PyTorch. A parameter read by one module only (really shared, e.g. a
  module called twice) stays one tensor.
- Anonymous weights: a 3-D ``nn.Linear`` exports its transposed weight as ``onnx::MatMul_N`` (TorchScript) or
  ``val_N`` (dynamo). Read by a MatMul/Gemm/Conv in module ``m``, it is renamed ``m.weight`` (or
  ``m.<p>_weight`` when the bias added to the product is ``m.<p>_bias``, as ``in_proj_bias``). The values keep
  the layout the graph uses (MatMul's (in, out), the transpose of PyTorch's (out, in)).

``recover_names`` returns the rewritten model and a ``NameRecovery`` saying what was renamed and untied.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
RULE_KEY = "pkg.onnxscript.rewriter.rule_name"
ANONYMOUS = re.compile(r"^(onnx::.*|val_\d+|_val_\d+|.*::.*|/.*)$")
WEIGHT_READERS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "PRelu": 1}


@dataclass(frozen=True)
class NameRecovery:
    renamed: dict[str, str] = field(default_factory=dict)   # exporter's name -> module path name
    untied: dict[str, str] = field(default_factory=dict)    # new tensor -> the merged tensor it was a copy of
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"renamed": dict(self.renamed), "untied": dict(self.untied), "warnings": list(self.warnings)}


def _join_scopes(parts: list[str]) -> str:
    """Scopes to a module path. Dynamo's are full paths ('features', 'features.0', 'features.0.conv'); TorchScript
    names a Sequential's child by the Sequential's attribute and the index ('features', 'features.0', 'conv',
    'conv.0'): a part that extends the path so far, or its last component, replaces it."""
    path = ""
    for part in parts:
        if not part:
            continue
        head, _, last = path.rpartition(".")
        if path and (part == path or part.startswith(path + ".")):
            path = part
        elif path and part.startswith(last + "."):
            path = f"{head}.{part}" if head else part
        else:
            path = f"{path}.{part}" if path else part
    return path


def module_path(node: onnx.NodeProto) -> str:
    """The PyTorch module a node came from ('' for the top-level module or when nothing was recorded)."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            if isinstance(scopes, list) and len(scopes) >= 2:
                return _join_scopes([str(s) for s in scopes[:-1]])
            return ""
    name = node.name or ""
    if name.startswith("/"):
        parts = [p for p in name.strip("/").split("/") if p]
        if parts and parts[-1].split("_")[0] == node.op_type:
            parts = parts[:-1]
        return _join_scopes(parts)
    return ""


def layer_suffix(name: str) -> tuple[str, str]:
    """('blocks.0.norm1', 'weight') for 'blocks.0.norm1.weight'."""
    layer, _, suffix = name.rpartition(".")
    return layer, suffix


def recover_names(model: onnx.ModelProto) -> tuple[onnx.ModelProto, NameRecovery]:
    """A copy of ``model`` with Identity-merged and cross-module-shared initializers untied and anonymous
    weights named by their module path."""
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    graph = model_copy.graph
    inits = {i.name: i for i in graph.initializer}
    recovery = NameRecovery()
    _untie_identities(graph, inits, recovery)
    _restore_removed_biases(graph, inits, recovery)
    paths = [module_path(n) for n in graph.node]
    _untie_across_modules(graph, inits, paths, recovery)
    _name_anonymous(graph, inits, paths, recovery)
    return model_copy, recovery


def _new_initializer(graph: onnx.GraphProto, inits: dict, source: str, name: str) -> None:
    copy = numpy_helper.from_array(numpy_helper.to_array(inits[source]).copy(), name)
    graph.initializer.append(copy)
    inits[name] = copy


def _untie_identities(graph: onnx.GraphProto, inits: dict, recovery: NameRecovery) -> None:
    """Identity(initializer) -> its own initializer under the Identity's output name (a parameter name)."""
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in inits \
                and not ANONYMOUS.match(node.output[0]):
            _new_initializer(graph, inits, node.input[0], node.output[0])
            recovery.untied[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _restore_removed_biases(graph: onnx.GraphProto, inits: dict, recovery: NameRecovery) -> None:
    """The dynamo exporter's optimizer drops a Gemm bias that is all zeros (a fresh nn.MultiheadAttention's
    out_proj.bias): the parameter is put back, zeros, so it trains as in PyTorch."""
    for node in graph.node:
        rules = [p.value for p in node.metadata_props if p.key == RULE_KEY]
        if node.op_type != "Gemm" or "RemoveOptionalBiasFromGemm" not in rules or len(node.input) != 2:
            continue
        weight = node.input[1]
        layer, suffix = layer_suffix(weight)
        if weight not in inits or suffix != "weight" or f"{layer}.bias" in inits:
            continue
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        dims = tuple(inits[weight].dims)
        bias = numpy_helper.from_array(np.zeros(dims[0] if trans_b else dims[1], np.float32), f"{layer}.bias")
        graph.initializer.append(bias)
        inits[bias.name] = bias
        node.input.append(bias.name)
        recovery.renamed[f"(removed by the exporter) {bias.name}"] = bias.name


def _untie_across_modules(graph: onnx.GraphProto, inits: dict, paths: list[str], recovery: NameRecovery) -> None:
    """A named parameter read by nodes of two or more modules: each module other than its own gets a copy."""
    readers: dict[str, set[str]] = {}
    for node, path in zip(graph.node, paths):
        for name in node.input:
            if name in inits:
                readers.setdefault(name, set()).add(path)
    for node, path in zip(graph.node, paths):
        for index, name in enumerate(node.input):
            if name not in inits or ANONYMOUS.match(name) or not path or len(readers[name]) < 2:
                continue
            layer, suffix = layer_suffix(name)
            if not layer or layer == path or path.startswith(layer + ".") or layer.startswith(path + "."):
                continue  # its own module, an ancestor's parameter, or a descendant's used functionally
            own = f"{path}.{suffix}"
            if own not in inits:
                _new_initializer(graph, inits, name, own)
                recovery.untied[own] = name
            if recovery.untied.get(own) == name:
                node.input[index] = own
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2].endswith("weight_bias"):
            recovery.warnings.append(_folded_bn(path or node.name, node.input[1]))


def _folded_bn(layer: str, weight: str) -> str:
    return (f"the weight of {layer!r} ({weight!r}) is not the PyTorch model's: the exporter folded a BatchNorm into "
            "it, so training it differs from training the PyTorch model; export with do_constant_folding=False "
            "(TorchScript) or optimize=False (dynamo)")


def _name_anonymous(graph: onnx.GraphProto, inits: dict, paths: list[str], recovery: NameRecovery) -> None:
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    renames: dict[str, str] = {}
    for i, (node, path) in enumerate(zip(graph.node, paths)):
        index = WEIGHT_READERS.get(node.op_type)
        if index is None or len(node.input) <= index or not path:
            continue
        weight = node.input[index]
        if weight not in inits or not ANONYMOUS.match(weight) or weight in renames:
            continue
        prefix = ""
        for j in consumers.get(node.output[0], []):  # the bias added to the product names the weight
            for other in graph.node[j].input:
                layer, suffix = layer_suffix(other)
                if other in inits and layer == path and suffix.endswith("bias"):
                    prefix = suffix[: -len("bias")]
        target = f"{path}.{prefix}weight"
        if target in inits or target in renames.values():
            continue
        renames[weight] = target
        if node.op_type == "Conv":
            recovery.warnings.append(_folded_bn(path, weight))
        if node.op_type == "MatMul":  # an anonymous bias added right after
            for j in consumers.get(node.output[0], []):
                add = graph.node[j]
                if add.op_type == "Add":
                    for other in add.input:
                        if other in inits and ANONYMOUS.match(other) and f"{path}.{prefix}bias" not in inits:
                            renames[other] = f"{path}.{prefix}bias"
    for old, new in renames.items():
        inits[old].name = new
        inits[new] = inits.pop(old)
        recovery.renamed[old] = new
    if renames:
        for node in graph.node:
            for k, name in enumerate(node.input):
                if name in renames:
                    node.input[k] = renames[name]
        for info in graph.input:
            if info.name in renames:
                info.name = renames[info.name]
