"""The sparse scheme chosen for a memory budget (compiler/sparse_search.py, `compile --memory-budget`)."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from compiler.frontend import import_onnx
from compiler.ir import CompileError
from compiler.pipeline import CompileOptions, compile_graph, load_model
from compiler.sparse_search import Candidate, SparseChoice, TaskData, _knapsack, parse_bytes, search_sparse
from compiler.tuning import TuningSpec
from compiler.zoo.task_data import task_data

CNNS = ("cct-2-3x2", "cct-digits", "ds-cnn")  # the zoo models with convolutions
FAST = dict(steps=2, choices=("bias", "1/4", "all"))  # short analysis: the budget logic is what is tested here


def _setup(model: str, batch: int = 1):
    source, name, task = load_model(model)
    graph = import_onnx(source, batch)

    cache = {}

    def compile_fn(spec: TuningSpec):  # memoized across the searches of one test
        if spec.sparse not in cache:
            cache[spec.sparse] = compile_graph(graph, CompileOptions(spec, batch), name, task)
        return cache[spec.sparse]

    x, y = task_data(model, samples=24)
    return graph, compile_fn, TaskData.split(x, y)


@pytest.mark.parametrize("model", CNNS)
def test_budget_respected_or_one_line_error_naming_the_smallest_feasible_budget(model: str) -> None:
    graph, compile_fn, data = _setup(model)
    for kib in (128, 256, 512):
        budget = kib * 1024
        try:
            choice = search_sparse(graph, compile_fn, budget, data, what=model, **FAST)
        except CompileError as exc:
            message = str(exc)
            assert "\n" not in message and f"fits no sparse scheme of {model}" in message
            need_kib = int(message.split("--memory-budget ")[1].split("KiB")[0])
            assert need_kib > kib
            continue
        assert choice.scheme and choice.memory_bytes <= budget
        assert compile_fn(choice.tuning).report["memory"]["total_bytes"] == choice.memory_bytes
        assert all(c.memory_bytes <= budget for c in choice.candidates)
    if model == "cct-2-3x2":  # 1.1 MB of frozen weights: fits none of the three; at the named budget, dozens of
        return                # equal-sized candidates would each be fine-tuned (slow), so ds-cnn and cct-digits check it
    # the budget the error names is feasible
    try:
        search_sparse(graph, compile_fn, 8 * 1024, data, what=model, **FAST)
        raise AssertionError("8 KiB should fit nothing")
    except CompileError as exc:
        need = int(str(exc).split("--memory-budget ")[1].split("KiB")[0]) * 1024
    choice = search_sparse(graph, compile_fn, need, data, what=model, **FAST)
    assert choice.memory_bytes <= need


def test_a_larger_budget_never_chooses_less() -> None:
    graph, compile_fn, data = _setup("cct-digits")
    small = search_sparse(graph, compile_fn, 56 * 1024, data, **FAST)
    large = search_sparse(graph, compile_fn, 96 * 1024, data, **FAST)
    assert small.memory_bytes <= 56 * 1024 and large.memory_bytes <= 96 * 1024
    assert large.expected_gain >= small.expected_gain - 1e-9
    assert SparseChoice.from_dict(json.loads(json.dumps(large.to_dict()))) == large


def test_knapsack_is_optimal_on_small_cases() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        cands = [Candidate(f"l{i}", c, int(rng.integers(1, 40)) * 256 + 1000, float(rng.uniform(0.01, 1)))
                 for i in range(4) for c in ("bias", "all")]
        room = int(rng.integers(5, 60)) * 256
        picked = _knapsack(cands, room, 1000)
        assert sum(c.memory_bytes - 1000 for c in picked.values()) <= room
        best = 0.0
        options = [[None] + [c for c in cands if c.layer == f"l{i}"] for i in range(4)]
        for combo in itertools.product(*options):
            chosen = [c for c in combo if c]
            if sum(c.memory_bytes - 1000 for c in chosen) <= room:
                best = max(best, sum(c.gain for c in chosen))
        assert sum(c.gain for c in picked.values()) == pytest.approx(best)


def test_parse_bytes() -> None:
    assert parse_bytes("256KiB") == parse_bytes("256 kb") == 262144
    assert parse_bytes("0.5MiB") == 524288 and parse_bytes("1000") == 1000
    for bad in ("", "12 parsecs", "-1KiB", "KiB"):
        with pytest.raises(CompileError, match="expected a size"):
            parse_bytes(bad)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet.cli", "compile", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_prints_the_chosen_scheme_its_memory_and_gain(tmp_path) -> None:
    x, y = task_data("cct-digits", samples=24)
    np.savez(tmp_path / "task.npz", x=x, y=y)
    done = _cli("cct-digits", "--strategy", "sparse", "--memory-budget", "64KiB", "--batch", "1", "--search-steps",
                "2", "--data", str(tmp_path / "task.npz"), "--json")
    assert done.returncode == 0, done.stderr
    assert "sparse scheme for 64.0 KiB:" in done.stderr and "expected gain" in done.stderr
    report = json.loads(done.stdout)
    assert report["memory"]["total_bytes"] == report["sparse_search"]["memory_bytes"] <= 64 * 1024
    assert report["tuning"]["sparse"] == dict(report["sparse_search"]["scheme"])

    done = _cli("ds-cnn", "--strategy", "sparse", "--memory-budget", "64KiB", "--batch", "1")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "fits no sparse scheme of ds-cnn" in lines[0] and "--memory-budget 1" in lines[0]

    np.savez(tmp_path / "bad.npz", y=y)
    done = _cli("cct-digits", "--strategy", "sparse", "--memory-budget", "64KiB", "--data", str(tmp_path / "bad.npz"))
    assert done.returncode != 0 and "bad.npz: no array 'x'" in done.stderr
