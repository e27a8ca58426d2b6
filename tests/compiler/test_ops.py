"""Every registered op: forward against onnxruntime, gradient rule against PyTorch autograd.

CASES holds the test inputs of every op and TORCH a PyTorch reference for every op with a gradient rule, so a
new op without test cases fails ``test_every_op_has_cases``, and a backward op no gradient test reaches
fails ``test_every_backward_op_is_exercised``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from compiler.autodiff import differentiate
from compiler.ir import CompileError, Graph, Node, Role, TensorSpec
from compiler.ops import REGISTRY, Op, get_op
from compiler.reference import evaluate

OPSET = 20       # the first opset with Gelu
IR_VERSION = 10  # what onnxruntime 1.18+ accepts
SEED = 0


# ---- test inputs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Input:
    shape: tuple[int, ...]
    kind: str = "normal"       # normal | positive | labels | fixed
    trainable: bool = True     # differentiated in the gradient test (floats only)
    classes: int = 0           # labels are drawn from range(classes)
    value: Any = None          # the array of a fixed input

    def make(self, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "fixed":
            return np.asarray(self.value)
        if self.kind == "labels":
            return rng.integers(0, self.classes, self.shape).astype(np.int64)
        if self.kind == "positive":
            return rng.uniform(0.5, 2.0, self.shape)
        return rng.standard_normal(self.shape)


def pos(*shape: int) -> Input:
    return Input(shape, "positive")


def frozen(*shape: int, kind: str = "normal") -> Input:
    return Input(shape, kind, trainable=False)


def labels(shape: tuple[int, ...], classes: int) -> Input:
    return Input(shape, "labels", trainable=False, classes=classes)


def fixed(value: Any) -> Input:
    value = np.asarray(value)
    return Input(value.shape, "fixed", trainable=False, value=value)


def _int8(*shape: int, edges: bool = False) -> np.ndarray:
    """Fixed int8 values over the whole range (with ``edges``: some exactly at −128 and 127)."""
    v = np.random.default_rng(int(np.prod(shape))).integers(-128, 128, shape).astype(np.int8)
    if edges:
        v.reshape(-1)[::5] = -128
        v.reshape(-1)[1::7] = 127
    return v


def _int32(*shape: int) -> np.ndarray:
    return np.random.default_rng(7).integers(-5000, 5000, shape).astype(np.int32)


def _scale(n: int, size: float = 1e-2) -> np.ndarray:
    return (np.random.default_rng(n).uniform(0.5, 2.0, n) * size).astype(np.float32)


@dataclass(frozen=True)
class Case:
    inputs: tuple[Input, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    onnx: bool = True  # compare the forward with onnxruntime
    grad: bool = True  # compare the gradient with PyTorch


def case(*inputs: Input | tuple[int, ...], id: str = "", onnx: bool = True, grad: bool = True,
         **attrs: Any) -> Case:
    inputs = tuple(i if isinstance(i, Input) else Input(tuple(i)) for i in inputs)
    return Case(inputs, attrs, id, onnx, grad)


CASES: dict[str, list[Case]] = {
    # elementwise
    "Add": [case((3, 4), (3, 4)), case((2, 3, 4), (4,), id="broadcast"), case((3, 1), (1, 4), id="outer")],
    "Sub": [case((3, 4), (1, 4))],
    "Mul": [case((3, 4), (3, 1))],
    "Div": [case((3, 4), pos(4))],
    "Neg": [case((3, 4))],
    "Relu": [case((3, 4))],
    "Sigmoid": [case((3, 4))],
    "Tanh": [case((3, 4))],
    "Gelu": [case((3, 4)), case((3, 4), approximate="tanh", id="tanh")],
    "Erf": [case((3, 4))],
    "Sqrt": [case(pos(3, 4))],
    "Exp": [case((3, 4))],
    "Pow": [case(pos(3, 4), fixed(3.0)), case(pos(3, 4), fixed(0.5), id="sqrt")],
    "Clip": [case((3, 4), min=-0.5, max=0.5), case((3, 4), min=0.0, max=6.0, id="relu6"),
             case((3, 4), min=0.0, id="min only")],
    "LeakyRelu": [case((3, 4)), case((3, 4), alpha=0.2, id="alpha")],
    "HardSigmoid": [case((3, 4)), case(Input((3, 4), "fixed", value=np.linspace(-5, 5, 12).reshape(3, 4) + 0.01),
                                       alpha=1 / 6, id="torch", grad=False), case((3, 4), alpha=1 / 6, id="torch grad")],
    "HardSwish": [case(Input((3, 4), "fixed", value=np.linspace(-5, 5, 12).reshape(3, 4) + 0.01), grad=False,
                       id="all pieces"), case((4, 5))],
    "Elu": [case((3, 4)), case((3, 4), alpha=0.5, id="alpha")],
    "Softplus": [case((3, 4)), case(Input((2, 3), "fixed", value=np.array([[-30.0, -1, 0], [1, 19.5, 25]])),
                                    grad=False, id="thresholds")],
    "PRelu": [case((2, 3, 4, 4), (3, 1, 1)), case((3, 5), (5,), id="row slope")],
    "Where": [case(fixed(np.array([[True, False, True, False]] * 3)), (3, 4), (3, 4)),
              case(fixed(np.array([True, False, True, True])), (2, 3, 4), (1,), id="broadcast")],
    # linear
    "MatMul": [case((3, 4), (4, 5)), case((2, 3, 4), (4, 5), id="batch x 2-D"),
               case((2, 3, 4), (2, 4, 5), id="batched")],
    "Gemm": [case((3, 4), (4, 5), (5,)), case((3, 4), (5, 4), transB=1, id="transB"),
             case((4, 3), (5, 4), (3, 5), transA=1, transB=1, alpha=0.5, beta=2.0, id="both transposed")],
    "LoraLinear": [case((6, 4), (4, 5), (4, 2), (2, 5), scale=0.5, onnx=False, id="W trained too"),
                   case((2, 3, 4), frozen(4, 5), (4, 2), (2, 5), scale=2.0, onnx=False, id="3-D x"),
                   case((4, 4), frozen(5, 4), (4, 2), (2, 5), (5,), scale=0.5, transB=1, alpha=0.5, beta=2.0,
                        onnx=False, id="gemm form"),
                   case((2, 3, 4), frozen(4, 5), (2, 4, 2), (2, 2, 5), scale=1.0, onnx=False, id="per device"),
                   case(frozen(6, 4), frozen(4, 5), frozen(4, 2), (2, 5), scale=0.5, onnx=False, id="B only"),
                   case((3, 6), frozen(6, 5), (6, 2), (2, 5), scale=0.5, onnx=False,
                        id="fewer rows than K: the adapter is not folded into W")],
    "LoraConv": [case((2, 3, 7, 8), frozen(4, 3, 3, 3), (2, 3, 3, 3), (4, 2, 1, 1), frozen(4), scale=0.5,
                      pads=(1, 1, 1, 1), onnx=False, id="3x3 padded"),
                 case((2, 3, 9, 8), (4, 3, 3, 2), (2, 3, 3, 2), (4, 2, 1, 1), (4,), scale=2.0, strides=(2, 1),
                      pads=(1, 0, 2, 1), dilations=(1, 2), onnx=False, id="W and bias trained too, strided dilated"),
                 case((4, 3, 5, 5), frozen(4, 3, 1, 1), (2, 2, 3, 1, 1), (2, 4, 2, 1, 1), scale=1.0, onnx=False,
                      id="pointwise per device"),
                 case((4, 3, 10), frozen(5, 3, 3), (2, 2, 3, 3), (2, 5, 2, 1), scale=0.5, strides=(2,),
                      pads=(1, 2), onnx=False, id="1-D per device"),
                 case(frozen(2, 3, 6, 6), frozen(4, 3, 3, 3), frozen(2, 3, 3, 3), (4, 2, 1, 1), scale=0.5,
                      auto_pad="SAME_UPPER", onnx=False, id="B only"),
                 case((2, 8, 3, 3), frozen(4, 8, 3, 3), (2, 8, 3, 3), (4, 2, 1, 1), (4,), scale=0.5, onnx=False,
                      id="fewer positions than C·k: the adapter is not folded into W")],
    # shape
    "Reshape": [case((2, 3, 4), shape=(6, -1)), case((2, 3, 4), shape=(0, 12), id="copy dim")],
    "Identity": [case((3, 4))],
    "Transpose": [case((2, 3, 4), perm=(2, 0, 1)), case((3, 4), id="default perm")],
    "Concat": [case((2, 3), (2, 5), axis=1), case((2, 3), (4, 3), axis=-2, id="negative axis")],
    "Split": [case((6, 4), axis=0, split=(2, 4)), case((3, 5), axis=-1, split=(1, 1, 3), id="three")],
    "Slice": [case((5, 6), starts=(1,), ends=(4,), axes=(0,)),
              case((5, 6), starts=(0, 5), ends=(5, 0), axes=(0, 1), steps=(2, -2), id="steps"),
              case((4, 6), starts=(1, -3), ends=(1000, -1), id="clamped")],
    "ReduceMean": [case((2, 3, 4), axes=(1,)), case((2, 3, 4), axes=(0, -1), keepdims=0, id="drop"),
                   case((2, 3), id="all")],
    "ReduceSum": [case((2, 3, 4), axes=(1,)), case((2, 3, 4), axes=(0, -1), keepdims=0, id="drop"),
                  case((2, 3), id="all")],
    "ReduceMax": [case((2, 3, 4), axes=(1,)), case((2, 3, 4), axes=(0, -1), keepdims=0, id="drop"),
                  case((2, 3), id="all")],
    "Expand": [case((3, 1), shape=(2, 3, 4))],
    "Shape": [case((2, 3, 4)), case((2, 3, 4), start=-2, end=-1, id="range")],
    "Gather": [case((4, 3), fixed([3, 0, 3]), axis=0), case((4, 3), fixed([[1], [2]]), axis=1, id="axis 1"),
               case((2, 5, 3), fixed(0), axis=1, id="class token"), case((3, 2, 4), fixed(-1), axis=0, id="negative")],
    "Unsqueeze": [case((3, 4), axes=(0, -1))],
    "Squeeze": [case((3, 1, 4, 1), axes=(1,)), case((3, 1, 4, 1), id="all")],
    "Cast": [case((3, 4), to=11)],
    # losses and the optimizer
    "SoftmaxCrossEntropy": [case((4, 5), labels((4,), 5))],
    "MSELoss": [case((4, 3), (4, 3))],
    "SGD": [case(frozen(3, 4), frozen(3, 4), fixed(np.float32(0.1)), onnx=False, grad=False),
            case(frozen(3, 4), frozen(3, 4), fixed(np.float32(0.1)), frozen(3, 4), momentum=0.9, weight_decay=0.01,
                 onnx=False, grad=False, id="momentum")],
    "Adam": [case(frozen(3, 4), frozen(3, 4), fixed(np.float32(0.1)), fixed(np.zeros((3, 4))), fixed(np.zeros((3, 4))),
                  fixed(np.zeros(2)), onnx=False, grad=False, id="first step"),
             case(frozen(3, 4), frozen(3, 4), fixed(np.float32(0.1)), frozen(3, 4), frozen(3, 4, kind="positive"),
                  fixed(np.array([1 - 0.8**3, 1 - 0.99**3])), beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.01, onnx=False,
                  grad=False, id="third step, weight decay")],
    # conv
    "Conv": [case((2, 3, 7, 8), (4, 3, 3, 3), (4,), id="bias"),
             case((2, 4, 9, 8), (6, 2, 3, 2), strides=(2, 1), pads=(1, 0, 2, 1), dilations=(1, 2), group=2,
                  id="strided padded dilated grouped"),
             case((2, 4, 8, 8), (4, 1, 3, 3), (4,), pads=(1, 1, 1, 1), group=4, id="depthwise"),
             case((2, 4, 8, 8), (8, 1, 3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=4, id="depthwise x2 strided"),
             case((2, 6, 8, 8), (6, 1, 3, 3), frozen(6), pads=(0, 1, 2, 1), group=6, id="depthwise asymmetric"),
             case((2, 4, 6, 7), (8, 1, 3, 3), group=4, id="depthwise multiplier, narrower output"),
             case((1, 3, 7, 7), (3, 1, 3, 3), (3,), pads=(2, 2, 2, 2), dilations=(2, 2), group=3,
                  id="depthwise dilated"),
             case((2, 4, 9), (4, 1, 3), pads=(1, 1), group=4, id="1-D depthwise"),
             case((2, 3, 5, 4), (3, 1, 3, 3), pads=(1, 2, 1, 2), group=3, id="depthwise output wider than input"),
             case((2, 3, 6, 7), (4, 3, 3, 3), (4,), pads=(1, 1, 1, 1), id="output as wide as input: flat columns"),
             case((1, 4, 7, 6), (4, 2, 3, 3), pads=(0, 2, 4, 2), dilations=(2, 2), group=2,
                  id="flat columns, dilated, asymmetric, grouped"),
             case((2, 3, 6, 6), (4, 3, 1, 1), kernel_shape=(1, 1), id="pointwise"),
             case((2, 3, 10), (5, 3, 3), (5,), strides=(2,), pads=(1, 2), id="1-D"),
             case((1, 2, 5, 6), (3, 2, 3, 3), strides=(2, 2), auto_pad="SAME_UPPER", id="same upper"),
             case((1, 2, 5, 6), (3, 2, 2, 2), auto_pad="SAME_LOWER", id="same lower")],
    # pooling
    "MaxPool": [case((2, 3, 6, 7), kernel_shape=(2, 2), strides=(2, 2)),
                case((2, 3, 7, 7), kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), id="overlapping padded"),
                case((1, 2, 7, 8), kernel_shape=(3, 2), strides=(2, 3), pads=(1, 1, 1, 1), ceil_mode=1, id="ceil"),
                case((1, 2, 8, 8), kernel_shape=(2, 2), dilations=(2, 2), id="dilated"),
                case((1, 2, 5, 5), kernel_shape=(3, 3), strides=(2, 2), pads=(0, 0, 1, 1), id="asymmetric"),
                case((1, 2, 5, 5), kernel_shape=(2, 2), auto_pad="SAME_UPPER", id="same upper"),
                case((2, 3, 9), kernel_shape=(3,), strides=(2,), pads=(1, 1), id="1-D")],
    "AveragePool": [case((2, 3, 6, 6), kernel_shape=(2, 2), strides=(2, 2)),
                    case((2, 3, 7, 7), kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), id="pads excluded"),
                    case((2, 3, 7, 7), kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), count_include_pad=1,
                         id="pads included"),
                    case((1, 2, 7, 8), kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), ceil_mode=1,
                         id="ceil"),
                    case((1, 2, 7, 8), kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), ceil_mode=1,
                         count_include_pad=1, id="ceil pads included"),
                    case((1, 2, 5, 5), kernel_shape=(3, 3), pads=(0, 0, 1, 1), count_include_pad=1,
                         id="asymmetric included"),
                    case((1, 2, 6, 6), kernel_shape=(2, 2), dilations=(2, 2), grad=False,
                         id="dilated (torch has no dilated avg_pool)"),
                    case((2, 3, 9), kernel_shape=(3,), strides=(2,), pads=(1, 1), id="1-D")],
    "GlobalAveragePool": [case((2, 3, 4, 5)), case((2, 3, 6), id="1-D")],
    # norm
    "Softmax": [case((3, 5)), case((2, 3, 4), axis=1, id="axis 1")],
    "LayerNormalization": [case((3, 5), (5,), (5,)),
                           case((2, 3, 4), (3, 4), (3, 4), axis=1, epsilon=1e-3, id="two axes"),
                           case((3, 5), (5,), id="no bias")],
    # int8 (compiler/ops/quantized.py): integer inputs, forward compared bit for bit with TORCH below
    "Quantize": [case(frozen(3, 4), scale=0.02, zero_point=-5, onnx=False)],
    "Dequantize": [case(fixed(_int8(3, 4)), zero_point=-3, onnx=False),
                   case(fixed(_int8(5)), scale=0.5, zero_point=2, onnx=False, id="scaled")],
    "RequantGrad": [case(frozen(2, 3, 4), fixed(_scale(3)), fixed(_int8(2, 3, 4, edges=True)), onnx=False),
                    case(frozen(2, 3), fixed(_scale(3)), onnx=False, id="float output")],
    "QConv": [case(fixed(_int8(2, 3, 6, 7)), fixed(_int8(4, 3, 3, 3)), fixed(_int32(4)), fixed(_scale(4, 1e-3)),
                   pads=(1, 1, 1, 1), x_zero=-7, y_zero=-128, onnx=False, grad=False),
              case(fixed(_int8(2, 4, 8, 8)), fixed(_int8(4, 1, 3, 3)), fixed(_int32(4)), fixed(_scale(4, 1e-2)),
                   strides=(2, 2), pads=(0, 1, 1, 0), group=4, x_zero=3, y_zero=5, onnx=False, grad=False,
                   id="depthwise strided asymmetric"),
              case(fixed(_int8(1, 5, 4, 4)), fixed(_int8(3, 5, 1, 1)), fixed(_int32(3)), fixed(_scale(3, 5e-3)),
                   x_zero=-128, onnx=False, grad=False, id="pointwise")],
    "QLinear": [case(fixed(_int8(3, 6)), fixed(_int8(4, 6)), fixed(_int32(4)), fixed(_scale(4, 1e-3)), x_zero=-2,
                     y_zero=-128, onnx=False, grad=False),
                case(fixed(_int8(3, 6)), fixed(_int8(4, 6)), fixed(_int32(4)), fixed(_scale(4, 1e-3)), x_zero=9,
                     output="float32", onnx=False, grad=False, id="float logits")],
    "QGlobalAveragePool": [case(fixed(_int8(2, 3, 4, 5)), onnx=False, grad=False),
                           case(fixed(_int8(2, 3, 6)), onnx=False, grad=False, id="1-D")],
    "QSGD": [case(fixed(_int8(4, 3)), frozen(4, 3), fixed(np.float32(0.7)), onnx=False, grad=False),
             case(fixed(_int32(4)), frozen(2), fixed(np.float32(300.0)), axis=0, channels=2, onnx=False, grad=False,
                  id="int32 first channels"),
             case(fixed(_int8(4, 3)), frozen(2, 3), fixed(np.float32(0.7)), fixed(_int8(2, 3).astype(np.float32)),
                  axis=0, channels=2, onnx=False, grad=False, id="master")],
    "BatchNormalization": [case((2, 3, 4, 4), frozen(3), frozen(3), frozen(3), frozen(3, kind="positive")),
                           case((4, 3), frozen(3), frozen(3), frozen(3), frozen(3, kind="positive"),
                                epsilon=1e-3, id="2-D")],
}

# ops with no onnxruntime counterpart, and our ops whose ONNX name differs
NO_ONNX = {"SGD", "Adam", "MSELoss"}
ONNX_NAMES = {"SoftmaxCrossEntropy": "SoftmaxCrossEntropyLoss"}
# attributes of our IR that ONNX takes as (constant) inputs, in ONNX's input order
ONNX_INPUT_ATTRS = {
    "Reshape": ("shape",), "Expand": ("shape",), "Split": ("split",), "Squeeze": ("axes",),
    "Unsqueeze": ("axes",), "ReduceMean": ("axes",), "ReduceSum": ("axes",),
    "Slice": ("starts", "ends", "axes", "steps"), "Clip": ("min", "max"), "ReduceMax": ("axes",),
}
FLOAT_INPUT_ATTRS = {"Clip"}  # the rest are int64


# ---- PyTorch references (attributes arrive resolved: every default filled in) ---------------------------
def _explicit_pads(x, kernel, strides, pads, dilations, auto_pad):
    """ONNX pads (begin..., end...) with auto_pad applied, per the ONNX spec."""
    rank = x.dim() - 2
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, k, s, d in zip(x.shape[2:], kernel, strides or (1,) * rank, dilations or (1,) * rank):
            total = max(0, (math.ceil(n / s) - 1) * s + d * (k - 1) + 1 - n)
            small, big = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else big)
            end.append(big if auto_pad == "SAME_UPPER" else small)
        return tuple(begin + end)
    return tuple(pads) if pads and auto_pad == "NOTSET" else (0,) * (2 * rank)


def _pad(x, pads, value=0.0):
    """ONNX pads -> F.pad, which lists the last axis first."""
    rank = len(pads) // 2
    order = [p for a in reversed(range(rank)) for p in (pads[a], pads[a + rank])]
    return F.pad(x, order, value=value)


def t_conv(x, w, b=None, *, strides, pads, dilations, group, auto_pad, **_):
    rank = x.dim() - 2
    pads = _explicit_pads(x, w.shape[2:], strides, pads, dilations, auto_pad)
    conv = F.conv1d if rank == 1 else F.conv2d
    return conv(_pad(x, pads), w, b, stride=strides or 1, dilation=dilations or 1, groups=group)


def _t_requant(acc, scale, zero):
    """int8 requantization in float32: clamp(round(acc·scale) + zero) (torch.round: half to even)."""
    shape = (1, -1) + (1,) * (acc.dim() - 2)
    return torch.clamp(torch.round(acc.float() * scale.float().view(shape)) + zero, -128, 127)


def t_qconv(x, w, b, scale, *, strides, pads, dilations, group, auto_pad, x_zero, y_zero):
    acc = t_conv(x.double() - x_zero, w.double(), None, strides=strides, pads=pads, dilations=dilations, group=group,
                 auto_pad=auto_pad)
    return _t_requant(acc + b.double().view(1, -1, *(1,) * (x.dim() - 2)), scale, y_zero)


def t_qlinear(x, w, b, scale, *, x_zero, y_zero, output):
    acc = (x.double() - x_zero) @ w.double().T + b.double()
    return acc.float() * scale.float() if output == "float32" else _t_requant(acc, scale, y_zero)


def t_max_pool(x, *, kernel_shape, strides, pads, dilations, ceil_mode, auto_pad, **_):
    rank = x.dim() - 2
    pads = _explicit_pads(x, kernel_shape, strides, pads, dilations, auto_pad)
    pool = F.max_pool1d if rank == 1 else F.max_pool2d
    strides, dilations = strides or (1,) * rank, dilations or (1,) * rank
    if pads[:rank] == pads[rank:]:  # torch's own padding keeps its ceil_mode rule exact
        return pool(x, kernel_shape, strides, pads[:rank], dilations, bool(ceil_mode))
    assert not ceil_mode, "no reference for asymmetric pads with ceil_mode"
    return pool(_pad(x, pads, -math.inf), kernel_shape, strides, 0, dilations)


def t_average_pool(x, *, kernel_shape, strides, pads, dilations, ceil_mode, count_include_pad, auto_pad, **_):
    rank = x.dim() - 2
    assert not dilations or set(dilations) == {1}, "torch has no dilated average pooling"
    pads = _explicit_pads(x, kernel_shape, strides, pads, dilations, auto_pad)
    pool = F.avg_pool1d if rank == 1 else F.avg_pool2d
    strides = strides or (1,) * rank
    if pads[:rank] == pads[rank:]:
        return pool(x, kernel_shape, strides, pads[:rank], bool(ceil_mode), bool(count_include_pad))
    assert count_include_pad and not ceil_mode, "no reference for these asymmetric pads"
    return pool(_pad(x, pads), kernel_shape, strides, 0)


def t_slice(x, *, starts, ends, axes, steps):
    axes = axes if axes is not None else range(len(starts))
    steps = steps if steps is not None else (1,) * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        keep = list(range(x.shape[axis]))[slice(start, end, step)]
        x = torch.index_select(x, axis, torch.tensor(keep, dtype=torch.int64))
    return x


def t_reduce(reduce):
    def run(x, *, axes, keepdims):
        return reduce(x, dim=tuple(axes) if axes else tuple(range(x.dim())), keepdim=bool(keepdims))
    return run


def t_unsqueeze(x, *, axes):
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def t_gemm(a, b, c=None, *, alpha, beta, transA, transB):
    y = alpha * ((a.T if transA else a) @ (b.T if transB else b))
    return y if c is None else y + beta * c


def t_lora_linear(x, w, a, b, c=None, *, scale, transB, alpha, beta):
    """PEFT's LoRA Linear: the frozen product plus scale·(x·A)·B, per device when A, B have a device axis."""
    k, n = x.shape[-1], b.shape[-1]
    x2 = x.reshape(-1, k)
    y = alpha * (x2 @ (w.T if transB else w))
    if c is not None:
        y = y + beta * c
    devices = a.shape[0] if a.dim() == 3 else 1
    branch = (x2.reshape(devices, -1, k) @ a.reshape(devices, k, -1)) * scale @ b.reshape(devices, -1, n)
    return (y + branch.reshape(-1, n)).reshape(*x.shape[:-1], n)


