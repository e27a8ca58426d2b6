"""C code generation: a Program becomes one C file (static parameter region and arena, one kernel call per
step) that links with the kernel library (kernels/) and a board's firmware entry (boards/) into an ELF.

    from compiler.codegen import generate_c, build_elf
    source = generate_c(program)
    elf = build_elf(program, "build/deep-ae", board="rv32-qemu")

The op → kernel mapping is the strict template table in ``templates.py``; layouts and the kernel ABI are
described in docs/codegen.md. GEMM steps lowered onto RedMulE call the HAL's tiled GEMM (``hal/``), which every
board links: the generic HAL on host, rv32-qemu and rv32-zfinx-qemu, the pulp HAL on siracusa (bare metal, built with
zig's clang from the PyPI package ziglang, run by GVSoC through device_runtime.gvsoc).
"""
from compiler.codegen.build import (BOARDS, HAL_DIR, KERNEL_DIR, Board, MemoryMap, board_for_target, build_elf,
                                    build_hal_library, build_kernel_library, memory_map, read_manifest)
from compiler.codegen.emit import generate_c, program_fingerprint
from compiler.codegen.templates import TEMPLATES, Ref, Site, Template, bind

__all__ = ["BOARDS", "HAL_DIR", "KERNEL_DIR", "TEMPLATES", "Board", "MemoryMap", "Ref", "Site", "Template", "bind",
           "board_for_target", "build_elf", "build_hal_library", "build_kernel_library", "generate_c", "memory_map",
           "program_fingerprint", "read_manifest"]
