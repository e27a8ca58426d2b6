"""An independent PyTorch interpreter of ONNX graphs: the oracle that compiled training is tested against.

It shares no code with ``compiler``: every op below is written from the ONNX specification with torch
ops, so torch's autograd gives reference gradients for any set of initializers (and LoRA factors).

    oracle = TorchOnnx(model, trainable={"classifier.weight"}, lora={"blocks.0.attn.q": LoraFactors(a, b, 8.0)})
    loss = oracle.forward(x).square().mean()
    loss.backward()
    grads = {name: p.grad for name, p in oracle.parameters().items()}

Each op is one function ``op(ctx, *inputs, **attributes)``: inputs arrive positionally (None where the
optional input is absent), attributes as keyword arguments whose defaults are the schema's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

Tensor = torch.Tensor
OpFn = Callable[..., "Tensor | tuple[Tensor, ...]"]
OPS: dict[str, OpFn] = {}


@dataclass(frozen=True)
class LoraFactors:
    """A low-rank update (alpha / r) · (x @ a) @ b added to a MatMul or Gemm output; a: (in, r), b: (r, out).
    On a Conv (PEFT's conv LoRA): (alpha / r) · conv1x1(conv(x, a), b), a: (r, C, kernel) with the node's window,
    b: (M, r, 1…)."""
    a: Any  # torch.Tensor or np.ndarray
    b: Any
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0] if len(self.a.shape) > 2 else self.a.shape[1])


@dataclass(frozen=True)
class Context:
    """What an op may need beyond its inputs: the float dtype, the model's opset and the node itself."""
    dtype: torch.dtype
    opset: int
    node: onnx.NodeProto


def op(*names: str) -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        for name in names:
            if name in OPS:
                raise TypeError(f"op {name!r} registered twice")
            OPS[name] = fn
        return fn
    return register


class TorchOnnx:
    """Evaluates an ONNX graph with torch ops; initializers named in ``trainable`` are leaves with grads.

    ``dtype`` is the float type of every float tensor (initializers, inputs, Cast-to-float results).
    LoRA factors are copied into fresh leaves, returned by ``parameters()`` as ``<node>.lora_a`` / ``.lora_b``.
    """

    def __init__(self, model: onnx.ModelProto, trainable: Iterable[str] | None = None,
                 lora: Mapping[str, LoraFactors] | None = None, dtype: torch.dtype = torch.float64):
        self.model = model
        self.dtype = dtype
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        graph = model.graph
        self.weights: dict[str, Tensor] = {i.name: _to_torch(numpy_helper.to_array(i), dtype)
                                           for i in graph.initializer}
        trainable = set(trainable or ())
        unknown = trainable - set(self.weights)
        if unknown:
            raise ValueError(f"trainable names are not initializers: {sorted(unknown)}")
        self._params: dict[str, Tensor] = {}
        for name in sorted(trainable):
            if not self.weights[name].is_floating_point():
                raise ValueError(f"initializer {name!r} is not floating point and cannot be trained")
            self.weights[name] = self.weights[name].detach().clone().requires_grad_(True)
            self._params[name] = self.weights[name]
        self.lora: dict[str, tuple[Tensor, Tensor, float]] = {}
        nodes = {n.name: n for n in graph.node}
        for name, factors in (lora or {}).items():
            node = nodes.get(name)
            if node is None or node.op_type not in ("MatMul", "Gemm", "Conv"):
                raise ValueError(f"LoRA target {name!r} is not a MatMul, Gemm or Conv node")
            a = _to_torch(factors.a, dtype).detach().clone().requires_grad_(True)
            b = _to_torch(factors.b, dtype).detach().clone().requires_grad_(True)
            self._params[f"{name}.lora_a"], self._params[f"{name}.lora_b"] = a, b
            self.lora[name] = (a, b, factors.alpha / factors.rank)
        init_names = set(self.weights)
        self.input_names = [i.name for i in graph.input if i.name not in init_names]
        self.output_names = [o.name for o in graph.output]

    def parameters(self) -> dict[str, Tensor]:
        """The trainable leaves by name: initializers, then LoRA factors."""
        return dict(self._params)

    def forward(self, *inputs: Any) -> Tensor | tuple[Tensor, ...]:
        """The graph output(s) for positional inputs in graph-input order (numpy arrays or tensors)."""
        if len(inputs) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        values = self.run(dict(zip(self.input_names, inputs)))
        outputs = tuple(values[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs

    __call__ = forward

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Tensor]:
        """Every value of the graph (initializers, inputs, node outputs) by name."""
        values: dict[str, Tensor] = dict(self.weights)
        for name, value in feeds.items():
            values[name] = _to_torch(value, self.dtype)
        for node in self.model.graph.node:
            self._run_node(node, values)
        return values

    def _run_node(self, node: onnx.NodeProto, values: dict[str, Tensor]) -> None:
        where = f"node {node.name!r} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            raise NotImplementedError(f"TorchOnnx: unsupported op domain {node.domain!r} at {where}")
        fn = OPS.get(node.op_type)
        if fn is None:
            raise NotImplementedError(f"TorchOnnx: unsupported op {node.op_type!r} at {where}")
        inputs = [values[i] if i else None for i in node.input]
        attrs = {a.name: _attribute(a, self.dtype) for a in node.attribute}
        try:
            result = fn(Context(self.dtype, self.opset, node), *inputs, **attrs)
        except NotImplementedError as exc:
            raise NotImplementedError(f"TorchOnnx: {where}: {exc}") from exc
        except Exception as exc:
            raise RuntimeError(f"TorchOnnx: {where}: {exc}") from exc
        results = result if isinstance(result, tuple) else (result,)
        if node.name in self.lora:
            a, b, scale = self.lora[node.name]
            if node.op_type == "Conv":
                window = {k: v for k, v in attrs.items() if k not in ("kernel_shape", "group")}
                branch = conv(Context(self.dtype, self.opset, node), conv(Context(self.dtype, self.opset, node),
                                                                           inputs[0], a, **window), b)
            else:
                x = inputs[0].transpose(-1, -2) if node.op_type == "Gemm" and attrs.get("transA", 0) else inputs[0]
                branch = (x @ a) @ b
            results = (results[0] + scale * branch,) + results[1:]
        if len(results) < len(node.output):
            raise NotImplementedError(f"TorchOnnx: {where}: only {len(results)} output(s) supported")
        for name, value in zip(node.output, results):
            if name:
                values[name] = value


# ---- conversions ---------------------------------------------------------------------------------------
def _to_torch(value: Any, dtype: torch.dtype) -> Tensor:
    """A tensor of ``value``; floats in ``dtype``. Tensors keep their autograd history."""
    t = value if isinstance(value, Tensor) else torch.from_numpy(np.array(value, copy=True))
    return t.to(dtype) if t.is_floating_point() else t


def _attribute(attr: onnx.AttributeProto, dtype: torch.dtype) -> Any:
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return _to_torch(numpy_helper.to_array(value), dtype)
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


ONNX_TO_TORCH = {
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


# ---- padding shared by Conv and the pools ---------------------------------------------------------------
def _pads(auto_pad: str, pads: list[int] | None, spatial: Iterable[int], kernel: list[int], strides: list[int],
          dilations: list[int]) -> list[int]:
    """ONNX pads [x1_begin, x2_begin, …, x1_end, x2_end], resolving auto_pad."""
    spatial = list(spatial)
    nd = len(spatial)
    if auto_pad in ("NOTSET", ""):
        return list(pads) if pads else [0] * (2 * nd)
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise NotImplementedError(f"auto_pad={auto_pad!r}")
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin + end


def _pad(x: Tensor, pads: list[int], value: float) -> Tensor:
    nd = len(pads) // 2
    if not any(pads):
        return x
    torch_pads: list[int] = []
    for i in reversed(range(nd)):  # F.pad starts from the last dimension
        torch_pads += [pads[i], pads[i + nd]]
    return F.pad(x, torch_pads, value=value)


def _window(x: Tensor, kernel_shape, strides, dilations, pads, auto_pad):
    nd = x.dim() - 2
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    return strides, dilations, _pads(auto_pad, pads, x.shape[2:], list(kernel_shape), strides, dilations)


# ---- linear algebra ------------------------------------------------------------------------------------
@op("Conv")
def conv(ctx, x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None,
         strides=None):
    kernel = list(kernel_shape or w.shape[2:])
    strides, dilations, pads = _window(x, kernel, strides, dilations, pads, auto_pad)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    return fn(_pad(x, pads, 0.0), w, b, stride=strides, dilation=dilations, groups=group)


@op("Gemm")
def gemm(ctx, a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    y = alpha * ((a.T if transA else a) @ (b.T if transB else b))
    return y if c is None else y + beta * c


@op("MatMul")
def matmul(ctx, a, b):
    return torch.matmul(a, b)


# ---- elementwise ---------------------------------------------------------------------------------------
@op("Add")
def add(ctx, a, b):
    return a + b


@op("Sub")
def sub(ctx, a, b):
    return a - b


@op("Mul")
def mul(ctx, a, b):
    return a * b


@op("Div")
def div(ctx, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


@op("Pow")
def pow_(ctx, x, y):
    return torch.pow(x, y)


@op("Sqrt")
def sqrt(ctx, x):
    return torch.sqrt(x)


@op("Neg")
def neg(ctx, x):
    return -x


@op("Exp")
def exp(ctx, x):
    return torch.exp(x)


@op("Log")
def log(ctx, x):
    return torch.log(x)


@op("Relu")
def relu(ctx, x):
    return torch.relu(x)


@op("Erf")
def erf(ctx, x):
    return torch.erf(x)


@op("Gelu")
def gelu(ctx, x, *, approximate="none"):
    return F.gelu(x, approximate=approximate)


@op("Sigmoid")
def sigmoid(ctx, x):
    return torch.sigmoid(x)


@op("Tanh")
def tanh(ctx, x):
    return torch.tanh(x)


@op("Identity")
def identity(ctx, x):
    return x


@op("Dropout")
def dropout(ctx, x, ratio=None, training_mode=None, *, seed=None):
    if training_mode is not None and bool(training_mode):
        raise NotImplementedError("training_mode=True")
    return x, torch.ones_like(x, dtype=torch.bool)


@op("Cast")
def cast(ctx, x, *, to, saturate=1, round_mode="up"):
    if to in FLOAT_TYPES:
        return x.to(ctx.dtype)
    if to not in ONNX_TO_TORCH:
        raise NotImplementedError(f"Cast to {onnx.TensorProto.DataType.Name(to)}")
    return x.to(ONNX_TO_TORCH[to])


# ---- normalisation and softmax -------------------------------------------------------------------------
@op("Softmax")
def softmax(ctx, x, *, axis=None):
    if ctx.opset >= 13:
        return torch.softmax(x, dim=-1 if axis is None else axis)
    axis = (1 if axis is None else axis) % x.dim()  # before opset 13: softmax of the 2-D flattening at axis
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    return torch.softmax(flat, dim=1).reshape(x.shape)


@op("LayerNormalization")
def layer_normalization(ctx, x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    dims = tuple(range(axis % x.dim(), x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(var + epsilon)
    y = (x - mean) * inv_std * scale
    return (y if bias is None else y + bias), mean, inv_std


@op("BatchNormalization")
def batch_normalization(ctx, x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0,
                        spatial=1):
    if training_mode:
        raise NotImplementedError("training_mode=1")
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + epsilon) * scale.reshape(shape) \
        + bias.reshape(shape)


# ---- pooling -------------------------------------------------------------------------------------------
@op("MaxPool")
def max_pool(ctx, x, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, pads=None,
             storage_order=0, strides=None):
    if len(ctx.node.output) > 1 and ctx.node.output[1]:
        raise NotImplementedError("the Indices output")
    strides, dilations, pads = _window(x, kernel_shape, strides, dilations, pads, auto_pad)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[x.dim() - 2]
    return fn(_pad(x, pads, -math.inf), list(kernel_shape), strides, 0, dilations, ceil_mode=bool(ceil_mode))


@op("AveragePool")
def average_pool(ctx, x, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None,
                 pads=None, strides=None):
    strides, dilations, pads = _window(x, kernel_shape, strides, dilations, pads, auto_pad)
    if any(d != 1 for d in dilations):
        raise NotImplementedError("dilations")
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[x.dim() - 2]

    def pool(t: Tensor) -> Tensor:
        return fn(t, list(kernel_shape), strides, 0, ceil_mode=bool(ceil_mode))

    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    counted = _pad(ones, pads, 1.0 if count_include_pad else 0.0)
    return pool(_pad(x, pads, 0.0)) / pool(counted)  # torch's own divisor cancels out


@op("GlobalAveragePool")
def global_average_pool(ctx, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


# ---- reductions ----------------------------------------------------------------------------------------
def _reduce(fn, x, axes, keepdims, noop_with_empty_axes):
    axes = _ints(axes) if isinstance(axes, Tensor) else axes
    if not axes:
        if noop_with_empty_axes:
            return x
        axes = list(range(x.dim()))
    return fn(x, dim=tuple(axes), keepdim=bool(keepdims))


@op("ReduceMean")
def reduce_mean(ctx, x, axes_input=None, *, axes=None, keepdims=1, noop_with_empty_axes=0):
    return _reduce(torch.mean, x, axes_input if axes_input is not None else axes, keepdims, noop_with_empty_axes)


@op("ReduceSum")
def reduce_sum(ctx, x, axes_input=None, *, axes=None, keepdims=1, noop_with_empty_axes=0):
    return _reduce(torch.sum, x, axes_input if axes_input is not None else axes, keepdims, noop_with_empty_axes)


# ---- shapes and data movement --------------------------------------------------------------------------
@op("Constant")
def constant(ctx, *, value=None, value_float=None, value_floats=None, value_int=None, value_ints=None):
    if value is not None:
        return value
    if value_float is not None or value_floats is not None:
        return torch.tensor(value_float if value_float is not None else value_floats, dtype=ctx.dtype)
    if value_int is not None or value_ints is not None:
        return torch.tensor(value_int if value_int is not None else value_ints, dtype=torch.int64)
    raise NotImplementedError("Constant without value/value_float(s)/value_int(s)")


@op("Shape")
def shape(ctx, x, *, start=0, end=None):
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


@op("Reshape")
def reshape(ctx, x, shape_t, *, allowzero=0):
    shape = _ints(shape_t)
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("Flatten")
def flatten(ctx, x, *, axis=1):
    axis = axis % x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Transpose")
def transpose(ctx, x, *, perm=None):
    return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


@op("Concat")
def concat(ctx, *inputs, axis):
    return torch.cat([t for t in inputs if t is not None], dim=axis)


@op("Split")
def split(ctx, x, split_input=None, *, axis=0, num_outputs=None, split=None):
    sizes = _ints(split_input) if split_input is not None else split
    if sizes is None:
        parts = num_outputs or len(ctx.node.output)
        step = -(-x.shape[axis] // parts)  # the last part may be smaller
        sizes = [min(step, x.shape[axis] - i * step) for i in range(parts)]
    return tuple(torch.split(x, list(sizes), dim=axis))


@op("Slice")
def slice_(ctx, x, starts_in=None, ends_in=None, axes_in=None, steps_in=None, /, *, starts=None, ends=None,
           axes=None):
    if starts is None:  # opset 10+: inputs; before: attributes
        starts, ends, axes = _ints(starts_in), _ints(ends_in), _ints(axes_in)
    steps = _ints(steps_in)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        # Python's slice clamps exactly as ONNX does, negative steps included
        index = list(range(x.shape[axis]))[slice(start, end, step)]
        x = x.index_select(axis % x.dim(), torch.tensor(index, dtype=torch.int64))
    return x


@op("Gather")
def gather(ctx, x, indices, *, axis=0):
    axis %= x.dim()
    idx = torch.where(indices < 0, indices + x.shape[axis], indices).to(torch.int64)
    picked = x.index_select(axis, idx.reshape(-1))
    return picked.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1:])


@op("Unsqueeze")
def unsqueeze(ctx, x, axes_input=None, *, axes=None):
    axes = _ints(axes_input) if axes_input is not None else axes
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


@op("Squeeze")
def squeeze(ctx, x, axes_input=None, *, axes=None):
    axes = _ints(axes_input) if axes_input is not None else axes
    if not axes:
        return x.reshape([s for s in x.shape if s != 1])
    drop = {a % x.dim() for a in axes}
    return x.reshape([s for i, s in enumerate(x.shape) if i not in drop])