def t_lora_conv(x, w, a, b, bias=None, *, scale, strides, pads, dilations, auto_pad):
    """PEFT's LoRA Conv: the frozen conv plus B ⊛ (A ⊛ x)·scale (A with the layer's window, B 1×1), per device
    (device d: the d-th slice of the samples) when A and B carry a device axis."""
    window = dict(strides=strides, pads=pads, dilations=dilations, group=1, auto_pad=auto_pad)
    pointwise = dict(strides=None, pads=None, dilations=None, group=1, auto_pad="NOTSET")
    if a.dim() == w.dim():
        a, b = a[None], b[None]
    branch = [t_conv(t_conv(xd, ad, **window) * scale, bd, **pointwise) for xd, ad, bd in zip(x.chunk(len(a)), a, b)]
    return t_conv(x, w, bias, **window) + torch.cat(branch)


TORCH = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b,
    "Neg": lambda a: -a,
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Gelu": lambda a, *, approximate: F.gelu(a, approximate=approximate),
    "Erf": torch.erf,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Pow": torch.pow,
    "Clip": lambda x, *, min, max: torch.clamp(x, min, max),
    "LeakyRelu": lambda x, *, alpha: F.leaky_relu(x, alpha),
    "HardSigmoid": lambda x, *, alpha, beta: torch.clamp(x * alpha + beta, 0, 1),
    "HardSwish": F.hardswish,
    "Elu": lambda x, *, alpha: F.elu(x, alpha),
    "Softplus": F.softplus,
    "PRelu": lambda x, slope: torch.where(x > 0, x, x * slope),
    "Where": torch.where,
    "ReduceMax": lambda x, *, axes, keepdims: torch.amax(x, dim=tuple(axes) if axes else tuple(range(x.dim())),
                                                          keepdim=bool(keepdims)),
    "Gather": lambda d, i, *, axis: d.index_select(axis, (i % d.shape[axis]).reshape(-1)).reshape(
        *d.shape[:axis], *i.shape, *d.shape[axis + 1:]),
    "MatMul": torch.matmul,
    "Gemm": t_gemm,
    "LoraLinear": t_lora_linear,
    "LoraConv": t_lora_conv,
    "Reshape": lambda x, *, shape, allowzero: x.reshape(
        [x.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(shape)]),
    "Identity": lambda x: x,
    "Transpose": lambda x, *, perm: x.permute(perm if perm is not None else tuple(reversed(range(x.dim())))),
    "Concat": lambda *xs, axis: torch.cat(xs, dim=axis),
    "Split": lambda x, *, axis, split: torch.split(x, list(split), dim=axis),
    "Slice": t_slice,
    "ReduceMean": t_reduce(torch.mean),
    "ReduceSum": t_reduce(torch.sum),
    "Expand": lambda x, *, shape: torch.broadcast_to(x, np.broadcast_shapes(tuple(x.shape), tuple(shape))),
    "Unsqueeze": t_unsqueeze,
    "Squeeze": lambda x, *, axes: x.squeeze() if axes is None else x.squeeze(tuple(axes)),
    "Cast": lambda x, *, to: x.to({1: torch.float32, 11: torch.float64}[to]),
    "SoftmaxCrossEntropy": lambda logits, target: F.cross_entropy(logits, target),
    "MSELoss": F.mse_loss,
    "Conv": t_conv,
    "MaxPool": t_max_pool,
    "AveragePool": t_average_pool,
    "GlobalAveragePool": lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "Softmax": lambda x, *, axis: torch.softmax(x, dim=axis),
    "LayerNormalization": lambda x, scale, b=None, *, axis, epsilon, **_: F.layer_norm(
        x, x.shape[axis:], scale, b, epsilon),
    "BatchNormalization": lambda x, scale, b, mean, var, *, epsilon, **_: F.batch_norm(
        x, mean, var, scale, b, training=False, eps=epsilon),
    "QConv": t_qconv,
    "QLinear": t_qlinear,
    "QGlobalAveragePool": lambda x: torch.clamp(torch.round(
        x.double().sum(dim=tuple(range(2, x.dim())), keepdim=True).float() / float(np.prod(x.shape[2:]))), -128, 127),
}


