"""The model zoo (valid, sized, seeded, named as documented, run by onnxruntime) and the TorchOnnx oracle
(equal to onnxruntime on every zoo model and on one-op graphs for each op it implements; gradients)."""
from __future__ import annotations

import functools
import importlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compiler import zoo
from tests.oracle.torch_onnx import OPS, LoraFactors, TorchOnnx

PARAMETER_RANGES = {"cct-2-3x2": (250_000, 310_000), "cct-digits": (2_000, 60_000),
                    "deep-ae": (250_000, 290_000), "ds-cnn": (10_000, 60_000)}
RTOL, ATOL = 1e-4, 1e-5
MODELS = zoo.names()


@functools.cache
def model(name: str, seed: int = 0) -> onnx.ModelProto:
    return zoo.build(name, seed)


@functools.cache
def session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(model(name).SerializeToString(), providers=["CPUExecutionProvider"])


def batch(name: str, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((size, *zoo.input_shape(name))).astype(np.float32)


def weights(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def nodes(m: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in m.graph.node}


# ---- the registry ----------------------------------------------------------------------------------------
def test_names_match_registry_and_entries_are_consistent():
    assert MODELS == list(zoo.ZOO) == ["cct-2-3x2", "cct-digits", "deep-ae", "ds-cnn"]
    assert zoo.ZOO["cct-2-3x2"].input_shape == (3, 32, 32)
    assert zoo.ZOO["cct-digits"].input_shape == (1, 8, 8)
    assert zoo.ZOO["deep-ae"].task == "reconstruction" and zoo.ZOO["deep-ae"].num_classes is None
    assert zoo.ZOO["ds-cnn"].num_classes == 12 and zoo.input_shape("ds-cnn") == (1, 49, 10)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="cct-2-3x2.*cct-digits.*deep-ae.*ds-cnn"):
        zoo.build("resnet-50")


# ---- every model ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_model_passes_full_check_with_dynamic_batch(name):
    m = model(name)
    onnx.checker.check_model(m, full_check=True)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 17)]
    (inp,), (out,) = m.graph.input, m.graph.output
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert tuple(d.dim_value for d in inp.type.tensor_type.shape.dim[1:]) == zoo.input_shape(name)
    assert out.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert all(i.data_type == TensorProto.FLOAT for i in m.graph.initializer)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_in_range_and_documented(name):
    low, high = PARAMETER_RANGES[name]
    count = zoo.count_parameters(model(name))
    assert low <= count <= high
    module = {"cct-2-3x2": "cct", "cct-digits": "cct", "deep-ae": "deep_ae", "ds-cnn": "ds_cnn"}[name]
    assert f"{count:,}" in importlib.import_module(f"compiler.zoo.{module}").__doc__


@pytest.mark.parametrize("name", MODELS)
def test_seed_determines_the_weights(name):
    assert zoo.build(name, seed=0).SerializeToString() == model(name).SerializeToString()
    w0, w1 = weights(model(name)), weights(zoo.build(name, seed=1))
    assert w0.keys() == w1.keys()
    assert all(not np.array_equal(w0[k], w1[k]) for k in w0)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [1, 4])
def test_onnxruntime_runs_at_batch(name, size):
    (y,) = session(name).run(None, {"input": batch(name, size)})
    assert y.shape == (size, *zoo.ZOO[name].output_shape)
    assert np.isfinite(y).all() and 0.1 < y.std() < 10  # neither vanishing nor exploding at init


@pytest.mark.parametrize("name", MODELS)
def test_oracle_forward_equals_onnxruntime(name):
    x = batch(name, 4, seed=1)
    (expected,) = session(name).run(None, {"input": x})
    got = TorchOnnx(model(name), dtype=torch.float32).forward(x)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", MODELS)
def test_oracle_gradients_reach_exactly_the_trainable_set(name):
    m = model(name)
    trainable = set(sorted(weights(m))[::2])
    oracle = TorchOnnx(m, trainable=trainable)
    target = torch.from_numpy(np.random.default_rng(2).standard_normal((2, *zoo.ZOO[name].output_shape)))
    (oracle.forward(batch(name, 2)) * target).sum().backward()
    params = oracle.parameters()
    assert set(params) == trainable
    for key, p in params.items():
        assert p.is_leaf and p.grad is not None and torch.isfinite(p.grad).all(), key
        if key.endswith(".weight"):
            assert p.grad.abs().max() > 0, key
    frozen = [t for k, t in oracle.weights.items() if k not in trainable]
    assert frozen and not any(t.requires_grad for t in frozen)


