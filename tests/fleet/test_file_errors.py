"""Every error that concerns a file names it: ONNX external data, NaN/Inf initializers, .npz device files
checked before a run, non-UTF-8 scenarios."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler import compile_model
from compiler.ir import CompileError
from fleet.data import DataError, check_npz_files
from fleet.scenario import DataSpec, ScenarioError, load_scenario


def _gemm_model(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "fc.weight"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(weight, "fc.weight")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


WEIGHT = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)


def test_missing_onnx_external_data_names_the_data_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_gemm_model(WEIGHT), path, save_as_external_data=True, location="m.data", size_threshold=0)
    assert compile_model(str(path), tuning="full", batch=2).report["params"]["total"] == 12
    os.remove(tmp_path / "m.data")
    with pytest.raises(CompileError, match=rf"{path}: tensor 'fc.weight' is stored in {tmp_path / 'm.data'}, "
                                           "which is missing"):
        compile_model(str(path), tuning="full", batch=2)


@pytest.mark.parametrize("value,counts", [(np.nan, "1 NaN, 0 Inf"), (np.inf, "0 NaN, 1 Inf")])
def test_a_non_finite_initializer_is_a_compile_error_naming_the_tensor(value, counts):
    weight = WEIGHT.copy()
    weight[1, 2] = value
    with pytest.raises(CompileError, match=rf"initializer 'fc.weight' holds non-finite values \({counts} of 12\)"):
        compile_model(_gemm_model(weight), tuning="full", batch=2)


def _device(path, n=8, shape=(1, 4, 4)):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.random((n, *shape)), y_train=np.zeros(n, np.int64),
             x_test=rng.random((n, *shape)), y_test=np.zeros(n, np.int64))


def test_npz_devices_are_checked_up_front_naming_the_file(tmp_path):
    _device(tmp_path / "global.npz", n=64)
    for i in range(4):
        _device(tmp_path / f"device_{i}.npz")
    spec = DataSpec(kind="npz", path=str(tmp_path))
    check_npz_files(spec, 4)
    _device(tmp_path / "device_3.npz", shape=(1, 4, 5))
    with pytest.raises(DataError, match=r"device_3.npz: x_train: samples of shape \(1, 4, 5\) differ from "
                                        r"global.npz's \(1, 4, 4\)"):
        check_npz_files(spec, 4)
    _device(tmp_path / "device_3.npz", n=9)
    with pytest.raises(DataError, match=r"device_3.npz: x_train: shape \(9, 1, 4, 4\) differs from device_0.npz's"):
        check_npz_files(spec, 4)
    _device(tmp_path / "device_3.npz")
    with pytest.raises(DataError, match=r"device_4.npz: no such file"):
        check_npz_files(spec, 5)
    (tmp_path / "device_2.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"device_2.npz: cannot read"):
        check_npz_files(spec, 4)


def test_a_non_utf8_scenario_names_the_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ScenarioError, match=rf"{path}: not UTF-8 text \(byte 11: "):
        load_scenario(path)