# ---- helpers ---------------------------------------------------------------------------------------------
INT8_OPS = ("Quantize", "Dequantize", "RequantGrad", "QConv", "QLinear", "QGlobalAveragePool")


def has_gradient(op: Op) -> bool:
    return type(op).gradient is not Op.gradient


def make_values(c: Case, dtype: str, rng: np.random.Generator) -> list[np.ndarray]:
    values = [i.make(rng) for i in c.inputs]
    return [v.astype(dtype) if v.dtype.kind == "f" else v for v in values]


def params(select) -> list:
    return [pytest.param(name, c, id=f"{name}-{c.id or i}")
            for name, cases in CASES.items() for i, c in enumerate(cases) if select(name, c)]


ALL_CASES = params(lambda name, c: True)
ONNX_CASES = params(lambda name, c: c.onnx and name not in NO_ONNX)
GRAD_CASES = params(lambda name, c: c.grad and has_gradient(get_op(name)) and any(i.trainable for i in c.inputs))


def loss_graph(op_name: str, c: Case, values: list[np.ndarray], weights: list[np.ndarray]) -> Graph:
    """x_k -> op -> Σ_k ReduceSum(y_k · w_k) = loss; trainable inputs are parameters, the rest constants."""
    op = get_op(op_name)
    attrs = op.resolve_attrs(dict(c.attrs))
    tensors, env = {}, {}

    def add(name, value, role, shape=None, dtype=None):
        tensors[name] = TensorSpec(name, tuple(shape if value is None else value.shape),
                                   dtype or str(value.dtype), role)
        if value is not None:
            env[name] = value
        return name

    xs = [add(f"x{k}", v, Role.TRAINABLE if i.trainable else Role.CONSTANT)
          for k, (i, v) in enumerate(zip(c.inputs, values))]
    specs = op.output_specs([v.shape for v in values], [str(v.dtype) for v in values], attrs)
    ys = [add(f"y{k}", None, Role.ACTIVATION, shape, dtype) for k, (shape, dtype) in enumerate(specs)]
    nodes = [Node("op", op_name, tuple(xs), tuple(ys), attrs)]
    total = None
    for k, (y, w) in enumerate(zip(ys, weights)):
        wk = add(f"w{k}", w.astype(tensors[y].dtype), Role.CONSTANT)
        prod = add(f"p{k}", None, Role.ACTIVATION, tensors[y].shape, tensors[y].dtype)
        part = add(f"s{k}", None, Role.ACTIVATION, (), tensors[y].dtype)
        nodes += [Node(f"mul{k}", "Mul", (y, wk), (prod,)), Node(f"sum{k}", "ReduceSum", (prod,), (part,),
                                                                 {"keepdims": 0})]
        if total is not None:
            part = add(f"t{k}", None, Role.ACTIVATION, (), tensors[y].dtype)
            nodes.append(Node(f"add{k}", "Add", (total, f"s{k}"), (part,)))
        total = part
    tensors[total] = tensors[total].with_role(Role.LOSS)
    graph = Graph(tensors, tuple(nodes), (), (total,), env, name=op_name)
    graph.check()
    return graph


