"""generate_c / build_elf: what the C file holds, and every failure is one CompileError line naming its cause."""
from __future__ import annotations

import dataclasses
import re

import pytest

from compiler.codegen import BOARDS, build_elf, generate_c, memory_map
from compiler.codegen import templates as tpl
from compiler.codegen.build import get_board
from compiler.ir import CompileError
from compiler.ops import get_op
from tests.codegen.programs import compiled


@pytest.fixture(scope="module")
def program():
    return compiled("torch-mlp", "lora+head")


def test_one_kernel_call_per_non_view_step_and_a_macro_per_tensor(program):
    source = generate_c(program)
    for phase_name, fn in (("train", "ef_train_run"), ("evaluate", "ef_evaluate_run")):
        phase = getattr(program, phase_name)
        body = source.split(f"static void {fn}(void) {{", 1)[1].split("\n}\n", 1)[0]
        calls = re.findall(r"^\s+(ef_\w+)\(", body, re.M)
        expected = [tpl.TEMPLATES[s.op].kernel for s in phase.steps if not get_op(s.op).view]
        assert calls == expected
    for name, offset in program.param_offsets.items():
        assert re.search(rf"\(ef_params \+ {offset}u\)\) /\* {re.escape(name)} ", source), name
    for name, offset in program.train.arena_offsets.items():
        assert re.search(rf"\(ef_arena \+ {offset}u\)\) /\* {re.escape(name)} ", source), name
    assert f"#define EF_PARAMS_BYTES {program.params_bytes}u" in source


def test_generation_is_deterministic(program):
    assert generate_c(program) == generate_c(program)


def test_unknown_op_is_a_one_line_error(program, monkeypatch):
    monkeypatch.delitem(tpl.TEMPLATES, "Gemm")
    with pytest.raises(CompileError, match=r"op Gemm has no C kernel template") as info:
        generate_c(program)
    assert "\n" not in str(info.value)


def test_template_hole_without_a_value_is_an_error(program, monkeypatch):
    gemm = tpl.TEMPLATES["Gemm"]
    monkeypatch.setitem(tpl.TEMPLATES, "Gemm", dataclasses.replace(gemm, call=gemm.call[:-1] + ", ${unroll})"))
    with pytest.raises(CompileError, match=r"template ef_gemm has no value for 'unroll'"):
        generate_c(program)


def test_builder_value_without_a_hole_is_an_error(program, monkeypatch):
    gemm = tpl.TEMPLATES["Gemm"]
    monkeypatch.setitem(tpl.TEMPLATES, "Gemm", dataclasses.replace(gemm, call=gemm.call.replace(", ${c_cs}", "")))
    with pytest.raises(CompileError, match=r"unknown key 'c_cs'"):
        generate_c(program)


def test_missing_attribute_is_an_error():
    site = tpl.Site("s", "Split", ("x",), ("a", "b"), {"x": (4,), "a": (2,), "b": (2,)},
                    {"x": "float32", "a": "float32", "b": "float32"}, {"axis": 0})
    with pytest.raises(CompileError, match=r"step 's' \(Split\): missing attribute 'split'"):
        tpl.bind(tpl.TEMPLATES["Split"], site)
    gemm = tpl.Site("g", "Gemm", ("a", "b"), ("y",), {"a": (2, 3), "b": (3, 4), "y": (2, 4)},
                    dict.fromkeys("aby", "float32"), {"alpha": 1.0, "beta": 1.0, "transB": 0})
    with pytest.raises(CompileError, match=r"step 'g' \(Gemm\): missing attribute 'transA'"):
        tpl.bind(tpl.TEMPLATES["Gemm"], gemm)
    with pytest.raises(CompileError, match=r"needs attribute\(s\) \['split'\]"):
        tpl.site_of("s", "Split", ("x",), ("a", "b"), {"axis": 0}, site.shapes, site.dtypes)


def test_wrong_dtype_is_an_error():
    site = tpl.site_of("s", "Relu", ("x",), ("y",), {}, {"x": (4,), "y": (4,)}, {"x": "int64", "y": "int64"})
    with pytest.raises(CompileError, match=r"float32 operands; 'x' is int64"):
        tpl.bind(tpl.TEMPLATES["Relu"], site)


def test_missing_toolchain_names_the_debian_packages(program, tmp_path, monkeypatch):
    monkeypatch.setitem(BOARDS, "rv32-qemu", dataclasses.replace(BOARDS["rv32-qemu"], cc="no-such-riscv-gcc"))
    with pytest.raises(CompileError, match="gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf"):
        build_elf(program, tmp_path)


def test_memory_map_fits_the_program_or_fails_clearly(program):
    board = get_board("rv32-qemu")
    memory = memory_map(program, board)
    arena = max(program.train.arena_bytes, program.evaluate.arena_bytes)
    assert memory.ram_bytes >= program.params_bytes + arena + board.stack_bytes
    assert memory.ram_origin == memory.flash_origin + memory.flash_bytes
    huge = program.replace(params_bytes=2 << 30)
    with pytest.raises(CompileError, match=r"needs \d+ MiB of RAM on rv32-qemu"):
        memory_map(huge, board)


def test_unknown_board_is_an_error(program, tmp_path):
    with pytest.raises(CompileError, match="unknown board 'esp32'"):
        build_elf(program, tmp_path, board="esp32")


def test_every_rendered_kernel_call_compiles_cleanly(tmp_path):
    """The C text of every kernel case (the ctypes tests bypass rendering) compiles with -Werror."""
    import shutil
    import subprocess

    import numpy as np

    from compiler.codegen import KERNEL_DIR
    from compiler.codegen.emit import C_TYPES, render
    from compiler.ops import REGISTRY
    from tests.codegen.harness import expected_outputs
    from tests.codegen.kernel_cases import CASES

    if shutil.which("gcc") is None:
        pytest.skip("host gcc is not installed")
    rng = np.random.default_rng(0)
    decls, calls = [], []
    for op_name in sorted(REGISTRY):
        if REGISTRY[op_name].view:
            continue
        for i, case in enumerate(CASES[op_name]):
            inputs = [make(rng) for make in case.inputs]
            outputs = [] if REGISTRY[op_name].updates else expected_outputs(op_name, inputs, case.attrs)
            arrays = {f"t{len(decls)}_{j}": a for j, a in enumerate([*inputs, *outputs])}
            names = list(arrays)
            for name, a in arrays.items():
                decls.append(f"{C_TYPES[str(a.dtype)]} {name}[{max(a.size, 1)}];")
            site = tpl.site_of(f"{op_name}-{i}", op_name, names[:len(inputs)], names[len(inputs):], case.attrs,
                               {n: a.shape for n, a in arrays.items()}, {n: str(a.dtype) for n, a in arrays.items()})
            symbols = {n: n for n in names}
            args = ", ".join(render(v, symbols) for _, v in tpl.bind(tpl.TEMPLATES[op_name], site))
            calls.append(f"    {tpl.TEMPLATES[op_name].kernel}({args});")
    source = tmp_path / "calls.c"
    source.write_text('#include <stddef.h>\n#include <stdint.h>\n#include "ef_kernels.h"\n' + "\n".join(decls)
                      + "\nvoid all_calls(void) {\n" + "\n".join(calls) + "\n}\n")
    proc = subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Werror", f"-I{KERNEL_DIR}", "-c", str(source), "-o",
                           str(tmp_path / "calls.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[:2000]
