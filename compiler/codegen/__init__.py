"""C code generation: a Program becomes one C file (static parameter region and arena, one kernel call per
step) that links with the kernel library (kernels/) and a board's firmware entry (boards/) into an ELF.

    from compiler.codegen import generate_c, build_elf
    source = generate_c(program)
    elf = build_elf(program, "build/deep-ae", board="rv32-qemu")

The op → kernel mapping is the strict template table in ``templates.py``; layouts and the kernel ABI are
described in docs/codegen.md.
"""
from compiler.codegen.build import (BOARDS, KERNEL_DIR, Board, MemoryMap, build_elf, build_kernel_library,
                                    memory_map, read_manifest)
from compiler.codegen.emit import generate_c, program_fingerprint
from compiler.codegen.templates import TEMPLATES, Ref, Site, Template, bind

__all__ = ["BOARDS", "KERNEL_DIR", "TEMPLATES", "Board", "MemoryMap", "Ref", "Site", "Template", "bind",
           "build_elf", "build_kernel_library", "generate_c", "memory_map", "program_fingerprint", "read_manifest"]