def torch_reference(op_name: str, c: Case, values: list[np.ndarray], weights: list[np.ndarray]):
    """The outputs and the gradients of the trainable inputs under PyTorch, in float64."""
    attrs = get_op(op_name).resolve_attrs(dict(c.attrs))
    tensors = [torch.tensor(v, dtype=torch.float64 if v.dtype.kind == "f" else None,
                            requires_grad=i.trainable) for i, v in zip(c.inputs, values)]
    outs = TORCH[op_name](*tensors, **attrs)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    loss = sum((o * torch.tensor(w)).sum() for o, w in zip(outs, weights))
    loss.backward()
    grads = {f"x{k}": t.grad.numpy() for k, (i, t) in enumerate(zip(c.inputs, tensors)) if i.trainable}
    return [o.detach().numpy() for o in outs], grads


def output_weights(op_name: str, c: Case, rng: np.random.Generator) -> list[np.ndarray]:
    op = get_op(op_name)
    shapes = [i.shape for i in c.inputs]
    dtypes = ["int64" if i.kind == "labels" else "float64" for i in c.inputs]
    specs = op.output_specs(shapes, dtypes, op.resolve_attrs(dict(c.attrs)))
    return [rng.standard_normal(shape) for shape, _ in specs]


def differentiated(op_name: str, c: Case, dtype: str):
    rng = np.random.default_rng(SEED)
    values = make_values(c, "float64", rng)
    weights = output_weights(op_name, c, rng)
    graph = loss_graph(op_name, c, [v.astype(dtype) if v.dtype.kind == "f" else v for v in values], weights)
    trained, grads = differentiate(graph, graph.outputs[0], None)
    return trained, grads, values, weights


