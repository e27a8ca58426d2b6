"""The ``siracusa`` board: a bare-metal ELF for Siracusa's fabric controller and 8-core cluster (GVSoC's
``siracusa`` target), built with the clang of the PyPI package ``ziglang``.

Debian's GCC cannot generate Zfinx code (the cluster cores keep floats in the integer registers); zig's clang can.
Two instruction sets go into one ELF, both with the ilp32 ABI:

    FC       crt0.S, fc.c                              rv32imc (the FC has no F)
    cluster  program.c, kernels/, hal/*.c, hal/pulp/,   rv32imc + Zfinx
             boards/siracusa/main.c

linked by zig's lld with boards/siracusa/siracusa.ld (code and data in L2 from 0x1C010000, stacks and the HAL's
L1 pool in the TCDM at 0x10000000) against picolibc's rv32imac/ilp32 libc (which holds its libm) and GCC's libgcc for the same
multilib (Debian packages picolibc-riscv64-unknown-elf, gcc-riscv64-unknown-elf).

The job goes into the ELF, not through files: the parameter region is the section ``.ef_params`` and
``.ef_job`` holds batches.bin (room for ``job_steps`` steps); ``device_runtime.gvsoc`` writes both into a copy of
the ELF before each run (``patch_section``). The reply comes back on the stdout peripheral (boards/siracusa/main.c).
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from compiler.codegen.build import (BOARD_DIR, BUILD_TIMEOUT_S, HAL_DIR, KERNEL_DIR, Board, _compile, _sources_digest,
                                    firmware_key, hal_sources, kernel_sources, reusable, write_manifest)
from compiler.codegen.emit import generate
from compiler.ir import CompileError
from compiler.program import Program

BOARD_SRC = BOARD_DIR / "siracusa"
LINK_SCRIPT = BOARD_SRC / "siracusa.ld"
ZIG_TARGET = "riscv32-freestanding-none"
FC_CPU = "generic_rv32+m+c+zicsr"
CLUSTER_CPU = "generic_rv32+m+c+zfinx+zicsr"
PICOLIBC = Path("/usr/lib/picolibc/riscv64-unknown-elf")
PICOLIBC_MULTILIB = "rv32imac/ilp32"
GCC_LIB_ROOT = Path("/usr/lib/gcc/riscv64-unknown-elf")
COMMON_FLAGS = ("-O2", "-ffp-contract=off", "-fno-math-errno", "-fno-asynchronous-unwind-tables",
                "-fno-unwind-tables", "-ffunction-sections", "-fdata-sections", "-std=gnu11", "-Wall")
L2_ORIGIN = 0x1C010000
L2_BYTES = 0x180000
L1_ORIGIN = 0x10000000
L1_BYTES = 0x40000
CORE_STACK_BYTES = 4096
STACK_SLOTS = 9                    # the cluster has 9 cores; 8 run, the 9th slot is spare
FC_STACK_BYTES = 4096
JOB_STEPS = 8                      # steps one run can take (the job region's size)
BATCHES_HEADER_BYTES = 32
MEMORY_MAP = {"L2": (L2_ORIGIN, L2_BYTES), "L1": (L1_ORIGIN, L1_BYTES)}
ZIG_HINT = "the siracusa build needs the PyPI package ziglang (pip install ziglang)"


@dataclass(frozen=True)
class Toolchain:
    zig: tuple[str, ...]           # the command that runs zig (python -m ziglang)
    libc: Path                     # picolibc's rv32imac/ilp32 directory (libc.a holds the math functions)
    libgcc: Path
    include: Path


def check_program(program: Program) -> None:
    """The siracusa build runs programs lowered for a Siracusa target whose tensors all live in L2."""
    if not str(program.target.get("name", "")).startswith("siracusa"):
        raise CompileError(f"siracusa build needs a program lowered for a siracusa target (edgefleet compile "
                           f"--target siracusa, or compiler.targets.lower_to_target); {program.model!r} is lowered "
                           f"for {program.target.get('name') or 'no target'}")
    in_l3 = sorted(n for n, t in program.tensors.items() if t.level == "L3")
    if in_l3:
        raise CompileError(f"siracusa build keeps every tensor in L2, but the lowering put {len(in_l3)} in L3 "
                           f"(first: {in_l3[0]!r}); use a smaller batch or model")


def find_toolchain() -> Toolchain:
    """zig (from the ziglang package), picolibc and libgcc for rv32imac/ilp32, or CompileError naming what is
    missing."""
    try:
        import ziglang  # noqa: F401  (only its presence: zig runs as ``python -m ziglang``)
    except ImportError:
        raise CompileError(ZIG_HINT) from None
    libc = PICOLIBC / "lib" / PICOLIBC_MULTILIB
    libgcc = sorted(GCC_LIB_ROOT.glob(f"*/{PICOLIBC_MULTILIB}/libgcc.a"))
    if not (libc / "libc.a").is_file() or not libgcc:
        raise CompileError("the siracusa build links picolibc and libgcc for rv32imac/ilp32: install the Debian "
                           "packages gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf")
    return Toolchain((sys.executable, "-m", "ziglang"), libc, libgcc[-1], PICOLIBC / "include")


def out_ranges(program: Program) -> list[tuple[int, int]]:
    """(offset, bytes) of the parameter region the firmware sends back after training: trainable tensors and
    optimizer state, adjacent ones merged."""
    spans = sorted((program.param_offsets[n], program.tensors[n].nbytes) for n, t in program.tensors.items()
                   if t.role in ("trainable", "optimizer_state") and n in program.param_offsets)
    merged: list[list[int]] = []
    for off, size in spans:
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1][1] += size
        else:
            merged.append([off, size])
    return [(o, s) for o, s in merged]


def job_bytes(program: Program, steps: int = JOB_STEPS) -> int:
    def per_step(phase_label: bool) -> int:
        label = program.tensors[program.label].nbytes if program.label and phase_label else 0
        return program.tensors[program.input].nbytes + label
    return BATCHES_HEADER_BYTES + steps * per_step(True)


def job_header(program: Program, steps: int = JOB_STEPS) -> str:
    ranges = out_ranges(program) or [(0, 0)]
    return "\n".join([
        "/* Generated by compiler.codegen.siracusa for this program; do not edit. */",
        f"#define EF_JOB_BYTES {job_bytes(program, steps)}u   /* batches.bin for up to {steps} steps */",
        "#define EF_OUT_RANGES " + ", ".join(f"{{{o}u, {s}u}}" for o, s in ranges),
        f"#define EF_TRAIN_STEPS {len(program.train.steps)}u",
        f"#define EF_EVALUATE_STEPS {len(program.evaluate.steps)}u",
        f"#define EF_PROFILE_SLOTS {max(len(program.train.steps), len(program.evaluate.steps), 1)}u",
        "",
    ])


def _cluster_sources() -> list[Path]:
    return kernel_sources() + hal_sources() + sorted((HAL_DIR / "pulp").glob("*.c")) + [BOARD_SRC / "main.c"]


def _fc_sources() -> list[Path]:
    return [BOARD_SRC / "crt0.S", BOARD_SRC / "fc.c"]


def board_sources() -> list[Path]:
    """Everything the siracusa build compiles besides program.c (for the content key)."""
    headers = (sorted(KERNEL_DIR.glob("*.h")) + sorted(HAL_DIR.glob("*.h")) + sorted((HAL_DIR / "pulp").glob("*.h"))
               + sorted(BOARD_SRC.glob("*.h")))
    return _cluster_sources() + _fc_sources() + headers + [LINK_SCRIPT]


def _includes(out: Path, tools: Toolchain) -> list[str]:
    return [f"-I{out}", f"-I{KERNEL_DIR}", f"-I{HAL_DIR}", f"-I{HAL_DIR / 'pulp'}", f"-I{BOARD_SRC}",
            "-isystem", str(tools.include)]


def build_siracusa(program: Program, out_dir: str | os.PathLike, board: Board, *,
                   timeout_s: float = BUILD_TIMEOUT_S, reuse: bool = True, extra_cflags: Sequence[str] = (),
                   job_steps: int = JOB_STEPS) -> Path:
    check_program(program)
    source, mark = generate(program)
    header = job_header(program, job_steps)
    key = firmware_key(source + header + _sources_digest(board_sources()), board, None,
                       [*extra_cflags, f"job_steps={job_steps}"])
    out = Path(out_dir)
    exe = out / board.executable
    if reuse and reusable(out, board.executable, key):
        return exe
    tools = find_toolchain()
    obj = out / "obj"
    shutil.rmtree(obj, ignore_errors=True)
    obj.mkdir(parents=True)
    (out / "program.c").write_text(source)
    (out / "ef_siracusa_job.h").write_text(header)
    defines = [f"-DEF_SIRACUSA_CORE_STACK_BYTES={CORE_STACK_BYTES}", "-DEF_PROFILE",
               '-DEF_PARAMS_SECTION=__attribute__((section(".ef_params")))']
    cc = [*tools.zig, "cc", "-target", ZIG_TARGET]
    flags = [*COMMON_FLAGS, *defines, *_includes(out, tools), *extra_cflags]
    log = out / "build.log"
    what = f"building {program.model!r} for siracusa"
    jobs = [(f"-mcpu={FC_CPU}", src) for src in _fc_sources()] + \
           [(f"-mcpu={CLUSTER_CPU}", src) for src in [out / "program.c", *_cluster_sources()]]

    def compile_one(job: tuple[str, Path]) -> None:   # zig cc -c compiles only the first of several inputs
        cpu, src = job
        _compile([*cc, cpu, *flags, "-c", str(src), "-o", str(obj / f"{src.stem}.o")],
                 obj / f"{src.stem}.log", what, timeout_s)

    names = [src.stem for _, src in jobs]
    if len(set(names)) != len(names):
        raise CompileError("siracusa build: two sources share a file name (their objects would collide)")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(compile_one, jobs))
    tmp = out / f"{board.executable}.tmp-{os.getpid()}"
    script = out / "link.ld"       # zig's linker driver takes no --defsym: the sizes go first in the script
    script.write_text(f"__l1_stacks_bytes = {CORE_STACK_BYTES * STACK_SLOTS};\n__fc_stack_bytes = {FC_STACK_BYTES};\n"
                      + LINK_SCRIPT.read_text())
    link = [*cc, f"-mcpu={CLUSTER_CPU}", "-nostdlib", "-static", "-T", str(script), "-Wl,--gc-sections",
            *sorted(map(str, obj.glob("*.o"))), str(tools.libc / "libc.a"),
            str(tools.libgcc), "-o", str(tmp)]
    _compile(link, log.with_name("link.log"), what, timeout_s)
    os.replace(tmp, exe)
    write_manifest(out, {"board": board.name, "model": program.model, "fingerprint": mark, "key": key,
                         "executable": board.executable, "memory": None, "job_steps": job_steps,
                         "job_bytes": job_bytes(program, job_steps), "out_ranges": out_ranges(program)})
    return exe


# ---- the ELF's sections (no I/O beyond bytes; used by device_runtime.gvsoc and the tests) -----------------
@dataclass(frozen=True)
class Section:
    name: str
    address: int
    size_bytes: int
    file_offset: int
    loaded: bool                   # PROGBITS (its bytes are in the file), not NOBITS


def sections(elf: bytes) -> dict[str, Section]:
    """The sections of a little-endian ELF32 image."""
    if elf[:4] != b"\x7fELF" or elf[4] != 1 or elf[5] != 1:
        raise CompileError("not a little-endian 32-bit ELF")
    shoff, = struct.unpack_from("<I", elf, 0x20)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x2E)
    headers = [struct.unpack_from("<IIIIIIIIII", elf, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx]
    names = elf[strtab[4]: strtab[4] + strtab[5]]
    out = {}
    for name_off, kind, _flags, addr, offset, size, *_ in headers:
        name = names[name_off: names.index(b"\0", name_off)].decode()
        if name:
            out[name] = Section(name, addr, size, offset, kind == 1)
    return out


def patch_section(elf: bytearray, name: str, data: bytes) -> None:
    """Write ``data`` at the start of section ``name`` (PROGBITS) of ``elf``, in place."""
    section = sections(bytes(elf)).get(name)
    if section is None or not section.loaded:
        raise CompileError(f"the ELF has no loaded section {name!r}")
    if len(data) > section.size_bytes:
        raise CompileError(f"{len(data)} bytes do not fit section {name!r} ({section.size_bytes} bytes)")
    elf[section.file_offset: section.file_offset + len(data)] = data


__all__ = ["MEMORY_MAP", "Section", "build_siracusa", "check_program", "find_toolchain", "job_bytes", "out_ranges",
           "patch_section", "sections"]
