"""What every zoo model is built from: seeded initializers, uniquely named nodes and the layer helpers.

Naming contract (the frontend's ``layer_of`` and the tests rely on it):
- a weighted layer ``L`` has initializers ``L.weight`` / ``L.bias`` and its main node is named ``L``;
- every other node is named ``<layer>/<OpType>`` (torch's ``_1``, ``_2`` suffixes when repeated), so the
  part before the first '/' is the layer it belongs to;
- initializers hold parameters only; shapes and scalars are ``Constant`` nodes, as torch.onnx exports them.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17            # the first opset with LayerNormalization
IR_VERSION = 8        # the IR version that introduced opset 17; every onnxruntime since 1.12 loads it
BATCH_DIM = "batch"   # dim_param of the dynamic batch axis on the input and the output
INPUT_NAME = "input"
OUTPUT_NAME = "output"
RELU_GAIN = math.sqrt(2.0)   # kaiming gain of layers followed by ReLU/GELU
LAYER_NORM_EPSILON = 1e-5    # torch.nn.LayerNorm's default
# Norm layers start near (not at) their identity init, so that a compiler ignoring the affine part, the
# running statistics or epsilon gives visibly wrong numbers.
NORM_JITTER = 0.1


def kaiming_uniform(rng: np.random.Generator, shape: Sequence[int], fan_in: int, gain: float = 1.0) -> np.ndarray:
    """U(-b, b) with b = gain·√(3/fan_in): unit-variance inputs give outputs of variance gain²."""
    bound = gain * math.sqrt(3.0 / fan_in)
    return rng.uniform(-bound, bound, size=tuple(shape)).astype(np.float32)


def bias_uniform(rng: np.random.Generator, size: int, fan_in: int) -> np.ndarray:
    """PyTorch's default bias init: U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=(size,)).astype(np.float32)