# ---- the registry ----------------------------------------------------------------------------------------
def test_every_op_has_cases():
    missing = sorted(name for name, op in REGISTRY.items() if not op.backward_only and not CASES.get(name))
    assert not missing, f"add test cases to CASES for {missing}"
    assert set(CASES) <= set(REGISTRY), f"cases for unregistered ops: {sorted(set(CASES) - set(REGISTRY))}"


def test_every_gradient_rule_has_a_torch_reference():
    missing = sorted(name for name, op in REGISTRY.items() if has_gradient(op) and name not in TORCH)
    assert not missing, f"add a PyTorch reference to TORCH for {missing}"


def test_every_backward_op_is_exercised():
    emitted = set()
    for p in GRAD_CASES:
        trained, _, _, _ = differentiated(*p.values, "float64")
        emitted.update(node.op for node in trained.nodes)
    unreached = sorted(name for name, op in REGISTRY.items() if op.backward_only and name not in emitted)
    assert not unreached, f"no gradient test emits {unreached}"


def test_registering_a_name_twice_raises():
    with pytest.raises(TypeError, match="registered twice"):
        class Relu(Op):  # noqa: F841
            name = "Relu"
    assert type(REGISTRY["Relu"]).__module__ == "compiler.ops.elementwise"


# ---- every op, every case ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op_name,c", ALL_CASES)
def test_forward_matches_shape_rule_and_keeps_dtype(op_name, c, dtype):
    op = get_op(op_name)
    attrs = op.resolve_attrs(dict(c.attrs))
    values = make_values(c, dtype, np.random.default_rng(SEED))
    results = op.run(values, attrs)
    if op.updates:  # in-place updates come back in the shape and dtype of the inputs they overwrite
        expected = [(values[k].shape, values[k].dtype) for k in op.updates[:len(results)]]
    else:
        expected = op.output_specs([v.shape for v in values], [str(v.dtype) for v in values], attrs)
    assert [(r.shape, str(r.dtype)) for r in results] == [(tuple(s), str(t)) for s, t in expected]
    flops = op.flops(tuple(r.shape for r in results), *(v.shape for v in values), **attrs)
    assert isinstance(flops, (int, np.integer)) and flops >= 0