@pytest.mark.parametrize("name, layer", [("cct-digits", "blocks.0.attn.q"), ("deep-ae", "encoder.1")])
def test_oracle_lora_equals_merged_weight_and_gets_gradients(name, layer):
    m = model(name)
    w = weights(m)[f"{layer}.weight"]
    transposed = nodes(m)[layer].op_type == "Gemm"  # Gemm weights are (out, in)
    fan_in, fan_out = w.shape[::-1] if transposed else w.shape
    rng = np.random.default_rng(3)
    a, b, alpha, rank = rng.standard_normal((fan_in, 4)), rng.standard_normal((4, fan_out)), 8.0, 4
    oracle = TorchOnnx(m, lora={layer: LoraFactors(a, b, alpha)})
    x = batch(name, 3)
    y = oracle.forward(x)
    merged = onnx.ModelProto()
    merged.CopyFrom(m)
    delta = alpha / rank * a @ b
    for init in merged.graph.initializer:
        if init.name == f"{layer}.weight":
            init.CopyFrom(numpy_helper.from_array((w + (delta.T if transposed else delta)).astype(np.float32),
                                                  init.name))
    np.testing.assert_allclose(y.detach().numpy(), TorchOnnx(merged).forward(x).numpy(), rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    params = oracle.parameters()
    assert set(params) == {f"{layer}.lora_a", f"{layer}.lora_b"}
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params.values())


def test_oracle_rejects_unknown_trainables_and_lora_targets():
    with pytest.raises(ValueError, match="not initializers"):
        TorchOnnx(model("cct-digits"), trainable={"no.such.weight"})
    with pytest.raises(ValueError, match="not a MatMul, Gemm or Conv"):
        TorchOnnx(model("cct-digits"), lora={"blocks.0.norm1": LoraFactors(np.zeros((32, 2)), np.zeros((2, 32)), 1)})


# ---- documented names ---------------------------------------------------------------------------------
def _check_linear(m, layer, fan_in, fan_out):
    n, w = nodes(m), weights(m)
    assert n[layer].op_type == "MatMul" and list(n[layer].input)[1] == f"{layer}.weight"
    assert n[f"{layer}/Add"].op_type == "Add" and list(n[f"{layer}/Add"].input) == [n[layer].output[0],
                                                                                      f"{layer}.bias"]
    assert w[f"{layer}.weight"].shape == (fan_in, fan_out) and w[f"{layer}.bias"].shape == (fan_out,)


def _check_norm(m, layer, dim):
    assert nodes(m)[layer].op_type == "LayerNormalization"
    assert weights(m)[f"{layer}.weight"].shape == weights(m)[f"{layer}.bias"].shape == (dim,)


def _check_layer_prefixes(m, layers):
    names = [n.name for n in m.graph.node]
    assert all(names) and len(set(names)) == len(names)
    for name in names:
        assert name.split("/")[0] in layers, name
    for init in m.graph.initializer:
        owner = init.name.rsplit(".", 1)[0]
        assert owner in names and owner in layers, init.name


@pytest.mark.parametrize("name, dim, hidden, blocks, tokens",
                         [("cct-2-3x2", 128, 128, 2, 64), ("cct-digits", 32, 64, 1, 16)])
def test_cct_layers_are_named_as_documented(name, dim, hidden, blocks, tokens):
    m = model(name)
    n, w = nodes(m), weights(m)
    convs = [k for k in n if k.startswith("tokenizer.conv") and "/" not in k]
    assert all(n[c].op_type == "Conv" and len(n[c].input) == 2 for c in convs)  # no bias
    assert w[convs[-1] + ".weight"].shape[0] == dim
    assert n["pos_embedding"].op_type == "Add" and w["pos_embedding.weight"].shape == (1, tokens, dim)
    layers = {"tokenizer", "pos_embedding", "norm", "pool", "pool.attention", "classifier", *convs}
    for i in range(blocks):
        p = f"blocks.{i}"
        _check_norm(m, f"{p}.norm1", dim)
        _check_norm(m, f"{p}.norm2", dim)
        for proj in ("q", "k", "v", "proj"):
            _check_linear(m, f"{p}.attn.{proj}", dim, dim)
        _check_linear(m, f"{p}.mlp.fc1", dim, hidden)
        _check_linear(m, f"{p}.mlp.fc2", hidden, dim)
        assert [n[f"{p}.attn/{op}"].op_type for op in ("MatMul", "Mul", "Softmax", "MatMul_1")] == \
            ["MatMul", "Mul", "Softmax", "MatMul"]
        layers |= {p, f"{p}.norm1", f"{p}.norm2", f"{p}.attn", f"{p}.mlp.fc1", f"{p}.mlp.fc2", f"{p}.mlp.gelu",
                   *(f"{p}.attn.{proj}" for proj in ("q", "k", "v", "proj"))}
    _check_norm(m, "norm", dim)
    _check_linear(m, "pool.attention", dim, 1)
    _check_linear(m, "classifier", dim, 10)
    _check_layer_prefixes(m, layers)