def trunc_normal(rng: np.random.Generator, shape: Sequence[int], std: float) -> np.ndarray:
    """N(0, std²) truncated at ±2·std, as timm/CCT initialise positional embeddings."""
    return np.clip(rng.normal(0.0, std, size=tuple(shape)), -2 * std, 2 * std).astype(np.float32)


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of all floating-point initializers (BatchNorm running statistics included, as Keras counts)."""
    floats = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)
    return sum(int(np.prod(init.dims, dtype=np.int64)) for init in model.graph.initializer
               if init.data_type in floats)


class GraphBuilder:
    """Collects nodes and initializers for one model; each helper returns the name of its output tensor."""

    def __init__(self, name: str, seed: int):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._node_names: set[str] = set()

    # ---- primitives ----------------------------------------------------------------------------------
    def param(self, name: str, value: np.ndarray) -> str:
        if any(init.name == name for init in self.initializers):
            raise ValueError(f"{self.name}: initializer {name!r} defined twice")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(self, op_type: str, inputs: Sequence[str], name: str, output: str | None = None, **attrs) -> str:
        name = self._unique(name)
        out = output or f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def constant(self, layer: str, value: np.ndarray) -> str:
        return self.node("Constant", [], f"{layer}/Constant", value=numpy_helper.from_array(np.asarray(value)))

    def scalar(self, layer: str, value: float) -> str:
        return self.constant(layer, np.array(value, np.float32))

    def _unique(self, name: str) -> str:
        candidate, n = name, 0
        while candidate in self._node_names:
            n += 1
            candidate = f"{name}_{n}"
        self._node_names.add(candidate)
        return candidate

    # ---- layers --------------------------------------------------------------------------------------
    def linear(self, layer: str, x: str, fan_in: int, fan_out: int, gain: float = 1.0,
               output: str | None = None) -> str:
        """MatMul by a (in, out) weight, then Add of the bias: torch's export of nn.Linear on N-d input."""
        w = self.param(f"{layer}.weight", kaiming_uniform(self.rng, (fan_in, fan_out), fan_in, gain))
        b = self.param(f"{layer}.bias", bias_uniform(self.rng, fan_out, fan_in))
        y = self.node("MatMul", [x, w], layer)
        return self.node("Add", [y, b], f"{layer}/Add", output=output)

    def gemm(self, layer: str, x: str, fan_in: int, fan_out: int, gain: float = 1.0,
             output: str | None = None) -> str:
        """Gemm with an (out, in) weight and transB=1: torch's export of nn.Linear on 2-D input."""
        w = self.param(f"{layer}.weight", kaiming_uniform(self.rng, (fan_out, fan_in), fan_in, gain))
        b = self.param(f"{layer}.bias", bias_uniform(self.rng, fan_out, fan_in))
        return self.node("Gemm", [x, w, b], layer, output=output, alpha=1.0, beta=1.0, transB=1)

    def conv(self, layer: str, x: str, c_in: int, c_out: int, kernel: Sequence[int],
             strides: Sequence[int] = (1, 1), pads: Sequence[int] = (0, 0, 0, 0), group: int = 1,
             bias: bool = True, gain: float = RELU_GAIN) -> str:
        fan_in = (c_in // group) * int(np.prod(kernel))
        inputs = [x, self.param(f"{layer}.weight",
                                kaiming_uniform(self.rng, (c_out, c_in // group, *kernel), fan_in, gain))]
        if bias:
            inputs.append(self.param(f"{layer}.bias", bias_uniform(self.rng, c_out, fan_in)))
        return self.node("Conv", inputs, layer, dilations=[1] * len(kernel), group=group,
                         kernel_shape=list(kernel), pads=list(pads), strides=list(strides))

    def layer_norm(self, layer: str, x: str, dim: int) -> str:
        scale = self.param(f"{layer}.weight", 1 + self.rng.uniform(-NORM_JITTER, NORM_JITTER, dim))
        shift = self.param(f"{layer}.bias", self.rng.uniform(-NORM_JITTER, NORM_JITTER, dim))
        return self.node("LayerNormalization", [x, scale, shift], layer, axis=-1, epsilon=LAYER_NORM_EPSILON)

    def batch_norm(self, layer: str, x: str, channels: int, epsilon: float) -> str:
        """Inference-form BatchNormalization with torch-named scale, bias and running statistics."""
        def jitter() -> np.ndarray:
            return self.rng.uniform(-NORM_JITTER, NORM_JITTER, channels)
        inputs = [x, self.param(f"{layer}.weight", 1 + jitter()), self.param(f"{layer}.bias", jitter()),
                  self.param(f"{layer}.running_mean", jitter()), self.param(f"{layer}.running_var", 1 + jitter())]
        return self.node("BatchNormalization", inputs, layer, epsilon=epsilon)

    def relu(self, layer: str, x: str) -> str:
        return self.node("Relu", [x], f"{layer}/Relu")

    def gelu(self, layer: str, x: str) -> str:
        """Exact GELU as torch.onnx exports it at opset 17: ((x / √2) → Erf → +1) · x · 0.5."""
        y = self.node("Div", [x, self.scalar(layer, math.sqrt(2.0))], f"{layer}/Div")
        y = self.node("Erf", [y], f"{layer}/Erf")
        y = self.node("Add", [y, self.scalar(layer, 1.0)], f"{layer}/Add")
        y = self.node("Mul", [x, y], f"{layer}/Mul")
        return self.node("Mul", [y, self.scalar(layer, 0.5)], f"{layer}/Mul")

    def reshape(self, layer: str, x: str, shape: Sequence[int]) -> str:
        return self.node("Reshape", [x, self.constant(layer, np.array(shape, np.int64))], f"{layer}/Reshape")

    # ---- the model -----------------------------------------------------------------------------------
    def finish(self, input_shape: Sequence[int], output_shape: Sequence[int], doc: str = "") -> onnx.ModelProto:
        """The model with input ``input`` (batch, *input_shape) and output ``output`` (batch, *output_shape)."""
        inp = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, *input_shape])
        out = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, *output_shape])
        graph = helper.make_graph(self.nodes, self.name, [inp], [out], initializer=self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                                 producer_name="edgefleet.zoo", doc_string=doc)