def onnx_model(op_name: str, c: Case, values: list[np.ndarray]) -> onnx.ModelProto:
    op = get_op(op_name)
    attrs = {k: v for k, v in c.attrs.items() if v is not None}
    names = [f"x{k}" for k in range(len(values))]
    initializers = []
    for key in ONNX_INPUT_ATTRS.get(op_name, ()):
        value = attrs.pop(key, None)
        names.append("" if value is None else key)
        if value is not None:
            dtype = np.float32 if op_name in FLOAT_INPUT_ATTRS else np.int64
            initializers.append(numpy_helper.from_array(np.asarray(value, dtype), key))
    while names[-1] == "":
        names.pop()
    specs = op.output_specs([v.shape for v in values], [str(v.dtype) for v in values], op.resolve_attrs(dict(c.attrs)))
    # output dims left open: onnxruntime's own are compared below (onnx's shape inference disagrees with
    # onnxruntime and PyTorch on ceil_mode pooling, where a window may not start in the end padding)
    outputs = [helper.make_tensor_value_info(f"y{k}", helper.np_dtype_to_tensor_dtype(np.dtype(t)), [None] * len(s))
               for k, (s, t) in enumerate(specs)]
    inputs = [helper.make_tensor_value_info(f"x{k}", helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for k, v in enumerate(values)]
    node = helper.make_node(ONNX_NAMES.get(op_name, op_name), names, [o.name for o in outputs], **attrs)
    graph = helper.make_graph([node], op_name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("op_name,c", params(lambda name, c: name in TORCH and name in INT8_OPS))
def test_quantized_forward_matches_torch_bit_for_bit(op_name, c):
    values = make_values(c, "float32", np.random.default_rng(SEED))
    got = get_op(op_name).run(values, get_op(op_name).resolve_attrs(dict(c.attrs)))[0]
    want = TORCH[op_name](*(torch.tensor(v) for v in values), **get_op(op_name).resolve_attrs(dict(c.attrs)))
    np.testing.assert_array_equal(got.astype(np.float32), want.numpy().astype(np.float32))
    assert np.unique(got).size > 4  # not all saturated


@pytest.mark.parametrize("op_name,c", ONNX_CASES)
def test_forward_matches_onnxruntime(op_name, c):
    values = make_values(c, "float32", np.random.default_rng(SEED))
    session = ort.InferenceSession(onnx_model(op_name, c, values).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, {f"x{k}": v for k, v in enumerate(values)})
    got = get_op(op_name).run(values, get_op(op_name).resolve_attrs(dict(c.attrs)))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-7), ("float32", 1e-4)])