@pytest.mark.parametrize("name", ["cct-2-3x2", "cct-digits"])
def test_cct_gelu_is_torchs_erf_form(name):
    m = model(name)
    n = nodes(m)
    consts = {c.output[0]: float(numpy_helper.to_array(c.attribute[0].t)) for c in m.graph.node
              if c.op_type == "Constant" and c.attribute[0].t.data_type == TensorProto.FLOAT}
    x = n["blocks.0.mlp.fc1/Add"].output[0]
    div, erf, add, mul, mul1 = (n[f"blocks.0.mlp.gelu/{op}"] for op in ("Div", "Erf", "Add", "Mul", "Mul_1"))
    assert div.input[0] == x and consts[div.input[1]] == pytest.approx(2 ** 0.5)
    assert list(erf.input) == [div.output[0]]
    assert add.input[0] == erf.output[0] and consts[add.input[1]] == 1.0
    assert list(mul.input) == [x, add.output[0]]
    assert mul1.input[0] == mul.output[0] and consts[mul1.input[1]] == 0.5
    assert n["blocks.0.mlp.fc2"].input[0] == mul1.output[0]


def test_deep_ae_layers_are_named_as_documented():
    m = model("deep-ae")
    n, w = nodes(m), weights(m)
    dims = [640, 128, 128, 128, 128, 8, 128, 128, 128, 128, 640]
    layers = [f"encoder.{i}" for i in range(5)] + [f"decoder.{i}" for i in range(5)]
    for layer, fan_in, fan_out in zip(layers, dims, dims[1:]):
        attrs = {a.name: helper.get_attribute_value(a) for a in n[layer].attribute}
        assert n[layer].op_type == "Gemm" and attrs["transB"] == 1 and attrs.get("transA", 0) == 0
        assert w[f"{layer}.weight"].shape == (fan_out, fan_in) and w[f"{layer}.bias"].shape == (fan_out,)
        if layer == "decoder.4":
            assert n[layer].output[0] == m.graph.output[0].name and f"{layer}.bn" not in n
        else:
            assert n[f"{layer}.bn"].op_type == "BatchNormalization" and n[f"{layer}/Relu"].op_type == "Relu"
    _check_layer_prefixes(m, set(layers) | {f"{layer}.bn" for layer in layers})


def test_ds_cnn_layers_are_named_as_documented():
    m = model("ds-cnn")
    n, w = nodes(m), weights(m)
    assert w["conv0.weight"].shape == (64, 1, 10, 4)
    layers = {"conv0", "conv0.bn", "pool", "classifier"}
    for i in range(4):
        dw, pw = f"blocks.{i}.dw", f"blocks.{i}.pw"
        group = {a.name: helper.get_attribute_value(a) for a in n[dw].attribute}["group"]
        assert n[dw].op_type == n[pw].op_type == "Conv" and group == 64
        assert w[f"{dw}.weight"].shape == (64, 1, 3, 3) and w[f"{pw}.weight"].shape == (64, 64, 1, 1)
        layers |= {dw, pw, f"{dw}.bn", f"{pw}.bn"}
    assert n["classifier"].op_type == "Gemm" and w["classifier.weight"].shape == (12, 64)
    _check_layer_prefixes(m, layers)


# ---- the oracle on one-op graphs (every op the zoo does not exercise, and odd attribute forms) -------------
R = np.random.default_rng(7)


def f32(*shape, positive=False):
    x = R.standard_normal(shape).astype(np.float32)
    return np.abs(x) + 0.1 if positive else x


