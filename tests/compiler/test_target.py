"""Target descriptions (TOML) and lowering: hand-computed cycle counts, then properties over programs.

Hand-computed cases use an "ideal DMA" variant of siracusa (1024 B/cycle, no latency) so that one tile
is the best plan and every term of the formula is visible; the DMA formula itself is checked on the real
siracusa links.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from types import MappingProxyType

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler import zoo
from compiler.ir import CompileError
from compiler.pipeline import compile_model
from compiler.program import Program
from compiler.targets import (Link, TargetError, cost_program, dma_cycles, load_target, lower_to_target, names,
                              redmule_job_cycles)
from compiler.targets.cost import Flow, pipeline_cycles

SIRACUSA_TOML = Path(__file__).parents[2] / "compiler" / "targets" / "siracusa.toml"


# ---- helpers ------------------------------------------------------------------------------------------------
def ideal_dma(target, bandwidth=1024.0):
    link = Link(bandwidth, 0)
    return dataclasses.replace(target, links=MappingProxyType({k: link for k in target.links}))


def matmul_model(k=64, n=64) -> onnx.ModelProto:
    """y = x @ w with x (batch, k) and w (k, n): one MatMul layer."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def torch_mlp(path: Path, sizes, seed=0) -> Path:
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    torch.onnx.export(model, torch.randn(2, sizes[0]), str(path), input_names=["x"], output_names=["y"],
                      dynamo=False, opset_version=17, dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path


def step(program: Program, op: str, phase: str = "forward", which: int = 0):
    found = [(i, s) for i, s in enumerate(program.train.steps) if s.op == op and s.phase == phase]
    return found[which]


def total_bytes(program: Program, target) -> int:
    return lower_to_target(program, target).report["transfers"]["total_bytes"]


@pytest.fixture(scope="module")
def siracusa():
    return load_target("siracusa")


@pytest.fixture(scope="module")
def mlps(tmp_path_factory):
    """Small and wide torch MLPs, full and LoRA; zoo models when the zoo has them."""
    tmp = tmp_path_factory.mktemp("mlp")
    small = torch_mlp(tmp / "small.onnx", (64, 96, 10))
    wide = torch_mlp(tmp / "wide.onnx", (256, 512, 512, 64))
    programs = {
        "small-full": compile_model(small, tuning="full", batch=8),
        "wide-full": compile_model(wide, tuning="full", batch=8),
        "wide-lora": compile_model(wide, tuning={"strategy": "lora", "targets": ["*"]}, batch=8),
    }
    for name, tuning in (("deep-ae", "full"), ("ds-cnn", "full"), ("cct-digits", "lora")):
        if name in zoo.names():
            programs[name] = compile_model(name, tuning=tuning, batch=8)
    return programs


# ---- the format -------------------------------------------------------------------------------------------
def test_builtin_targets_load(siracusa):
    assert {"siracusa", "siracusa-small-l2"} <= set(names())
    small = load_target("siracusa-small-l2")
    assert siracusa.l2_bytes == 2 * 1024 * 1024 and small.l2_bytes == 512 * 1024
    assert siracusa.l1_bytes == 256 * 1024 and siracusa.cores == 8 and siracusa.clock_mhz == 360
    assert (siracusa.redmule.rows, siracusa.redmule.columns, siracusa.redmule.pipeline_depth) == (12, 4, 3)
    assert set(siracusa.links) == {"L3->L2", "L2->L3", "L2->L1", "L1->L2"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        siracusa.cores = 4


def test_every_constant_in_the_builtin_files_has_a_comment():
    for path in SIRACUSA_TOML.parent.glob("*.toml"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "=" in line and not line.lstrip().startswith("#") and not line.startswith("name"):
                commented = "#" in line or (i > 0 and lines[i - 1].lstrip().startswith("#"))
                assert commented, f"{path.name}:{i + 1} has no source comment: {line!r}"


def _write(tmp_path: Path, text: str, name="board.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _edited(old: str, new: str) -> str:
    text = SIRACUSA_TOML.read_text()
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize("old, new, message", [
    ("l1_bytes = 262144", "", "missing key 'memory.l1_bytes'"),
    ("cores = 8", 'cores = "eight"', "key 'cores' must be an integer > 0"),
    ("clock_mhz = 360", "clock_mhz = 0", "key 'clock_mhz' must be a number > 0"),
    ("l1_tile_fraction = 0.75", "l1_tile_fraction = 1.5", "key 'memory.l1_tile_fraction' must be a number in (0, 1]"),
    ("latency_cycles = 80\n", "latency_cycles = -1\n", "key 'dma.l2_to_l1.latency_cycles' must be an integer >= 0"),
    ("rows = 12", "rows = 12.5", "key 'redmule.rows' must be an integer > 0"),
    ("l3_bytes = 16777216", "l3_bytes = 16777216\nl4_bytes = 1", "unknown key 'memory.l4_bytes'"),
    ("Div = 12", "Frobnicate = 12", "key 'cluster.op_cycles_per_element.Frobnicate' names no op"),
    ("l2_reserved_bytes = 131072", "l2_reserved_bytes = 2097152", "key 'memory.l2_reserved_bytes' must be smaller"),
    ("[redmule]", "[redmule", "invalid TOML"),
])
def test_validation_errors_are_one_line_naming_the_key(tmp_path, old, new, message):
    path = _write(tmp_path, _edited(old, new))
    with pytest.raises(TargetError) as info:
        load_target(path)
    text = str(info.value)
    assert message in text and "\n" not in text and str(path) in text
    assert isinstance(info.value, CompileError)


def test_unknown_target_name():
    with pytest.raises(TargetError, match="unknown target 'nope'.*siracusa"):
        load_target("nope")


def test_users_own_target_file(tmp_path, mlps):
    text = _edited('name = "siracusa"', 'name = "my-board"').replace("l1_bytes = 262144", "l1_bytes = 524288")
    board = load_target(_write(tmp_path, text))
    assert board.name == "my-board" and board.l1_bytes == 512 * 1024
    lowered = lower_to_target(mlps["small-full"], board)
    assert lowered.target == {"name": "my-board", "clock_mhz": 360.0}
    assert lowered.report["target"]["name"] == "my-board"
    unnamed = load_target(_write(tmp_path, _edited('name = "siracusa"\n', ""), "fallback.toml"))
    assert unnamed.name == "fallback"


def test_a_target_without_redmule_runs_everything_on_the_cores(tmp_path, mlps):
    text = SIRACUSA_TOML.read_text()
    start, end = text.index("[redmule]"), text.index("[cluster]")
    target = load_target(_write(tmp_path, text[:start] + text[end:]))
    assert target.redmule is None
    lowered = lower_to_target(mlps["wide-full"], target)
    assert {s.unit for s in lowered.train.steps} <= {"cluster", "none"}
    assert lowered.report["perf"]["redmule_utilization"] == 0.0


# ---- hand-computed cycle counts -----------------------------------------------------------------------------
def test_dma_transfer_by_hand(siracusa):
    # (b) latency + ceil(bytes / bandwidth): 80 cycles + 8 B/cycle on L2 -> L1, 300 + 0.8 B/cycle from L3
    assert dma_cycles(siracusa.links["L2->L1"], 1000) == 80 + 125
    assert dma_cycles(siracusa.links["L2->L1"], 1001) == 80 + 126
    assert dma_cycles(siracusa.links["L1->L2"], 4096) == 80 + 512
    assert dma_cycles(siracusa.links["L3->L2"], 1000) == 300 + 1250
    assert dma_cycles(siracusa.links["L2->L1"], 4096, transfers=4) == 4 * 80 + 512
    assert dma_cycles(siracusa.links["L2->L1"], 0) == 0


def test_redmule_job_by_hand(siracusa):
    rm = siracusa.redmule
    # 64x64x64: ceil(64/12) = 6 row tiles x ceil(64/(4*(3+1))) = 4 column tiles = 24 passes; a pass streams
    # K = 64 through a 12x16 tile at 24 FP32 MAC/cycle: 64*192/24 = 512 cycles, + 3 pipeline fill.
    assert redmule_job_cycles(rm, 64, 64, 64) == 200 + 24 * (512 + 3)
    # a shape that wastes the array: 1 row of 12 used, 1 column of 16 used
    assert redmule_job_cycles(rm, 1, 1, 100) == 200 + 1 * (800 + 3)


def test_pipeline_by_hand():
    # one tile: load, compute, store in sequence
    assert pipeline_cycles(Flow(1, compute=1000, l2_l1=300, l1_l2=200)) == 300 + 1000 + 200
    # four tiles of 250 compute, 75 in, 50 out: in + max(c, in) + 2 max(c, in + out) + max(c, out) + out
    assert pipeline_cycles(Flow(4, compute=1000, l2_l1=300, l1_l2=200)) == 75 + 250 + 2 * 250 + 250 + 50
    # DMA-bound: the steady state is the DMA
    assert pipeline_cycles(Flow(4, compute=100, l2_l1=800, l1_l2=400)) == 200 + 200 + 2 * 300 + 100 + 100
    # L3 operands: the first tile pays the whole chain, the HyperBus is a stage of its own
    assert pipeline_cycles(Flow(2, compute=200, l2_l1=100, l3_l2=1000)) == (500 + 50) + 500 + 100 + 0


def test_one_gemm_on_redmule_by_hand(siracusa):
    """(a) y = x @ w, 64x64x64, everything fits L1: one tile, one RedMulE job."""
    program = compile_model(matmul_model(), tuning="full", batch=64)
    target = ideal_dma(siracusa)
    lowered = lower_to_target(program, target)
    i, mm = step(lowered, "MatMul")
    cost = cost_program(program, target)["train"][i]
    setup, passes, per_pass = 200, math.ceil(64 / 12) * math.ceil(64 / 16), 64 * 12 * 16 // 24 + 3
    load_x_and_w = math.ceil(2 * 64 * 64 * 4 / 1024)   # 32 cycles at 1024 B/cycle, no latency
    store_y = math.ceil(64 * 64 * 4 / 1024)             # 16 cycles
    assert (mm.unit, cost.tiles, cost.tile) == ("redmule", 1, (64, 64, 64))
    assert mm.cycles == load_x_and_w + (setup + passes * per_pass) + store_y == 32 + 12560 + 16
    assert cost.alternatives["cluster"] > mm.cycles  # 64^3 / (8 cores x 0.5 MAC) = 65,536 cycles + fork
    assert cost.bytes_by_link == {"L2->L1": 32768, "L1->L2": 16384, "L3->L2": 0, "L2->L3": 0}
    assert cost.macs == 64 ** 3


def test_one_gemm_on_siracusa_is_bounded_by_the_single_tile_plan(siracusa):
    program = compile_model(matmul_model(), tuning="full", batch=64)
    i, mm = step(lower_to_target(program, siracusa), "MatMul")
    single = (2 * 80 + 32768 // 8) + 12560 + (80 + 16384 // 8)  # load x and w, compute, store y
    assert mm.unit == "redmule"
    assert 12560 <= mm.cycles <= single  # tiling may only overlap DMA with compute


def test_elementwise_on_eight_cores_by_hand(siracusa, mlps):
    """(c) ReLU over (8, 96) on 8 cores: fork + ceil(768 / 8) * 4 cycles per element, plus its DMA."""
    program = mlps["small-full"]
    target = ideal_dma(siracusa)
    lowered = lower_to_target(program, target)
    i, relu = step(lowered, "Relu")
    elements = 8 * 96
    compute = 100 + math.ceil(elements / 8) * 4
    dma = math.ceil(elements * 4 / 1024)  # in and out: 3 cycles each
    assert relu.unit == "cluster"
    assert relu.cycles == dma + compute + dma == 3 + 484 + 3


def test_view_ops_cost_nothing_and_sgd_runs_on_the_cores(siracusa, mlps):
    lowered = lower_to_target(mlps["wide-full"], siracusa)
    for s in lowered.train.steps:
        if s.op in ("Reshape", "Identity", "Squeeze", "Unsqueeze"):
            assert (s.unit, s.cycles) == ("none", 0)
        if s.op == "SGD":
            assert s.unit == "cluster" and s.cycles > 0
        if s.op in ("Gemm", "MatMul") and s.flops > 1_000_000:
            assert s.unit == "redmule"


# ---- the lowered program and its report ---------------------------------------------------------------------
def test_lowering_returns_a_new_program_and_fills_steps_levels_and_report(siracusa, mlps):
    program = mlps["wide-lora"]
    lowered = lower_to_target(program, siracusa)
    assert all(s.unit == "" and s.cycles == 0 for s in program.train.steps)
    assert all(t.level == "" for t in program.tensors.values()) and "perf" not in program.report
    assert all(s.unit in ("redmule", "cluster", "none") for p in (lowered.train, lowered.evaluate) for s in p.steps)
    placed = set(lowered.param_offsets) | set(lowered.train.arena_offsets) | set(lowered.evaluate.arena_offsets)
    assert all(lowered.tensors[n].level in ("L2", "L3") for n in placed)

    report, perf = lowered.report, lowered.report["perf"]
    assert perf["cycles_per_step"] == sum(s.cycles for s in lowered.train.steps)
    assert perf["images_per_second"] == pytest.approx(8 * 360e6 / perf["cycles_per_step"])
    assert perf["flop_per_cycle"] == pytest.approx(report["flops"]["total"] / perf["cycles_per_step"])
    assert 0 < perf["redmule_utilization"] <= 1
    for shares in (perf["time_share_by_kind"], perf["time_share_by_unit"]):
        assert sum(shares.values()) == pytest.approx(1, abs=1e-3)
    links = report["transfers"]["bytes_by_link"]
    assert set(links) == {"L3->L2", "L2->L3", "L2->L1", "L1->L2"}
    assert report["transfers"]["total_bytes"] == sum(links.values())
    levels = report["memory_by_level"]
    assert 0 < levels["L1"] <= siracusa.l1_tile_bytes and levels["L2"] <= siracusa.l2_budget_bytes
    assert lowered.target == {"name": "siracusa", "clock_mhz": 360.0}
    from compiler.report import format_table
    table = format_table(report)
    assert "cycles/step" in table and "L2->L1" in table and "memory by level" in table


def test_lowered_program_round_trips_through_the_artifact(tmp_path, siracusa, mlps):
    lowered = lower_to_target(mlps["small-full"], siracusa)
    loaded = Program.load(lowered.save(tmp_path / "prog"))
    assert [(s.unit, s.cycles) for s in loaded.train.steps] == [(s.unit, s.cycles) for s in lowered.train.steps]
    assert {n: t.level for n, t in loaded.tensors.items()} == {n: t.level for n, t in lowered.tensors.items()}
    assert loaded.target == lowered.target


def test_every_tile_fits_the_usable_l1(siracusa, mlps):
    for l1 in (32 * 1024, 256 * 1024):
        target = dataclasses.replace(siracusa, l1_bytes=l1)
        for program in mlps.values():
            for costs in cost_program(program, target).values():
                assert all(c.l1_bytes <= target.l1_tile_bytes for c in costs)


# ---- properties ---------------------------------------------------------------------------------------------
def test_more_l1_never_raises_dma_bytes(siracusa, mlps):
    for name, program in mlps.items():
        volumes = [total_bytes(program, dataclasses.replace(siracusa, l1_bytes=kib * 1024))
                   for kib in (16, 32, 64, 128, 256, 1024)]
        assert volumes == sorted(volumes, reverse=True), name


def test_less_l2_pushes_tensors_to_l3_and_raises_transfers(siracusa, mlps):
    small = load_target("siracusa-small-l2")
    program = mlps["wide-lora"]  # 1.7 MB of frozen weights: fits 2 MiB, not 512 KiB
    big_l2, small_l2 = lower_to_target(program, siracusa), lower_to_target(program, small)
    assert not [n for n, t in big_l2.tensors.items() if t.level == "L3"]
    in_l3 = [n for n, t in small_l2.tensors.items() if t.level == "L3"]
    assert in_l3 and all(small_l2.tensors[n].role == "frozen" for n in in_l3)  # weights go first
    assert all(t.level == "L2" for t in small_l2.tensors.values() if t.role == "trainable")
    a, b = big_l2.report, small_l2.report
    assert b["transfers"]["total_bytes"] > a["transfers"]["total_bytes"]
    assert b["transfers"]["bytes_by_link"]["L3->L2"] > 0 == a["transfers"]["bytes_by_link"]["L3->L2"]
    assert b["perf"]["cycles_per_step"] > a["perf"]["cycles_per_step"]
    assert b["memory_by_level"]["L3"] > 0 == a["memory_by_level"]["L3"]
    for name, program in mlps.items():  # never fewer bytes with less L2
        assert total_bytes(program, small) >= total_bytes(program, siracusa), name


def test_frozen_weights_leave_l2_before_trainables_and_activations(siracusa, mlps):
    program = mlps["wide-lora"]
    frozen = sum(t.nbytes for t in program.tensors.values() if t.role == "frozen")
    target = dataclasses.replace(siracusa, l2_bytes=program.params_bytes + program.train.arena_bytes
                                 - frozen // 2 + siracusa.l2_reserved_bytes)
    lowered = lower_to_target(program, target)
    roles = {t.role for t in lowered.tensors.values() if t.level == "L3"}
    assert roles == {"frozen"}


def test_fused_lora_steps_move_each_activation_once(tmp_path, siracusa):
    """Hand-counted bytes of the fused LoRA steps of a 32-32-32 MLP at batch 64, where everything fits L1: the
    forward reads x, W, A, B and the bias once and writes y; the backward reads dY, x, A, B (and W when dX is
    needed) and writes dX (when needed), dA and dB. Nothing else, in particular no rank-r or y-sized pass. (The
    backward with dX loads A twice, as Aᵀ for dX and as A for dB's S, as the HAL kernel does.)"""
    model = torch_mlp(tmp_path / "small.onnx", (32, 32, 32))
    program = compile_model(model, tuning={"strategy": "lora", "targets": ["0", "2"], "rank": 4}, batch=64)
    costs = {s.name: c for s, c in zip(program.train.steps, cost_program(program, siracusa)["train"])}
    act, w, ab = 64 * 32 * 4, 32 * 32 * 4, 2 * 32 * 4 * 4
    fused = [s for s in program.train.steps if s.op.startswith("LoraLinear")]
    assert [s.op for s in fused] == ["LoraLinear", "LoraLinear", "LoraLinearGrad", "LoraLinearGrad"]
    assert [s.attrs.get("grads") for s in fused[2:]] == ["xab", "ab"]  # the input layer needs no dX
    a_again = 32 * 4 * 4
    expect = [(act + w + ab + 32 * 4, act)] * 2 + [(2 * act + w + ab + a_again, act + ab), (2 * act + ab, ab)]
    for s, (read, written) in zip(fused, expect):
        links = costs[s.name].bytes_by_link
        assert (links["L2->L1"], links["L1->L2"]) == (read, written), s.name
        assert costs[s.name].unit == "redmule"


@pytest.mark.parametrize("model,layers", [
    ("wide", ["0", "2", "4"]), ("wide", ["2"]),                              # weight-dominated
    ("deep-ae", ["encoder.*", "decoder.*"]),
    ("cct-digits", ["*attn.*", "*mlp.*"]), ("cct-2-3x2", ["*attn.*", "*mlp.*"]),  # token-heavy: 16-64 tokens a sample
])
def test_lora_moves_no_more_bytes_than_full_tuning_of_the_same_layers(tmp_path, siracusa, model, layers):
    """LoRA never moves more bytes than training the same layers' weights, nor than full tuning. For
    weight-dominated layers LoRA skips dW and W's update; for token-heavy ones the fused LoraLinear steps keep
    the adapter from adding activation-sized passes (one pass over x forward, one over dY and x backward)."""
    if model == "wide":
        model = torch_mlp(tmp_path / "wide.onnx", (256, 512, 512, 64))
    lora = compile_model(model, tuning={"strategy": "lora", "targets": layers}, batch=8)
    trained = sorted({n[:-len(".lora_a")] for n in lora.tensors if n.endswith(".lora_a")})
    selective = compile_model(model, tuning={"strategy": "selective", "train": [f"{l}.weight" for l in trained]},
                              batch=8)
    full = compile_model(model, tuning="full", batch=8)
    for target in (siracusa, load_target("siracusa-small-l2")):
        assert total_bytes(lora, target) <= total_bytes(selective, target), (model, layers, target.name)
        assert total_bytes(lora, target) <= total_bytes(full, target), (model, layers, target.name)


def test_a_program_that_cannot_fit_names_the_tensor_and_the_shortfall(tmp_path, mlps):
    text = (SIRACUSA_TOML.read_text().replace("l2_bytes = 2097152", "l2_bytes = 262144")
            .replace("l3_bytes = 16777216", "l3_bytes = 524288"))
    tiny = load_target(_write(tmp_path, text))
    program = mlps["wide-full"]  # 1.7 MB of weights
    with pytest.raises(CompileError) as info:
        lower_to_target(program, tiny)
    text = str(info.value)
    found = re.fullmatch(r"program does not fit siracusa: tensor '([^']+)' \(([\d,]+) B\) short by ([\d,]+) B in L3",
                         text)
    assert found, text
    name, size, short = found.group(1), int(found.group(2).replace(",", "")), int(found.group(3).replace(",", ""))
    assert program.tensors[name].nbytes == size
    need = program.params_bytes + max(program.train.arena_bytes, program.evaluate.arena_bytes)
    budget = tiny.l2_budget_bytes + tiny.l3_budget_bytes
    assert short >= need - budget > 0  # L3 holds what L2 cannot; alignment and straddling only add


def test_compile_and_lower_a_300k_parameter_model(tmp_path, siracusa):
    """How fast is benchmarks/compile_time.py's (a timed assertion fails on a loaded machine)."""
    program = compile_model("cct-2-3x2", tuning="lora", batch=8)
    lowered = lower_to_target(program, siracusa)
    assert program.report["params"]["total"] > 250_000
    assert lowered.report["perf"]["cycles_per_step"] > 0


@pytest.mark.skipif("ds-cnn" not in zoo.names(), reason="zoo model not available")
def test_depthwise_convolutions_stay_on_the_cores(siracusa):
    """A depthwise conv is one output row per group: RedMulE would use 1 of its 12 rows and pay a job per
    channel; pointwise convs fill the array."""
    lowered = lower_to_target(compile_model("ds-cnn", tuning="full", batch=8), siracusa)
    convs = {s.name: s for s in lowered.train.steps if s.op == "Conv"}
    assert all(s.unit == "cluster" for n, s in convs.items() if n.endswith(".dw"))
    assert all(s.unit == "redmule" for n, s in convs.items() if n.endswith(".pw"))


# ---- schedule options and the reference framework's profile ---------------------------------------------------
def _with_options(tmp_path: Path, options: str) -> "Target":
    return load_target(_write(tmp_path, SIRACUSA_TOML.read_text() + "\n[options]\n" + options, "opt.toml"))


@pytest.mark.parametrize("options, message", [
    ('default_level = "L1"', "key 'options.default_level' must be \"L2\" or \"L3\""),
    ("double_buffering = 1", "key 'options.double_buffering' must be true or false"),
    ('redmule_ops = ["Gemm", "Frobnicate"]', "key 'options.redmule_ops' must be a list of op names"),
    ("step_overhead_cycles = -5", "key 'options.step_overhead_cycles' must be an integer >= 0"),
    ("l1_tile_bytes = 0", "key 'options.l1_tile_bytes' must be an integer > 0"),
])
def test_option_errors_are_one_line_naming_the_key(tmp_path, options, message):
    with pytest.raises(TargetError, match=re.escape(message)):
        _with_options(tmp_path, options)


def test_each_option_changes_the_schedule_as_documented(tmp_path, siracusa, mlps):
    program = mlps["wide-lora"]
    base = lower_to_target(program, siracusa)
    in_l3 = lower_to_target(program, _with_options(tmp_path, 'default_level = "L3"'))
    assert {t.level for t in in_l3.tensors.values()} == {"L3"} and in_l3.report["memory_by_level"]["L2"] == 0
    assert in_l3.report["transfers"]["bytes_by_link"]["L3->L2"] > 0 == base.report["transfers"]["bytes_by_link"][
        "L3->L2"]
    single = lower_to_target(program, _with_options(tmp_path, "double_buffering = false"))
    assert all(s.cycles >= b.cycles for s, b in zip(single.train.steps, base.train.steps))
    assert single.report["perf"]["cycles_per_step"] > base.report["perf"]["cycles_per_step"]
    cores_only = lower_to_target(program, _with_options(tmp_path, 'redmule_ops = ["Conv"]'))
    assert any(s.unit == "redmule" for s in base.train.steps)
    assert all(s.unit != "redmule" for s in cores_only.train.steps)
    overhead = lower_to_target(program, _with_options(tmp_path, "step_overhead_cycles = 1000"))
    for o, b in zip(overhead.train.steps, base.train.steps):
        assert o.cycles == b.cycles + (1000 if b.unit != "none" else 0), b.name
    small = lower_to_target(program, _with_options(tmp_path, "l1_tile_bytes = 16000"))
    assert 0 < small.report["memory_by_level"]["L1"] <= 16000 < base.report["memory_by_level"]["L1"]


def test_traindeeploy_profile_is_siracusa_with_the_reference_schedule(siracusa):
    profile = load_target("siracusa-traindeeploy")
    assert dataclasses.replace(profile, name="siracusa", source=siracusa.source,
                               options=siracusa.options) == siracusa
    o = profile.options
    assert (o.default_level, o.l1_tile_bytes, o.double_buffering) == ("L3", 128000, False)
    assert profile.units_for("Gemm") == ("redmule", "cluster") and profile.units_for("ConvGradWeight") == ("cluster",)
    program = compile_model("cct-digits", tuning="lora", batch=1) if "cct-digits" in zoo.names() else None
    if program is not None:
        ours, theirs = lower_to_target(program, siracusa), lower_to_target(program, profile)
        assert theirs.report["perf"]["cycles_per_step"] > 2 * ours.report["perf"]["cycles_per_step"]
        assert all(s.unit == "cluster" for s in theirs.train.steps if s.op.startswith("ConvGrad"))


def test_lora_conv_steps_are_charged_as_their_gemm_parts(siracusa):
    """LoraConv = [W; A]·col(X) and B·S; LoraConvGrad(a, b) = Bᵀ·dY, dS·col(X)ᵀ, A·col(X) and dY·Sᵀ: the MACs
    counted by hand from the layer's sizes, and the cycles more than the frozen conv's alone."""
    program = compile_model("ds-cnn", tuning="lora", batch=8)
    costs = {c.name: c for c in cost_program(program, siracusa)["train"]}
    frozen = compile_model("ds-cnn", tuning="classifier", batch=8)
    conv = {c.name: c for c in cost_program(frozen, siracusa)["train"]}["conv0"]
    step = next(s for s in program.train.steps if s.name == "conv0")
    grad = next(s for s in program.train.steps if s.op == "LoraConvGrad" and s.inputs[1] == step.inputs[0])
    n, m, ho, wo = program.tensors[step.outputs[0]].shape
    c, k, r = 1, 10 * 4, program.tensors["conv0.lora_a"].shape[0]
    pixels = n * ho * wo
    assert step.op == "LoraConv" and costs["conv0"].macs == pixels * (c * k * (m + r) + m * r)
    assert costs["conv0"].cycles > conv.cycles
    assert grad.attrs["grads"] == "ab"  # the input image needs no gradient
    assert costs[grad.name].macs == pixels * (r * m + r * c * k + r * c * k + m * r)