@pytest.mark.parametrize("op_name,c", GRAD_CASES)
def test_gradient_matches_torch(op_name, c, dtype, rtol):
    trained, grads, values, weights = differentiated(op_name, c, dtype)
    env = evaluate(trained, {}, dtype=dtype)
    for name, spec in trained.tensors.items():  # every shape rule, backward ops' included, held
        assert np.shape(env[name]) == spec.shape, f"{name}: computed {np.shape(env[name])}, inferred {spec.shape}"
    outs, expected = torch_reference(op_name, c, values, weights)
    for k, out in enumerate(outs):
        scale = max(1.0, float(np.abs(out).max(initial=0.0)))
        np.testing.assert_allclose(env[f"y{k}"], out, rtol=rtol, atol=rtol * 1e-2 * scale)
    assert set(grads) == set(expected)
    for name, want in expected.items():
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(env[grads[name]], want, rtol=rtol, atol=rtol * 1e-2 * scale,
                                   err_msg=f"gradient of input {name}")


# ---- specific behaviour ----------------------------------------------------------------------------------
def test_max_pool_gradient_goes_to_the_first_maximum_on_ties():
    rng = np.random.default_rng(SEED)
    x = rng.integers(0, 2, (2, 3, 6, 7)).astype(np.float64)  # many ties
    attrs = dict(kernel_shape=(3, 3), strides=(1, 2), pads=(1, 1, 1, 1))
    y = get_op("MaxPool").forward(x, **attrs)
    dy = rng.standard_normal(y.shape)
    dx = get_op("MaxPoolGrad").forward(x, dy, **attrs)
    tx = torch.tensor(x, requires_grad=True)
    F.max_pool2d(tx, 3, (1, 2), 1).backward(torch.tensor(dy))
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-12, atol=1e-12)

    flat = np.ones((1, 1, 2, 2))  # one window, four equal values: all of dy goes to the top-left one
    dx = get_op("MaxPoolGrad").forward(flat, np.full((1, 1, 1, 1), 5.0), kernel_shape=(2, 2))
    np.testing.assert_array_equal(dx, [[[[5.0, 0.0], [0.0, 0.0]]]])


@pytest.mark.parametrize("shape,attrs", [
    ((2, 3, 16, 16), dict(kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1))),  # cct-2-3x2's pools
    ((1, 2, 9, 11), dict(kernel_shape=(3, 2), strides=(2, 3), pads=(1, 1, 0, 1))),
    ((1, 2, 7, 8), dict(kernel_shape=(2, 2), dilations=(2, 2), strides=(1, 1)))])