def i64(*values):
    return np.array(values, np.int64)


# (id, op, feeds (float graph inputs), constants (initializers), attributes, opset, output types)
CASES = [
    ("sub", "Sub", {"a": f32(2, 3), "b": f32(3)}, {}, {}, 17, ["f"]),
    ("pow", "Pow", {"a": f32(2, 3, positive=True), "b": f32(2, 3)}, {}, {}, 17, ["f"]),
    ("sqrt", "Sqrt", {"a": f32(2, 3, positive=True)}, {}, {}, 17, ["f"]),
    ("sigmoid", "Sigmoid", {"a": f32(2, 3)}, {}, {}, 17, ["f"]),
    ("tanh", "Tanh", {"a": f32(2, 3)}, {}, {}, 17, ["f"]),
    ("neg", "Neg", {"a": f32(2, 3)}, {}, {}, 17, ["f"]),
    ("exp", "Exp", {"a": f32(2, 3)}, {}, {}, 17, ["f"]),
    ("log", "Log", {"a": f32(2, 3, positive=True)}, {}, {}, 17, ["f"]),
    ("identity", "Identity", {"a": f32(2, 3)}, {}, {}, 17, ["f"]),
    ("dropout", "Dropout", {"a": f32(2, 3)}, {}, {}, 17, ["f"]),
    ("gelu", "Gelu", {"a": f32(2, 3)}, {}, {}, 20, ["f"]),
    ("gelu-tanh", "Gelu", {"a": f32(2, 3)}, {}, {"approximate": "tanh"}, 20, ["f"]),
    ("softmax-axis1", "Softmax", {"a": f32(2, 3, 4)}, {}, {"axis": 1}, 17, ["f"]),
    ("softmax-opset11", "Softmax", {"a": f32(2, 3, 4)}, {}, {"axis": 1}, 11, ["f"]),
    ("layernorm-axis1-all-outputs", "LayerNormalization", {"a": f32(2, 3, 4), "s": f32(3, 4), "b": f32(3, 4)},
     {}, {"axis": 1, "epsilon": 1e-3}, 17, ["f", "f", "f"]),
    ("batchnorm-4d", "BatchNormalization", {"a": f32(2, 3, 4, 5), "s": f32(3), "b": f32(3), "m": f32(3),
                                            "v": f32(3, positive=True)}, {}, {"epsilon": 1e-2}, 17, ["f"]),
    ("gemm-transA-alpha-beta", "Gemm", {"a": f32(3, 2), "b": f32(3, 4), "c": f32(1, 4)}, {},
     {"alpha": 0.5, "beta": 2.0, "transA": 1}, 17, ["f"]),
    ("matmul-broadcast", "MatMul", {"a": f32(2, 1, 3, 4), "b": f32(5, 4, 2)}, {}, {}, 17, ["f"]),
    ("conv-same-upper-stride2", "Conv", {"a": f32(1, 2, 7, 6), "w": f32(3, 2, 3, 2), "b": f32(3)}, {},
     {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 17, ["f"]),
    ("conv-same-lower-group", "Conv", {"a": f32(1, 4, 7, 6), "w": f32(4, 2, 2, 3)}, {},
     {"auto_pad": "SAME_LOWER", "group": 2, "strides": [1, 2]}, 17, ["f"]),
    ("conv-dilated", "Conv", {"a": f32(1, 2, 7, 7), "w": f32(3, 2, 2, 3)}, {},
     {"dilations": [2, 1], "pads": [1, 0, 2, 1]}, 17, ["f"]),
    ("conv-asymmetric-pads-1d", "Conv", {"a": f32(2, 2, 9), "w": f32(3, 2, 4)}, {},
     {"pads": [2, 1], "strides": [2]}, 17, ["f"]),
    ("maxpool-asymmetric-pads", "MaxPool", {"a": f32(1, 2, 6, 5)}, {},
     {"kernel_shape": [3, 2], "pads": [0, 1, 1, 0], "strides": [2, 2]}, 17, ["f"]),
    ("avgpool-exclude-pad", "AveragePool", {"a": f32(1, 2, 5, 5)}, {},
     {"kernel_shape": [2, 3], "pads": [1, 0, 0, 1], "strides": [2, 1]}, 17, ["f"]),
    ("avgpool-include-pad", "AveragePool", {"a": f32(1, 2, 5, 5)}, {},
     {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2], "count_include_pad": 1}, 17, ["f"]),
    ("global-average-pool", "GlobalAveragePool", {"a": f32(2, 3, 4, 5)}, {}, {}, 17, ["f"]),
    ("reshape-zero-minus-one", "Reshape", {"a": f32(2, 3, 4)}, {"s": i64(0, -1)}, {}, 17, ["f"]),
    ("flatten-negative-axis", "Flatten", {"a": f32(2, 3, 4)}, {}, {"axis": -1}, 17, ["f"]),
    ("transpose-default", "Transpose", {"a": f32(2, 3, 4)}, {}, {}, 17, ["f"]),
    ("concat", "Concat", {"a": f32(2, 3), "b": f32(2, 2)}, {}, {"axis": 1}, 17, ["f"]),
    ("split-sizes", "Split", {"a": f32(2, 3)}, {"s": i64(1, 2)}, {"axis": 1}, 17, ["f", "f"]),
    ("split-num-outputs", "Split", {"a": f32(2, 5)}, {}, {"axis": 1, "num_outputs": 2}, 18, ["f", "f"]),
    ("slice-negative-step", "Slice", {"a": f32(4, 6)},
     {"st": i64(-1, 1), "en": i64(-1000, 5), "ax": i64(0, 1), "sp": i64(-2, 2)}, {}, 17, ["f"]),
    ("reduce-mean-attr", "ReduceMean", {"a": f32(2, 3, 4)}, {}, {"axes": [1], "keepdims": 0}, 17, ["f"]),
    ("reduce-mean-input", "ReduceMean", {"a": f32(2, 3, 4)}, {"ax": i64(-1)}, {}, 18, ["f"]),
    ("reduce-sum", "ReduceSum", {"a": f32(2, 3, 4)}, {"ax": i64(0, 2)}, {}, 17, ["f"]),
    ("gather-negative", "Gather", {"a": f32(3, 4)}, {"i": np.array([[0, -1], [2, 1]], np.int64)}, {"axis": 1},
     17, ["f"]),
    ("unsqueeze", "Unsqueeze", {"a": f32(2, 3)}, {"ax": i64(0, -1)}, {}, 17, ["f"]),
    ("squeeze", "Squeeze", {"a": f32(2, 1, 3)}, {"ax": i64(1)}, {}, 17, ["f"]),
    ("cast-int64", "Cast", {"a": f32(2, 3) * 3}, {}, {"to": TensorProto.INT64}, 17, ["i"]),
    ("shape-start", "Shape", {"a": f32(2, 3, 4)}, {}, {"start": 1}, 17, ["i"]),
    ("constant-floats", "Constant", {}, {}, {"value_floats": [1.5, -2.0]}, 17, ["f"]),
]
OUTPUT_TYPES = {"f": TensorProto.FLOAT, "i": TensorProto.INT64}


