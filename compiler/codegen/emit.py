"""Program → one C file: a static parameter region and one arena shared by the phases (they run one at a
time), a pointer macro for every tensor at its planned offset, and one kernel call per step.

The file defines ``const ef_program_t ef_program`` (kernels/ef_program.h), which the board's firmware
entry uses to find the feeds, the loss and the phase functions.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from compiler.ir import CompileError
from compiler.ops import get_op
from compiler.program import Phase, Program, TensorInfo
from compiler.codegen.templates import CLUSTER_KERNELS, REDMULE_KERNELS, Ref, Template, bind, site_of, template_for

C_TYPES = {"float32": "float", "float64": "double", "int64": "int64_t", "int32": "int32_t", "bool": "uint8_t", "int8": "int8_t"}
PHASES = (("train", "TR"), ("evaluate", "EV"))
MAX_SYMBOL_CHARS = 40


@dataclass(frozen=True)
class Location:
    region: str      # "params" | "arena"
    offset: int
    nbytes: int


def _identifier(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", text)[:MAX_SYMBOL_CHARS].strip("_") or "t"


def _comment(text: str) -> str:
    return text.replace("*/", "* /")


def c_type(info: TensorInfo) -> str:
    try:
        return C_TYPES[info.dtype]
    except KeyError:
        raise CompileError(f"tensor {info.name!r}: dtype {info.dtype} has no C type") from None


class Symbols:
    """Pointer macros for the tensors of one phase (parameter region + that phase's arena)."""

    def __init__(self, program: Program, phase: Phase, prefix: str, params: Mapping[str, str]):
        self.program = program
        self.params = params
        self.arena: dict[str, str] = {}
        for i, name in enumerate(sorted(phase.arena_offsets, key=lambda n: (phase.arena_offsets[n], n))):
            self.arena[name] = f"{prefix}{i}_{_identifier(name)}"
        self.phase = phase

    def __getitem__(self, name: str) -> str:
        if name in self.phase.arena_offsets:
            return self.arena[name]
        if name in self.params:
            return self.params[name]
        raise CompileError(f"tensor {name!r} has no planned location (neither arena nor parameter region)")

    def location(self, name: str) -> Location:
        nbytes = self.program.tensors[name].nbytes
        if name in self.phase.arena_offsets:
            return Location("arena", self.phase.arena_offsets[name], nbytes)
        if name in self.program.param_offsets:
            return Location("params", self.program.param_offsets[name], nbytes)
        raise CompileError(f"tensor {name!r} has no planned location (neither arena nor parameter region)")


def render(value: Any, symbols: Symbols) -> str:
    """One bound argument as C."""
    if value is None:
        return "NULL"
    if isinstance(value, Ref):
        return symbols[value.name]
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(np.float32(value))
        if not math.isfinite(v):
            raise CompileError(f"non-finite float argument {value!r}")
        return f"{v!r}f"  # repr always has a '.' or an exponent and round-trips the float32 value
    if isinstance(value, tuple) and value and all(isinstance(v, Ref) for v in value):
        return "(void *const[]){" + ", ".join(symbols[v.name] for v in value) + "}"
    if isinstance(value, tuple) and value and all(isinstance(v, (int, np.integer)) for v in value):
        return "(const int[]){" + ", ".join(str(int(v)) for v in value) + "}"
    raise CompileError(f"cannot render kernel argument {value!r}")


def _overlaps(a: Location, b: Location) -> bool:
    return a.region == b.region and a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes


def step_call(program: Program, step, symbols: Symbols) -> str | None:
    """The C statement for one step, or None for a view (after checking the plan aliases it)."""
    op = get_op(step.op)
    template: Template = template_for(step.op, step.name)
    if template.view != op.view:
        raise CompileError(f"step {step.name!r}: op {step.op} is {'a' if op.view else 'not a'} view op but its "
                           "template says otherwise")
    if op.view:
        src, out = symbols.location(step.inputs[0]), symbols.location(step.outputs[0])
        if (src.region, src.offset) != (out.region, out.offset):
            raise CompileError(f"step {step.name!r}: the plan does not alias view {step.outputs[0]!r} "
                               f"with {step.inputs[0]!r}")
        return None
    _check_overlap(step, op, symbols)
    names = [n for n in (*step.inputs, *step.outputs) if n]
    site = site_of(step.name, step.op, step.inputs, step.outputs, step.attrs,
                   {n: program.tensors[n].shape for n in names}, {n: program.tensors[n].dtype for n in names})
    args = bind(template, site)
    return f"{kernel_name(step, template)}({', '.join(render(v, symbols) for _, v in args)});"


HAL_KERNELS = {"redmule": REDMULE_KERNELS, "cluster": CLUSTER_KERNELS}


def kernel_name(step, template: Template) -> str:
    """The template's kernel, or the HAL's: for a GEMM step lowered onto RedMulE, its RedMulE path; for a step
    lowered onto the cores, its L1-streamed all-core version (when the op has one)."""
    return HAL_KERNELS.get(step.unit, {}).get(template.kernel, template.kernel)


def uses_hal(program: Program) -> bool:
    return any(template_for(s.op, s.name).kernel in HAL_KERNELS.get(s.unit, {})
               for phase in (program.train, program.evaluate) for s in phase.steps)


def _check_overlap(step, op, symbols: Symbols) -> None:
    """Outputs never overlap inputs, except an in-place op's output 0 on exactly input 0's bytes."""
    ins = [(i, n, symbols.location(n)) for i, n in enumerate(step.inputs) if n]
    for j, out in enumerate(step.outputs):
        o = symbols.location(out)
        for i, name, loc in ins:
            if not _overlaps(o, loc):
                continue
            if op.inplace and i == 0 and j == 0 and (o.region, o.offset) == (loc.region, loc.offset):
                continue
            raise CompileError(f"step {step.name!r} ({step.op}): output {out!r} overlaps input {name!r}, which "
                               "its kernel does not allow")


def _macro(symbol: str, info: TensorInfo, base: str, offset: int, note: str) -> str:
    return (f"#define {symbol} (({c_type(info)} *)({base} + {offset}u)) "
            f"/* {_comment(info.name)} {info.dtype}{list(info.shape)} {note} */")


def _phase_body(program: Program, phase_name: str, phase: Phase, symbols: Symbols) -> list[str]:
    lines = [f"/* ---- {phase_name}: {len(phase.steps)} steps, arena {phase.arena_bytes} bytes ---- */"]
    for name in sorted(symbols.arena, key=lambda n: (phase.arena_offsets[n], n)):
        info = program.tensors[name]
        lines.append(_macro(symbols.arena[name], info, "ef_arena", phase.arena_offsets[name], info.role))
    lines.append("")
    lines.append(f"static void ef_{phase_name}_run(void) {{")
    for index, step in enumerate(phase.steps):
        call = step_call(program, step, symbols)
        where = f"{step.name} [{step.layer}]" if step.layer else step.name
        if call is None:
            lines.append(f"    /* {_comment(where)}: {step.op} is a view, no code */")
        else:
            lines.append(f"    /* {_comment(where)} */")
            lines.append(f"    {call}")
            lines.append(f"    EF_STEP_DONE({index}u);")
    lines.append("}")
    lines.append("")
    return lines


def _feed(symbols: Symbols, program: Program, name: str) -> tuple[str, int]:
    if not name:
        return "NULL", 0
    return symbols[name], program.tensors[name].nbytes


def _phase_struct(program: Program, phase_name: str, phase: Phase, symbols: Symbols, output: str) -> str:
    expected = {program.input} | ({program.label} if program.label else set())
    if set(phase.feeds) != expected:
        raise CompileError(f"phase {phase_name}: feeds {sorted(phase.feeds)} are not the program's input and "
                           f"label {sorted(expected)}")
    x, x_bytes = _feed(symbols, program, program.input)
    y, y_bytes = _feed(symbols, program, program.label)
    out, out_bytes = _feed(symbols, program, output)
    return (f"    .{phase_name} = {{.input = {x}, .input_bytes = {x_bytes}u, .label = {y}, .label_bytes = {y_bytes}u,\n"
            f"        .loss = {symbols[program.loss]}, .output = {out}, .output_bytes = {out_bytes}u, "
            f".run = ef_{phase_name}_run}},")


def _body(program: Program) -> list[str]:
    lines = ["/* ---- parameter region: every persistent tensor ---- */"]
    params: dict[str, str] = {}
    for i, name in enumerate(sorted(program.param_offsets, key=lambda n: (program.param_offsets[n], n))):
        info = program.tensors[name]
        params[name] = f"P{i}_{_identifier(name)}"
        lines.append(_macro(params[name], info, "ef_params", program.param_offsets[name], info.role))
    lines.append("")
    symbols = {}
    for phase_name, prefix in PHASES:
        phase = getattr(program, phase_name)
        symbols[phase_name] = Symbols(program, phase, prefix, params)
        lines += _phase_body(program, phase_name, phase, symbols[phase_name])
    lines.append("const ef_program_t ef_program = {")
    lines.append(f"    .model = \"{_comment(program.model).replace(chr(34), '')}\", "
                 f".fingerprint = EF_FINGERPRINT, .batch = {program.batch}u,")
    lines.append("    .params = ef_params, .params_bytes = EF_PARAMS_BYTES,")
    lines.append(_phase_struct(program, "train", program.train, symbols["train"], ""))
    lines.append(_phase_struct(program, "evaluate", program.evaluate, symbols["evaluate"], program.output))
    lines.append("};")
    return lines


def _storage(program: Program) -> list[str]:
    arena = max(program.train.arena_bytes, program.evaluate.arena_bytes)
    return [
        f"#define EF_PARAMS_BYTES {program.params_bytes}u",
        f"#define EF_ARENA_BYTES {arena}u /* train {program.train.arena_bytes}, evaluate "
        f"{program.evaluate.arena_bytes}: the phases never run at once */",
        "#ifdef EF_PROFILE /* the board times each step (siracusa: cycles per step index, for calibration) */",
        "void ef_profile_mark(uint32_t step);",
        "#define EF_STEP_DONE(i) ef_profile_mark(i)",
        "#else",
        "#define EF_STEP_DONE(i)",
        "#endif",
        "#ifndef EF_PARAMS_SECTION /* a board that loads the parameter region with the executable names a section */",
        "#define EF_PARAMS_SECTION",
        "#endif",
        "static uint8_t ef_params[EF_PARAMS_BYTES ? EF_PARAMS_BYTES : 1] EF_PARAMS_SECTION __attribute__((aligned(16)));",
        "static uint8_t ef_arena[EF_ARENA_BYTES ? EF_ARENA_BYTES : 1] __attribute__((aligned(16)));",
        "",
    ]


def fingerprint(source_body: str) -> int:
    return int(hashlib.sha256(source_body.encode()).hexdigest()[:8], 16)


def generate(program: Program) -> tuple[str, int]:
    """(C source, layout fingerprint). The fingerprint hashes everything the layout depends on, so a
    params.bin written for another program is refused by the firmware."""
    body = "\n".join(_storage(program) + _body(program)) + "\n"
    mark = fingerprint(body)
    head = [
        f"/* edgefleet program {_comment(program.model)!r}: batch {program.batch}, task {program.task}, "
        f"{len(program.train.steps)} train / {len(program.evaluate.steps)} evaluate steps.",
        " * Generated by compiler.codegen; do not edit. */",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "",
        '#include "ef_kernels.h"',
        '#include "ef_program.h"',
        *(['#include "ef_hal.h" /* steps lowered onto RedMulE or the cluster */', '#include "ef_hal_stream.h"']
          if uses_hal(program) else []),
        "",
        f"#define EF_FINGERPRINT 0x{mark:08x}u",
    ]
    return "\n".join(head) + "\n" + body, mark


def generate_c(program: Program) -> str:
    """The program as one C file (see the module docstring)."""
    return generate(program)[0]


def program_fingerprint(program: Program) -> int:
    return generate(program)[1]