def test_max_pool_gradient_adds_overlapping_windows_in_pytorchs_order(shape, attrs):
    """Where windows overlap, one input collects several dy: the sum is PyTorch's to the last bit in float32
    (added output by output in row-major order)."""
    rng = np.random.default_rng(SEED)
    x = rng.integers(0, 3, shape).astype(np.float32)  # many ties, so one position wins several windows
    dy = rng.standard_normal(get_op("MaxPool").infer(shape, **attrs)).astype(np.float32)
    dx = get_op("MaxPoolGrad").forward(x, dy, **attrs)
    tx = torch.tensor(x, requires_grad=True)
    top, left, bottom, right = attrs.get("pads", (0, 0, 0, 0))
    tp = F.pad(tx, (left, right, top, bottom), value=-np.inf)  # torch pads symmetrically only: pad here
    F.max_pool2d(tp, attrs["kernel_shape"], attrs["strides"], dilation=attrs.get("dilations", (1, 1))).backward(
        torch.tensor(dy))
    assert np.count_nonzero(dx) > 0
    np.testing.assert_array_equal(dx, tx.grad.numpy())


@pytest.mark.parametrize("op_name,shapes,attrs,match", [
    ("Conv", [(1, 4, 5, 5), (6, 3, 3, 3)], {"group": 2}, "group=2"),
    ("Conv", [(1, 3, 2, 2), (4, 3, 3, 3)], {}, "does not fit"),
    ("Conv", [(1, 3, 4, 4, 4), (2, 3, 1, 1, 1)], {}, "1-D and 2-D"),
    ("MaxPool", [(1, 3, 5)], {"kernel_shape": (2, 2)}, "kernel_shape"),
    ("LayerNormalization", [(3, 5), (4,)], {}, "scale"),
])
def test_shape_rules_name_the_op_and_the_problem(op_name, shapes, attrs, match):
    op = get_op(op_name)
    with pytest.raises(CompileError, match=f"{op_name}: .*{match}"):
        op.infer(*shapes, **op.resolve_attrs(attrs))


@pytest.mark.parametrize("grads", ["", "xz", "bx", "xx"])
def test_lora_grad_names_a_bad_gradient_set(grads):
    op = get_op("LoraLinearGrad")
    with pytest.raises(CompileError, match="LoraLinearGrad: grads must be a non-empty ordered subset of 'xab'"):
        op.infer((4, 5), (4, 3), (3, 5), (3, 2), (2, 5), **op.resolve_attrs({"grads": grads, "scale": 1.0}))


def test_batch_norm_trains_only_through_its_input():
    c = CASES["BatchNormalization"][0]
    c = Case((c.inputs[0], Input((3,)), *c.inputs[2:]), c.attrs)  # a trainable scale
    rng = np.random.default_rng(SEED)
    graph = loss_graph("BatchNormalization", c, make_values(c, "float64", rng),
                       output_weights("BatchNormalization", c, rng))
    with pytest.raises(CompileError, match="BatchNormalization.*scale"):
        differentiate(graph, graph.outputs[0], None)


def test_batch_norm_rejects_training_mode():
    with pytest.raises(CompileError, match="training_mode"):
        get_op("BatchNormalization").infer((2, 3), (3,), (3,), (3,), (3,), training_mode=1)


def test_sgd_matches_torch():
    for c in CASES["SGD"]:
        param, grad, lr, *velocity = make_values(c, "float64", np.random.default_rng(SEED))
        attrs = get_op("SGD").resolve_attrs(dict(c.attrs))
        new = get_op("SGD").run([param, grad, lr, *velocity], attrs)

        p = torch.tensor(param, requires_grad=True)
        sgd = torch.optim.SGD([p], lr=float(lr), momentum=attrs["momentum"], weight_decay=attrs["weight_decay"])
        if velocity:  # torch starts its buffer at the first step's d; seed it so the step matches ours
            sgd.state[p]["momentum_buffer"] = torch.tensor(velocity[0])
        p.grad = torch.tensor(grad)
        sgd.step()
        np.testing.assert_allclose(new[0], p.detach().numpy(), rtol=1e-12)
        if velocity:
            np.testing.assert_allclose(new[1], sgd.state[p]["momentum_buffer"].numpy(), rtol=1e-12)


def test_adam_matches_torch():
    """One Adam step from given moments and bias corrections (the corrections 1 − βᵗ of step t − 1 are torch's
    step count t − 1) equals torch.optim.Adam's step."""
    for c in CASES["Adam"]:
        param, grad, lr, m, v, corrections = make_values(c, "float64", np.random.default_rng(SEED))
        attrs = get_op("Adam").resolve_attrs(dict(c.attrs))
        new = get_op("Adam").run([param, grad, lr, m, v, corrections], attrs)
        betas = (attrs["beta1"], attrs["beta2"])
        done = int(round(np.log(1 - corrections[0]) / np.log(betas[0]))) if corrections[0] else 0

        p = torch.tensor(param, requires_grad=True)
        adam = torch.optim.Adam([p], lr=float(lr), betas=betas, eps=attrs["eps"], weight_decay=attrs["weight_decay"])
        if done:
            adam.state[p] = {"step": torch.tensor(float(done)), "exp_avg": torch.tensor(m),
                             "exp_avg_sq": torch.tensor(v)}
        p.grad = torch.tensor(grad)
        adam.step()
        np.testing.assert_allclose(new[0], p.detach().numpy(), rtol=1e-12)
        if done:
            np.testing.assert_allclose(new[1], adam.state[p]["exp_avg"].numpy(), rtol=1e-12)
            np.testing.assert_allclose(new[2], adam.state[p]["exp_avg_sq"].numpy(), rtol=1e-12)
        np.testing.assert_allclose(new[3], [1 - betas[0] ** (done + 1), 1 - betas[1] ** (done + 1)], rtol=1e-12)


def test_reduce_max_gradient_splits_ties_like_torch_amax():
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, -1.0]])
    graph = loss_graph("ReduceMax", case((2, 4), axes=(1,)), [x], [np.array([[1.5], [-2.0]])])
    trained, grads = differentiate(graph, graph.outputs[0], None)
    env = evaluate(trained, {}, dtype="float64")
    tx = torch.tensor(x, requires_grad=True)
    (torch.amax(tx, dim=1, keepdim=True) * torch.tensor([[1.5], [-2.0]], dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(env[grads["x0"]], tx.grad.numpy(), rtol=1e-12)
