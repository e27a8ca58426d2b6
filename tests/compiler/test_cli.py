"""`edgefleet compile`: the report (table and JSON schema), the artifact, and one-line errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compiler.program import Program


def edgefleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args], capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


REPORT_KEYS = ["params.total", "params.trainable", "memory.frozen_weights_bytes", "memory.trainable_bytes",
               "memory.gradient_bytes", "memory.optimizer_state_bytes", "memory.arena_bytes",
               "memory.arena_lower_bound_bytes", "flops.forward", "flops.backward", "flops.update"]


def test_json_report_and_artifact(tmp_path):
    out = edgefleet("compile", "cct-2-3x2", "--strategy", "lora+head", "--batch", "4", "--momentum", "0.9",
                    "-o", str(tmp_path / "prog"), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in REPORT_KEYS:
        section, name = key.split(".")
        assert isinstance(report[section][name], int) and report[section][name] >= 0, key
    assert 0 < report["params"]["trainable"] < report["params"]["total"]
    assert report["memory"]["optimizer_state_bytes"] == report["memory"]["trainable_bytes"]  # momentum
    assert report["memory"]["arena_bytes"] <= 1.05 * report["memory"]["arena_lower_bound_bytes"]
    program = Program.load(tmp_path / "prog")
    assert program.report["params"] == report["params"]
    manifest = json.loads((tmp_path / "prog" / "manifest.json").read_text())
    assert manifest["format"] == "edgefleet.program" and manifest["version"] == 1
    with np.load(tmp_path / "prog" / "params.npz", allow_pickle=False) as npz:
        assert set(program.trainable) <= set(npz.files)


def test_adam_keeps_two_moments_per_trainable(tmp_path):
    out = edgefleet("compile", "deep-ae", "--strategy", "lora", "--optimizer", "adam", "--json")
    assert out.returncode == 0, out.stderr
    memory = json.loads(out.stdout)["memory"]
    # m and v per trainable element, plus two bias corrections per trainable tensor
    assert 2 * memory["trainable_bytes"] < memory["optimizer_state_bytes"] < 2.01 * memory["trainable_bytes"]


def test_table_report_with_target():
    out = edgefleet("compile", "deep-ae", "--strategy", "lora", "--target", "siracusa")
    assert out.returncode == 0, out.stderr
    for label in ("parameters", "arena", "FLOPs / step", "DMA / step", "target", "memory by level"):
        assert label in out.stdout


def _model(tmp_path, node, inputs, outputs, initializers=(), name="m.onnx"):
    graph = helper.make_graph([node], "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / name
    onnx.save(model, path)
    return path


def test_corrupt_file(tmp_path):
    good = tmp_path / "good.onnx"
    from compiler import zoo
    onnx.save(zoo.build("deep-ae"), good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 3])
    one_line_error(edgefleet("compile", str(bad)), str(bad))


def test_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("these are not the bytes you are looking for\n")
    one_line_error(edgefleet("compile", str(path)), "not")


def test_missing_file(tmp_path):
    one_line_error(edgefleet("compile", str(tmp_path / "nope.onnx")), "no such file")


def test_unsupported_op(tmp_path):
    node = helper.make_node("Hardmax", ["x"], ["y"], name="weird")
    path = _model(tmp_path, node, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    one_line_error(edgefleet("compile", str(path), "--strategy", "full"), "node 'weird'", "op 'Hardmax'",
                   "not supported", "docs/ops.md")


def test_unknown_dimension(tmp_path):
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32))
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")
    path = _model(tmp_path, node, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w])
    one_line_error(edgefleet("compile", str(path), "--strategy", "full"), "unknown dimension", "width")


def test_lora_pattern_matches_nothing():
    one_line_error(edgefleet("compile", "cct-digits", "--strategy", "lora", "--lora-targets", "*decoder*"),
                   "'*decoder*'", "matches no")


def test_lora_rank_too_large():
    one_line_error(edgefleet("compile", "deep-ae", "--strategy", "lora", "--lora-rank", "64"),
                   "rank 64", "encoder.4")


def test_debug_shows_the_traceback():
    out = edgefleet("--debug", "compile", "deep-ae", "--strategy", "lora", "--lora-rank", "64")
    assert out.returncode != 0 and "Traceback" in out.stderr


@pytest.mark.parametrize("args", [["--strategy", "selective"], ["--strategy", "warp-speed"],
                                  ["--strategy", "full", "--lora-rank", "4"]])
def test_bad_options(args):
    one_line_error(edgefleet("compile", "deep-ae", *args))


def test_build_rv32_qemu_elf(tmp_path):
    out = edgefleet("compile", "deep-ae", "--strategy", "lora", "--target", "rv32-qemu", "--build",
                    "-o", str(tmp_path / "fw"))
    assert out.returncode == 0, out.stderr
    elf = (tmp_path / "fw" / "firmware.elf").read_bytes()
    assert elf[:4] == b"\x7fELF" and elf[4] == 1  # ELF32
    assert int.from_bytes(elf[18:20], "little") == 0xF3  # EM_RISCV


def test_int8_compile_and_its_options(tmp_path):
    """--int8 compiles the int8 form (calibrated on the zoo task's samples): int8 weights and activations, QSGD
    updates with QAS; --no-qas drops the QAS factors; the int8 options without --int8 are one line."""
    out = edgefleet("compile", "ds-cnn", "--strategy", "sparse", "--sparse", "blocks.3.pw=1/4", "--sparse",
                    "classifier=all", "--int8", "--batch", "1", "-o", str(tmp_path / "q"), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert len(report["int8"]["layers"]) == 10 and report["params"]["trainable"] == 16 * 64 + 64 + 12 * 64 + 12
    program = Program.load(tmp_path / "q")
    assert program.tensors["blocks.3.pw.weight"].dtype == "int8" and program.tensors["classifier.bias"].dtype == "int32"
    assert program.optimizer["int8"] == {"qas": True, "update": "round"}
    assert any(s.inputs[1].endswith(".qas_factor") for s in program.train.steps if s.op == "Mul")
    plain = edgefleet("compile", "ds-cnn", "--strategy", "sparse", "--sparse", "classifier=all", "--int8", "--no-qas",
                      "--batch", "1", "-o", str(tmp_path / "n"))
    assert plain.returncode == 0, plain.stderr
    program = Program.load(tmp_path / "n")
    assert program.optimizer["int8"]["qas"] is False and not any("qas" in n for n in program.tensors)
    one_line_error(edgefleet("compile", "ds-cnn", "--strategy", "sparse", "--sparse", "classifier=all", "--no-qas"),
                   "--no-qas and --int8-update apply to int8 training: add --int8")
    one_line_error(edgefleet("compile", "cct-digits", "--strategy", "full", "--int8", "--batch", "1"),
                   "int8: node", "has no quantized form")
