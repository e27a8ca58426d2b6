"""Kernel test cases: for every registered op, inputs and attributes the C kernel is run on (through the
codegen template table) and compared with the op's numpy forward. Backward ops get inputs shaped by their
forward op's shape rule, so geometry cases are written once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from compiler.ops import REGISTRY

Make = Callable[[np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class KCase:
    inputs: tuple[Make, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    id: str = ""


def normal(*shape: int) -> Make:
    return lambda rng: rng.standard_normal(shape).astype(np.float32)


def positive(*shape: int) -> Make:
    return lambda rng: rng.uniform(0.5, 2.0, shape).astype(np.float32)


def unit(*shape: int) -> Make:
    """Values in (0, 1), like a sigmoid output."""
    return lambda rng: rng.uniform(0.05, 0.95, shape).astype(np.float32)


def relu_out(*shape: int) -> Make:
    return lambda rng: np.maximum(rng.standard_normal(shape), 0).astype(np.float32)


def softmax_out(shape: tuple[int, ...], axis: int = -1) -> Make:
    def make(rng):
        z = rng.standard_normal(shape)
        e = np.exp(z - z.max(axis=axis, keepdims=True))
        return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)
    return make


def labels(classes: int, *shape: int) -> Make:
    return lambda rng: rng.integers(0, classes, shape).astype(np.int64)


def ints(dtype, *shape: int) -> Make:
    return lambda rng: rng.integers(-50, 50, shape).astype(dtype)


def int8(*shape: int, edges: bool = False) -> Make:
    def make(rng):
        v = rng.integers(-128, 128, shape).astype(np.int8)
        if edges:
            v.reshape(-1)[::5] = -128
            v.reshape(-1)[1::7] = 127
        return v
    return make


def int32s(*shape: int) -> Make:
    return lambda rng: rng.integers(-5000, 5000, shape).astype(np.int32)


def scales(n: int, size: float = 1e-2) -> Make:
    return lambda rng: (rng.uniform(0.5, 2.0, n) * size).astype(np.float32)


def fixed(value) -> Make:
    value = np.asarray(value)
    return lambda rng: value.copy()


def scalar(value: float = 1.3) -> Make:
    return fixed(np.float32(value))


def k(*inputs: Make | tuple[int, ...], id: str = "", **attrs: Any) -> KCase:
    made = tuple(normal(*i) if isinstance(i, tuple) else i for i in inputs)
    return KCase(made, attrs, id)


def _out(op: str, *shapes, **attrs) -> tuple[int, ...]:
    return tuple(REGISTRY[op].infer(*shapes, **attrs))


def _binary(op: str, b_maker=normal) -> list[KCase]:
    return [k((3, 4), b_maker(3, 4)), k((2, 3, 4), b_maker(4), id="row"), k((3, 1), b_maker(1, 4), id="outer"),
            k((2, 1, 4), b_maker(3, 1), id="both"), k((5,), b_maker(), id="scalar b"),
            k((4,), b_maker(2, 3, 4), id="broadcast a"), k((1, 1), b_maker(1, 1), id="ones")]


def _unary(maker=normal) -> list[KCase]:
    return [k(maker(2, 3, 5)), k(maker(7), id="flat")]


# ---- sliding-window geometry (Conv and pools), shared with their backward ops ---------------------------
CONVS = [  # (x, w, attrs, id)
    ((2, 3, 7, 8), (4, 3, 3, 3), {}, "plain"),
    ((2, 4, 9, 8), (6, 2, 3, 2), dict(strides=(2, 1), pads=(1, 0, 2, 1), dilations=(1, 2), group=2), "grouped"),
    ((2, 4, 8, 8), (4, 1, 3, 3), dict(pads=(1, 1, 1, 1), group=4), "depthwise"),
    ((2, 4, 8, 8), (8, 1, 3, 3), dict(strides=(2, 2), pads=(1, 1, 1, 1), group=4), "depthwise x2"),
    ((2, 3, 6, 6), (4, 3, 1, 1), dict(kernel_shape=(1, 1)), "pointwise"),
    ((2, 3, 10), (5, 3, 3), dict(strides=(2,), pads=(1, 2)), "1-D"),
    ((1, 2, 5, 6), (3, 2, 3, 3), dict(strides=(2, 2), auto_pad="SAME_UPPER"), "same upper"),
    ((1, 2, 5, 6), (3, 2, 2, 2), dict(auto_pad="SAME_LOWER"), "same lower"),
    ((1, 1, 8, 8), (32, 1, 3, 3), dict(pads=(1, 1, 1, 1)), "cct tokenizer"),
]
POOLS = [  # (x, attrs, id)
    ((2, 3, 6, 7), dict(kernel_shape=(2, 2), strides=(2, 2)), "2x2"),
    ((2, 3, 7, 7), dict(kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1)), "overlapping padded"),
    ((1, 2, 7, 8), dict(kernel_shape=(3, 2), strides=(2, 3), pads=(1, 1, 1, 1), ceil_mode=1), "ceil"),
    ((1, 2, 8, 8), dict(kernel_shape=(2, 2), dilations=(2, 2)), "dilated"),
    ((1, 2, 5, 5), dict(kernel_shape=(3, 3), strides=(2, 2), pads=(0, 0, 1, 1)), "asymmetric"),
    ((1, 2, 5, 5), dict(kernel_shape=(2, 2), auto_pad="SAME_UPPER"), "same upper"),
    ((2, 3, 9), dict(kernel_shape=(3,), strides=(2,), pads=(1, 1)), "1-D"),
]
AVG_EXTRA = [
    ((2, 3, 7, 7), dict(kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), count_include_pad=1), "included"),
    ((1, 2, 7, 8), dict(kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), ceil_mode=1, count_include_pad=1),
     "ceil included"),
]
SLICES = [  # (x, attrs, id)
    ((5, 6), dict(starts=(1,), ends=(4,), axes=(0,)), "rows"),
    ((5, 6), dict(starts=(0, 5), ends=(5, 0), axes=(0, 1), steps=(2, -2)), "steps"),
    ((4, 6), dict(starts=(1, -3), ends=(1000, -1)), "clamped"),
    ((2, 3, 8), dict(starts=(2,), ends=(7,), axes=(-1,), steps=(3,)), "last axis"),
]
LAYER_NORMS = [  # (x, scale, with bias, attrs, id)
    ((3, 5), (5,), True, {}, "row"),
    ((2, 3, 4), (3, 4), True, dict(axis=1, epsilon=1e-3), "two axes"),
    ((2, 3, 4), (4,), True, dict(axis=1), "repeated scale"),
    ((3, 5), (5,), False, {}, "no bias"),
    ((4, 16, 32), (32,), True, {}, "cct"),
]


LORAS = [  # (x, W, A, B, C or None, attrs, id): a LoRA layer, forward and backward; device axis on A and B
    ((6, 5), (5, 4), (5, 3), (3, 4), None, dict(scale=0.5), "2-D"),
    ((2, 3, 5), (5, 4), (5, 2), (2, 4), None, dict(scale=2.0), "3-D x"),
    ((8, 5), (5, 4), (2, 5, 3), (2, 3, 4), None, dict(scale=0.25), "2 devices"),
    ((6, 5), (4, 5), (5, 3), (3, 4), None, dict(scale=0.5, transB=1), "transB"),
    ((6, 5), (5, 4), (5, 3), (3, 4), (4,), dict(scale=0.5, alpha=0.5, beta=2.0), "bias row alpha beta"),
    ((2, 4, 6), (7, 6), (2, 6, 3), (2, 3, 7), None, dict(scale=1.5, transB=1, alpha=-0.75),
     "3-D 2 devices transB alpha"),
    ((3, 8), (8, 5), (8, 70), (70, 5), None, dict(scale=0.125), "rank above the stack chunk"),
    ((16, 64), (64, 32), (4, 64, 8), (4, 8, 32), (16, 32), dict(scale=0.25), "4 devices full C"),
]
LORA_GRADS = ("xab", "ab", "b", "xb", "x", "a")   # every subset on the first four layers, two on the others


def _lora_cases() -> dict[str, list[KCase]]:
    fwd, grad = [], []
    for i, (x, w, a, b, c, attrs, id_) in enumerate(LORAS):
        fwd.append(KCase((normal(*x), normal(*w), normal(*a), normal(*b)) + ((normal(*c),) if c else ()), attrs,
                         id_))
        y = _out("LoraLinear", x, w, a, b, **attrs)
        grad_attrs = {k_: v for k_, v in attrs.items() if k_ != "beta"}
        for grads in (LORA_GRADS if i < 4 else ("xab", LORA_GRADS[i - 3])):
            grad.append(KCase((normal(*y), normal(*x), normal(*w), normal(*a), normal(*b)),
                              dict(grad_attrs, grads=grads), f"{id_} {grads}"))
    return {"LoraLinear": fwd, "LoraLinearGrad": grad}


def spread(*shape: int) -> Make:
    """Values from -25 to 25: every piece of a piecewise activation (and Softplus's threshold)."""
    return lambda rng: (np.linspace(-25, 25, int(np.prod(shape))) + rng.uniform(-0.1, 0.1, shape).reshape(-1)
                        ).reshape(shape).astype(np.float32)


ACTIVATIONS = [  # (op, attrs): forward and backward cases each
    ("Clip", dict(min=0.0, max=6.0)), ("Clip", dict(min=-0.5)), ("LeakyRelu", dict(alpha=0.1)),
    ("HardSigmoid", dict(alpha=1 / 6, beta=0.5)), ("HardSwish", {}), ("Elu", dict(alpha=0.7)), ("Softplus", {}),
]


def _activation_cases() -> dict[str, list[KCase]]:
    out: dict[str, list[KCase]] = {}
    for op, attrs in ACTIVATIONS:
        out.setdefault(op, []).append(KCase((spread(4, 25),), attrs, str(attrs)))
        out.setdefault(op + "Grad", []).append(KCase((spread(4, 25), normal(4, 25)), attrs, str(attrs)))
    return out


LORA_CONVS = [  # (x, W, A, B, bias?, attrs, id): LoRA on a conv, forward and backward; device axis on A and B
    ((2, 3, 7, 8), (4, 3, 3, 3), (2, 3, 3, 3), (4, 2, 1, 1), True, dict(scale=0.5, pads=(1, 1, 1, 1)), "3x3 padded"),
    ((2, 4, 9, 8), (6, 4, 3, 2), (3, 4, 3, 2), (6, 3, 1, 1), False,
     dict(scale=2.0, strides=(2, 1), pads=(1, 0, 2, 1), dilations=(1, 2)), "strided dilated"),
    ((4, 3, 5, 5), (4, 3, 1, 1), (2, 2, 3, 1, 1), (2, 4, 2, 1, 1), False, dict(scale=1.0), "pointwise 2 devices"),
    ((4, 3, 10), (5, 3, 3), (2, 2, 3, 3), (2, 5, 2, 1), True, dict(scale=0.5, strides=(2,), pads=(1, 2)),
     "1-D 2 devices"),
    ((1, 2, 5, 6), (3, 2, 3, 3), (70, 2, 3, 3), (3, 70, 1, 1), False, dict(scale=0.125, auto_pad="SAME_UPPER"),
     "rank above the stack chunk"),
]


def _lora_conv_cases() -> dict[str, list[KCase]]:
    fwd, grad = [], []
    for i, (x, w, a, b, bias, attrs, id_) in enumerate(LORA_CONVS):
        fwd.append(KCase((normal(*x), normal(*w), normal(*a), normal(*b)) + ((normal(w[0]),) if bias else ()),
                         attrs, id_))
        y = _out("LoraConv", x, w, a, b, **attrs)
        for grads in (LORA_GRADS if i < 2 else ("xab", LORA_GRADS[i])):
            grad.append(KCase((normal(*y), normal(*x), normal(*w), normal(*a), normal(*b)), dict(attrs, grads=grads),
                              f"{id_} {grads}"))
    return {"LoraConv": fwd, "LoraConvGrad": grad}


def _window_attrs(attrs: dict) -> dict:
    return {k_: v for k_, v in attrs.items() if k_ != "kernel_shape"}


def _conv_cases() -> dict[str, list[KCase]]:
    fwd, grad_in, grad_w = [], [], []
    for x, w, attrs, id_ in CONVS:
        y = _out("Conv", x, w, **attrs)
        fwd.append(KCase((normal(*x), normal(*w)), attrs, id_))
        fwd.append(KCase((normal(*x), normal(*w), normal(w[0])), attrs, id_ + " bias"))
        window = _window_attrs(attrs)
        grad_in.append(KCase((normal(*y), normal(*w)), dict(window, shape=x), id_))
        grad_w.append(KCase((normal(*x), normal(*y)), dict(window, kernel_shape=w[2:]), id_))
    return {"Conv": fwd, "ConvGradInput": grad_in, "ConvGradWeight": grad_w}


def _pool_cases() -> dict[str, list[KCase]]:
    out: dict[str, list[KCase]] = {"MaxPool": [], "MaxPoolGrad": [], "AveragePool": [], "AveragePoolGrad": []}
    for x, attrs, id_ in POOLS:
        y = _out("MaxPool", x, **attrs)
        out["MaxPool"].append(KCase((normal(*x),), attrs, id_))
        out["MaxPoolGrad"].append(KCase((normal(*x), normal(*y)), attrs, id_))
    out["MaxPoolGrad"].append(KCase((fixed(np.ones((1, 1, 4, 4), np.float32)), normal(1, 1, 3, 3)),
                                    dict(kernel_shape=(2, 2)), "ties go to the first maximum"))
    for x, attrs, id_ in POOLS + AVG_EXTRA:
        y = _out("AveragePool", x, **attrs)
        out["AveragePool"].append(KCase((normal(*x),), attrs, id_))
        out["AveragePoolGrad"].append(KCase((normal(*y),), dict(attrs, shape=x), id_))
    return out


def _slice_cases() -> dict[str, list[KCase]]:
    fwd, grad = [], []
    for x, attrs, id_ in SLICES:
        y = _out("Slice", x, **attrs)
        fwd.append(KCase((normal(*x),), attrs, id_))
        grad.append(KCase((normal(*y),), dict(attrs, shape=x), id_))
    fwd.append(KCase((ints(np.int64, 5, 6),), dict(starts=(1,), ends=(4,), axes=(1,)), "int64"))
    return {"Slice": fwd, "SliceGrad": grad}


def _norm_cases() -> dict[str, list[KCase]]:
    out: dict[str, list[KCase]] = {"LayerNormalization": [], "LayerNormGradInput": [], "LayerNormGradScale": []}
    for x, scale, bias, attrs, id_ in LAYER_NORMS:
        ins = (normal(*x), normal(*scale)) + ((normal(*scale),) if bias else ())
        out["LayerNormalization"].append(KCase(ins, attrs, id_))
        grad_attrs = {k_: v for k_, v in attrs.items() if k_ in ("axis", "epsilon")}
        out["LayerNormGradInput"].append(KCase((normal(*x), normal(*scale), normal(*x)), grad_attrs, id_))
        out["LayerNormGradScale"].append(KCase((normal(*x), normal(*x)), grad_attrs, id_))
    return out


CASES: dict[str, list[KCase]] = {
    # elementwise
    "Add": _binary("Add"),
    "Sub": _binary("Sub"),
    "Mul": _binary("Mul"),
    "Div": _binary("Div", positive),
    "Pow": [k(positive(3, 4), fixed(np.float32(2.0)), id="square"), k(positive(3, 4), fixed(np.float32(0.5))),
            k(positive(3, 4), positive(4), id="row")],
    "Neg": _unary(),
    "Relu": _unary(),
    "Sigmoid": _unary(),
    "Tanh": _unary(),
    "Erf": _unary(),
    "Sqrt": _unary(positive),
    "Exp": _unary(),
    "Gelu": [k((2, 3, 5)), k((2, 3, 5), approximate="tanh", id="tanh")],
    "ReluGrad": [k(relu_out(3, 7), (3, 7))],
    "SigmoidGrad": [k(unit(3, 7), (3, 7))],
    "TanhGrad": [k(unit(3, 7), (3, 7))],
    "ErfGrad": [k((3, 7), (3, 7))],
    "GeluGrad": [k((3, 7), (3, 7)), k((3, 7), (3, 7), approximate="tanh", id="tanh")],
    **_activation_cases(),
    "PRelu": [k((2, 3, 4, 4), (3, 1, 1)), k((3, 5), (5,), id="row")],
    "EqualMask": [k(fixed(np.array([[1, 3, 3, 0], [2, 2, 2, -1]], np.float32)),
                    fixed(np.array([[3], [2]], np.float32)), id="ties"), k((3, 4), (3, 4), id="no ties")],
    "Where": [k(fixed(np.array([[True, False, True, False]] * 3)), (3, 4), (3, 4)),
              k(fixed(np.array([True, False, True, True])), (2, 3, 4), (1,), id="broadcast")],
    # GEMM
    "Gemm": [k((3, 5), (5, 4)), k((3, 5), (5, 4), (4,), id="bias row"),
             k((3, 5), (4, 5), (3, 1), transB=1, id="transB bias column"),
             k((5, 3), (5, 4), (3, 4), transA=1, id="transA full C"),
             k((4, 3), (5, 4), (3, 5), transA=1, transB=1, alpha=0.5, beta=2.0, id="both transposed"),
             k((3, 5), (5, 4), fixed(np.float32(0.25)), alpha=-1.5, id="scalar C"),
             k((64, 32), (32, 10), (10,), id="classifier")],
    "MatMul": [k((3, 5), (5, 4)), k((2, 3, 5), (5, 4), id="shared right"), k((2, 3, 5), (2, 5, 4), id="batched"),
               k((2, 1, 3, 5), (4, 5, 2), id="broadcast batch"), k((3, 5), (2, 5, 4), id="shared left"),
               k((4, 2, 16, 16), (4, 2, 16, 16), id="attention")],
    **_lora_cases(),
    **_lora_conv_cases(),
    # data movement
    "Reshape": [k((2, 3, 4), shape=(6, -1))],
    "Identity": [k((3, 4))],
    "Squeeze": [k((3, 1, 4, 1), axes=(1,))],
    "Unsqueeze": [k((3, 4), axes=(0, -1))],
    "Transpose": [k((2, 3, 4), perm=(2, 0, 1)), k((3, 4), id="default perm"),
                  k((4, 16, 2, 16), perm=(0, 2, 1, 3), id="heads"), k(ints(np.int64, 2, 3), id="int64"),
                  k((2, 1, 3), perm=(1, 2, 0), id="unit axis")],
    "Expand": [k((3, 1), shape=(2, 3, 4)), k((4,), shape=(3, 1, 4), id="leading"), k((2, 3), shape=(2, 3), id="copy"),
               k(fixed(np.float32(2.5)), shape=(2, 2), id="scalar")],
    "Concat": [k((2, 3), (2, 5), axis=1), k((2, 3, 4), (1, 3, 4), (3, 3, 4), axis=0, id="three"),
               k((2, 3), (4, 3), axis=-2, id="negative axis"), k(ints(np.int64, 2, 2), ints(np.int64, 2, 1), axis=1,
                                                                 id="int64")],
    "Split": [k((6, 4), axis=0, split=(2, 4)), k((3, 5), axis=-1, split=(1, 1, 3), id="three"),
              k((2, 9, 3), axis=1, split=(2, 3, 4), id="middle")],
    **_slice_cases(),
    "Cast": [k((3, 4), to=11, id="to float64"), k(fixed(np.array([[-2.7, 0.2, 3.9]], np.float32)), to=7, id="to int64"),
             k(ints(np.int64, 3, 4), to=1, id="int64 to float"), k(ints(np.int64, 3, 4), to=6, id="to int32"),
             k(fixed(np.array([0.0, -1.5, 2.0], np.float32)), to=9, id="to bool")],
    "Shape": [k((2, 3, 4)), k((2, 3, 4), start=-2, end=-1, id="range"), k((2, 3), start=2, id="empty")],
    "Gather": [k((4, 3), fixed(np.array([3, 0, 3], np.int64)), axis=0),
               k((4, 3), fixed(np.array([[1], [2]], np.int64)), axis=1, id="axis 1"),
               k((4, 3), fixed(np.array([-1, 1], np.int32)), id="int32 negative")],
    "GatherGrad": [k((3, 3), fixed(np.array([3, 0, 3], np.int64)), shape=(4, 3), axis=0, id="repeated"),
                   k((2, 1, 3), fixed(np.array(0, np.int64)), shape=(2, 5, 3), axis=1, id="class token"),
                   k((4, 2), fixed(np.array([-1, 1], np.int32)), shape=(4, 3), axis=1, id="int32 negative")],
    # reductions
    "ReduceSum": [k((2, 3, 4), axes=(1,)), k((2, 3, 4), axes=(0, -1), keepdims=0, id="drop"), k((2, 3), id="all"),
                  k((4, 8, 5, 5), axes=(0, 2, 3), keepdims=0, id="conv bias")],
    "ReduceMax": [k((2, 3, 4), axes=(1,)), k((2, 3, 4), axes=(0, -1), keepdims=0, id="drop"), k((2, 3), id="all")],
    "ReduceMean": [k((2, 3, 4), axes=(1,)), k((2, 3, 4), axes=(0, -1), keepdims=0, id="drop"), k((2, 3), id="all")],
    "ReduceSumTo": [k((2, 3, 4), shape=(3, 1)), k((2, 3, 4), shape=(4,), id="bias"), k((2, 3, 4), shape=(1, 3, 1)),
                    k((2, 3, 4), shape=(2, 3, 4), id="same"), k((64, 32), shape=(32,), id="rows")],
    # sliding windows
    **_conv_cases(),
    **_pool_cases(),
    "GlobalAveragePool": [k((2, 3, 4, 5)), k((2, 3, 6), id="1-D")],
    # normalizations
    "Softmax": [k((3, 5)), k((2, 3, 4), axis=1, id="axis 1"), k((4, 2, 16, 16), id="attention")],
    "SoftmaxGrad": [k(softmax_out((3, 5)), (3, 5)), k(softmax_out((2, 3, 4), 1), (2, 3, 4), axis=1, id="axis 1")],
    **_norm_cases(),
    "BatchNormalization": [k((2, 3, 4, 4), (3,), (3,), (3,), positive(3)),
                           k((4, 3), (3,), (3,), (3,), positive(3), epsilon=1e-3, id="2-D")],
    # losses
    "SoftmaxCrossEntropy": [k((4, 5), labels(5, 4)), k((2, 3, 5), labels(5, 2, 3), id="3-D")],
    "SoftmaxCrossEntropyGrad": [k((4, 5), labels(5, 4), scalar(1.0)), k((2, 3, 5), labels(5, 2, 3), scalar(0.7),
                                                                            id="3-D")],
    "MSELoss": [k((4, 3), (4, 3)), k((4, 640), (4, 640), id="deep-ae")],
    "MSELossGrad": [k((4, 3), (4, 3), scalar(1.0)), k((2, 5), (2, 5), scalar(0.3), id="scaled")],
    # optimizer
    "SGD": [k((3, 4), (3, 4), fixed(np.float32(0.1))),
            k((3, 4), (3, 4), fixed(np.float32(0.1)), (3, 4), momentum=0.9, weight_decay=0.01, id="momentum"),
            k((7,), (7,), fixed(np.float32(0.05)), weight_decay=0.1, id="weight decay"),
            k((6, 2, 3), (2, 2, 3), fixed(np.float32(0.1)), (2, 2, 3), momentum=0.9, axis=0, channels=2,
              id="sparse first channels"),
            k((3, 5), (3, 2), fixed(np.float32(0.1)), weight_decay=0.01, axis=1, channels=2, id="sparse columns")],
    # int8 (the quantized graph): exact integers, so any difference is a bug
    "Quantize": [k(normal(3, 5), scale=0.01, zero_point=-3), k(normal(4, 2, 3), scale=0.5, zero_point=0, id="halves")],
    "Dequantize": [k(int8(3, 5), zero_point=-5), k(int8(7), scale=0.25, zero_point=3, id="scaled")],
    "RequantGrad": [k((2, 3, 4), scales(3), int8(2, 3, 4, edges=True)), k((2, 3), scales(3), id="float output")],
    "QConv": [k(int8(*x), int8(*w), int32s(w[0]), scales(w[0], 2e-3), x_zero=-7, y_zero=-128, id=id_,
                **{key: v for key, v in a.items() if key != "kernel_shape"})
              for x, w, a, id_ in CONVS if not a.get("auto_pad")]
             + [k(int8(1, 2, 2, 300), int8(3, 2, 2, 3), int32s(3), scales(3, 2e-3), pads=(1, 1, 0, 1), x_zero=4,
                  y_zero=-10, id="rows longer than the stack segment")],
    "QLinear": [k(int8(3, 6), int8(4, 6), int32s(4), scales(4, 2e-3), x_zero=-2, y_zero=-128),
                k(int8(2, 64), int8(12, 64), int32s(12), scales(12, 1e-3), x_zero=9, output="float32",
                  id="float logits")],
    "QGlobalAveragePool": [k(int8(2, 3, 4, 5)), k(int8(2, 3, 6), id="1-D"), k(int8(1, 64, 25, 5), id="ds-cnn")],
    "QSGD": [k(int8(4, 3), (4, 3), fixed(np.float32(0.7))),
             k(int32s(4), (2,), fixed(np.float32(300.0)), axis=0, channels=2, id="int32 first channels"),
             k(int8(4, 3), (2, 3), fixed(np.float32(0.7)), lambda rng: int8(2, 3)(rng).astype(np.float32), axis=0,
               channels=2, id="master"),
             k(int8(4, 3), (4, 3), fixed(np.float32(500.0)), id="saturating")],
    "Adam": [k((3, 4), (3, 4), fixed(np.float32(0.01)), (3, 4), positive(3, 4), fixed(np.zeros(2, np.float32))),
             k((3, 4), (3, 4), fixed(np.float32(0.01)), (3, 4), positive(3, 4),
               fixed(np.array([0.488, 0.0297], np.float32)), beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.01,
               id="later step, weight decay"),
             k((6, 2, 3), (2, 2, 3), fixed(np.float32(0.01)), (2, 2, 3), positive(2, 2, 3),
               fixed(np.zeros(2, np.float32)), axis=0, channels=2, id="sparse first channels")],
}