def one_op_model(op_type, feeds, consts, attrs, opset, out_types):
    inputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in feeds.items()]
    outputs = [helper.make_tensor_value_info(f"y{i}", OUTPUT_TYPES[t], None) for i, t in enumerate(out_types)]
    node = helper.make_node(op_type, [*feeds, *consts], [o.name for o in outputs], name=f"op/{op_type}", **attrs)
    graph = helper.make_graph([node], "one-op", inputs, outputs,
                              initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_oracle_op_equals_onnxruntime(case):
    _, op_type, feeds, consts, attrs, opset, out_types = case
    m = one_op_model(op_type, feeds, consts, attrs, opset, out_types)
    expected = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = TorchOnnx(m, dtype=torch.float32).forward(*feeds.values())
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        np.testing.assert_allclose(g.detach().numpy(), e, rtol=RTOL, atol=ATOL)


def test_every_listed_op_is_implemented():
    listed = {"Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Gelu", "Erf", "Sigmoid", "Tanh",
              "Softmax", "LayerNormalization", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
              "Reshape", "Flatten", "Transpose", "Concat", "Split", "Slice", "ReduceMean", "Identity", "Constant",
              "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast", "Dropout", "Pow", "Sqrt"}
    assert listed <= set(OPS)


def test_oracle_names_an_unsupported_op():
    m = one_op_model("Einsum", {"a": f32(2, 3)}, {}, {"equation": "ij->ji"}, 17, ["f"])
    with pytest.raises(NotImplementedError, match="Einsum"):
        TorchOnnx(m).forward(f32(2, 3))
