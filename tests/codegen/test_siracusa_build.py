"""The HAL and the siracusa board.

- The generic HAL (hal/generic) and the tiled GEMM written against the HAL (hal/ef_hal_gemm.c) are compiled with
  the host gcc into a shared object and called through ctypes: 1-D and 2-D DMA copies, and ef_hal_gemm through
  the RedMulE-job stand-in against numpy (and bit for bit against the core kernel ef_gemm) for shapes that are not
  multiples of the tiles, transposed operands, every bias layout.
- The pulp HAL (hal/pulp) compiles for the cluster's ISA (zig's clang, Zfinx) and defines the whole interface; it
  programs Siracusa's MCHAN DMA (and RedMulE) registers, which QEMU does not have: it runs under GVSoC
  (tests/device_runtime/test_gvsoc.py, when GVSoC is configured).
- The siracusa ELF (zig's clang + lld): readelf puts every section in GVSoC's siracusa memory map; the job
  sections are patched in place.
- A program lowered for siracusa, built for the host board (generic HAL), trains like NumpyDevice: its RedMulE
  steps go through the HAL kernels (ef_hal_gemm, ef_hal_lora_linear, ...). The LoRA kernels: test_hal_lora.py.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

from compiler import compile_model
from compiler.codegen import HAL_DIR, KERNEL_DIR, build_elf, generate_c
from compiler.codegen.build import hal_sources
from compiler.codegen.build import ZFINX_CFLAGS, zig_cc
from compiler.codegen.siracusa import MEMORY_MAP, job_bytes, patch_section
from compiler.codegen.siracusa import sections as siracusa_sections
from compiler.codegen.pulp_sdk import find_pulp_sdk
from compiler.codegen.templates import REDMULE_KERNELS, TEMPLATES
from compiler.ir import CompileError
from compiler.targets import load_target, lower_to_target
from device_runtime import NumpyDevice
from device_runtime.qemu import QemuDevice
from tests.codegen.hal_harness import HAL_L1_BYTES, HAL_RTOL, Tile, close, ptr, stats
from tests.codegen.programs import AE_LORA, K_STEPS, data_for, rel_diff

HOST_GCC = shutil.which("gcc")
RISCV_GCC = shutil.which("riscv64-unknown-elf-gcc")

needs_gcc = pytest.mark.skipif(HOST_GCC is None, reason="host gcc is not installed")
needs_riscv = pytest.mark.skipif(RISCV_GCC is None, reason="riscv64-unknown-elf-gcc is not installed "
                                                           "(Debian: gcc-riscv64-unknown-elf)")


# ---- the generic HAL through ctypes (the `hal` fixture: tests/codegen/conftest.py) -------------------------
def test_dma_1d_moves_exactly_the_bytes(hal):
    src = np.arange(37, dtype=np.uint8)
    l1 = np.full(40, 0xEE, np.uint8)
    hal.ef_hal_dma_wait(hal.ef_hal_dma_in(ptr(l1), ptr(src), 37))
    assert np.array_equal(l1[:37], src) and (l1[37:] == 0xEE).all()
    back = np.zeros(37, np.uint8)
    hal.ef_hal_dma_wait(hal.ef_hal_dma_out(ptr(back), ptr(l1), 37))
    assert np.array_equal(back, src)


def test_dma_2d_gathers_and_scatters_a_strided_tile(hal):
    l2 = np.arange(9 * 13, dtype=np.float32).reshape(9, 13)
    l1 = np.full((4, 5), np.nan, np.float32)
    rows, cols, r0, c0 = 4, 5, 3, 6
    src = l2[r0:, c0:]                                   # a view: its data pointer is the tile's first element
    hal.ef_hal_dma_wait(hal.ef_hal_dma_in_2d(ptr(l1), src.ctypes.data, cols * 4, rows, 13 * 4))
    assert np.array_equal(l1, l2[r0:r0 + rows, c0:c0 + cols])
    out = np.zeros_like(l2)
    hal.ef_hal_dma_wait(hal.ef_hal_dma_out_2d(out[r0:, c0:].ctypes.data, ptr(l1), cols * 4, rows, 13 * 4))
    expected = np.zeros_like(l2)
    expected[r0:r0 + rows, c0:c0 + cols] = l2[r0:r0 + rows, c0:c0 + cols]
    assert np.array_equal(out, expected)


def _gemm_case(rng, m, n, k, ta, tb, bias):
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    c, c_rs, c_cs = None, 0, 0
    if bias == "full":
        c, c_rs, c_cs = rng.standard_normal((m, n)).astype(np.float32), n, 1
    elif bias == "row":                                  # (n,) broadcast over the rows
        c, c_rs, c_cs = rng.standard_normal(n).astype(np.float32), 0, 1
    elif bias == "column":                               # (m, 1)
        c, c_rs, c_cs = rng.standard_normal((m, 1)).astype(np.float32), 1, 0
    return a, b, c, c_rs, c_cs


def _reference(a, b, c, ta, tb, alpha, beta, m, n):
    y = alpha * ((a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64))
    if c is not None:
        y = y + beta * np.broadcast_to(c.reshape(-1, 1) if c.shape == (m, 1) else c, (m, n))
    return y


GEMM_CASES = [  # m, n, k, trans_a, trans_b, bias, alpha, beta, tile (m, n, k)
    (13, 17, 11, 0, 0, None, 1.0, 1.0, (5, 7, 3)),
    (13, 17, 11, 1, 0, "full", 1.0, 1.0, (4, 16, 4)),
    (13, 17, 11, 0, 1, "row", 0.5, 2.0, (12, 5, 11)),
    (13, 17, 11, 1, 1, "column", 1.0, -1.0, (3, 3, 2)),
    (8, 640, 128, 0, 1, "row", 1.0, 1.0, (8, 24, 8)),       # deep-ae's decoder.4, forward
    (4, 640, 8, 1, 0, None, 1.0, 1.0, (4, 50, 8)),          # a LoRA A gradient: transposed A
    (1, 1, 1, 0, 0, "full", 1.0, 1.0, (1, 1, 1)),
    (7, 5, 0, 0, 0, "full", 2.0, 0.5, (7, 5, 1)),           # k = 0: Y = beta C
]


@pytest.mark.parametrize("m, n, k, ta, tb, bias, alpha, beta, tile", GEMM_CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}-t{c[3]}{c[4]}-{c[5]}-tile{'x'.join(map(str, c[8]))}"
                              for c in GEMM_CASES])
def test_tiled_gemm_matches_numpy_and_the_core_kernel(hal, m, n, k, ta, tb, bias, alpha, beta, tile):
    rng = np.random.default_rng(m * 1000 + n * 10 + k)
    a, b, c, c_rs, c_cs = _gemm_case(rng, m, n, k, ta, tb, bias)
    guard = 8
    y = np.full(m * n + guard, np.nan, np.float32)       # NaN guard after Y: nothing may be written past it
    assert hal.ef_hal_gemm_l1_bytes(Tile(*tile), ta, tb) <= HAL_L1_BYTES
    hal.ef_hal_generic_reset_stats()
    status = hal.ef_hal_gemm_tiled(ptr(y), ptr(a), ptr(b), ptr(c), m, n, k, ta, tb, alpha, beta, c_rs, c_cs,
                                   Tile(*tile))
    assert status == 0
    got = y[:m * n].reshape(m, n)
    assert np.isnan(y[m * n:]).all()
    close(got, _reference(a, b, c, ta, tb, alpha, beta, m, n))
    core = np.full((m, n), np.nan, np.float32)
    hal.ef_gemm(ptr(core), ptr(a), ptr(b), ptr(c), m, n, k, ta, tb, alpha, beta, c_rs, c_cs)
    assert np.array_equal(got, core), "the HAL path must do ef_gemm's sums in ef_gemm's order"
    s = stats(hal)
    if k > 0:
        outputs = -(-m // min(tile[0], m)) * -(-n // min(tile[1], n))
        steps = outputs * -(-k // min(tile[2], k))
        assert s.redmule_jobs == steps and s.redmule_macs == m * n * k
        assert s.dma_transfers == 2 * steps + outputs    # A and B tiles per step, one Z tile per output tile
    assert hal.ef_hal_l1_free_bytes() == HAL_L1_BYTES, "ef_hal_gemm_tiled must release its L1 buffers"


def test_tile_choice_fits_l1_and_ef_hal_gemm_uses_it(hal):
    m, n, k = 16, 200, 96                                # 77 KiB of operands: far more than the 8 KiB pool
    tile = hal.ef_hal_gemm_tile(m, n, k, 0, 1, HAL_L1_BYTES)
    assert hal.ef_hal_gemm_l1_bytes(tile, 0, 1) <= HAL_L1_BYTES
    assert (tile.m, tile.n, tile.k) != (m, n, k)
    rng = np.random.default_rng(5)
    a, b, c, c_rs, c_cs = _gemm_case(rng, m, n, k, 0, 1, "row")
    y = np.empty((m, n), np.float32)
    hal.ef_hal_generic_reset_stats()
    hal.ef_hal_gemm(ptr(y), ptr(a), ptr(b), ptr(c), m, n, k, 0, 1, 1.0, 1.0, c_rs, c_cs)
    close(y, _reference(a, b, c, 0, 1, 1.0, 1.0, m, n))
    s = stats(hal)
    assert s.redmule_jobs == -(-m // tile.m) * -(-n // tile.n) * -(-k // tile.k)
    assert 0 < s.l1_peak_bytes <= HAL_L1_BYTES


def test_tiled_gemm_refuses_a_tile_larger_than_l1(hal):
    z = np.zeros(4, np.float32)
    assert hal.ef_hal_gemm_tiled(ptr(z), ptr(z), ptr(z), None, 64, 64, 64, 0, 0, 1.0, 1.0, 0, 0, Tile(64, 64, 64)) == -1


def test_batched_mat_mul_with_a_broadcast_operand(hal):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 1, 9, 6)).astype(np.float32)    # broadcast along axis 1
    b = rng.standard_normal((1, 2, 6, 10)).astype(np.float32)   # broadcast along axis 0
    y = np.empty((3, 2, 9, 10), np.float32)
    bshape, sa, sb = (np.array(v, np.int32) for v in ((3, 2), (9 * 6, 0), (0, 6 * 10)))   # kept alive: ctypes
    hal.ef_hal_mat_mul(ptr(y), ptr(a), ptr(b), 9, 10, 6, 2, ptr(bshape), ptr(sa), ptr(sb))
    close(y, a.astype(np.float64) @ b.astype(np.float64))


# ---- the pulp HAL and the siracusa ELF ---------------------------------------------------------------------
def _defined_hal_symbols(obj: Path) -> set[str]:
    nm = shutil.which("riscv64-unknown-elf-nm") or shutil.which("nm")
    out = subprocess.run([nm, "--defined-only", str(obj)], capture_output=True, text=True, check=True).stdout
    return {ln.split()[-1] for ln in out.splitlines() if ln.split() and ln.split()[-1].startswith("ef_hal_")}


@needs_riscv
def test_pulp_hal_compiles_for_zfinx_and_implements_the_whole_interface(tmp_path):
    """Both HALs define the same ef_hal_* interface (the pulp one adds the worker loop of cores 1-7); the pulp HAL
    compiles without warnings for the cluster's ISA, with and without RedMulE."""
    objs = {}
    zig = zig_cc()
    for name, extra in (("pulp", ["-DEF_HAL_REDMULE"]), ("pulp-cores", [])):
        objs[name] = tmp_path / f"{name}.o"
        cmd = [*zig, *ZFINX_CFLAGS, *extra, "-std=gnu11", "-Wall", "-Wextra", "-Werror", f"-I{HAL_DIR}",
               f"-I{HAL_DIR / 'pulp'}", "-c", str(HAL_DIR / "pulp" / "ef_hal_pulp.c"), "-o", str(objs[name])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    objs["generic"] = tmp_path / "generic.o"
    proc = subprocess.run([RISCV_GCC, "-march=rv32imf", "-mabi=ilp32f", "--specs=picolibc.specs", "-O2", "-c",
                           f"-I{HAL_DIR}", f"-I{HAL_DIR / 'generic'}", str(HAL_DIR / "generic" / "ef_hal_generic.c"),
                           "-o", str(objs["generic"])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    generic = _defined_hal_symbols(objs["generic"]) - {"ef_hal_generic_stats", "ef_hal_generic_reset_stats"}
    assert _defined_hal_symbols(objs["pulp"]) == generic | {"ef_hal_worker"}
    assert _defined_hal_symbols(objs["pulp-cores"]) == generic | {"ef_hal_worker"}


@needs_riscv
def test_hal_kernels_compile_for_rv32_without_warnings(tmp_path):
    """The kernels written against ef_hal.h (tiled GEMM, LoRA layer) go into every board's build, siracusa's too."""
    sources = hal_sources()
    assert {p.name for p in sources} >= {"ef_hal_gemm.c", "ef_hal_lora.c"}
    for source in sources:
        cmd = [RISCV_GCC, "-march=rv32imf", "-mabi=ilp32f", "--specs=picolibc.specs", "-O2", "-std=gnu11", "-Wall",
               "-Wextra", "-Werror", f"-I{HAL_DIR}", f"-I{KERNEL_DIR}", "-c", str(source), "-o",
               str(tmp_path / f"{source.stem}.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def lowered():
    program = compile_model("deep-ae", tuning=AE_LORA, batch=4, lr=0.05)
    return program, lower_to_target(program, load_target("siracusa"))


@pytest.fixture(scope="module")
def siracusa_elf(lowered, tmp_path_factory):
    return build_elf(lowered[1], tmp_path_factory.mktemp("siracusa") / "out", board="siracusa")


def _readelf(elf: Path, flag: str) -> str:
    return subprocess.run(["riscv64-unknown-elf-readelf", flag, "-W", str(elf)], capture_output=True, text=True,
                          check=True).stdout


@needs_riscv
def test_siracusa_elf_lands_in_the_memory_map(lowered, siracusa_elf):
    """readelf: code and data in L2 shared, stacks and the L1 pool in the TCDM, the job sections sized for the
    program; the FC part is rv32imc (no float instruction), the cluster part uses Zfinx."""
    program = lowered[1]
    found = {}
    for line in _readelf(siracusa_elf, "-S").splitlines():
        fields = line.replace("[ ", "[").split()
        if len(fields) > 6 and fields[0].startswith("[") and fields[1].startswith("."):
            found[fields[1]] = (int(fields[3], 16), int(fields[5], 16), fields[2])
    (l2, l2_bytes), (l1, l1_bytes) = MEMORY_MAP["L2"], MEMORY_MAP["L1"]
    for name in (".text", ".rodata", ".ef_params", ".ef_job", ".bss"):
        addr, size, _ = found[name]
        assert l2 <= addr and addr + size <= l2 + l2_bytes, name
    addr, size, kind = found[".l1"]
    assert l1 <= addr and addr + size <= l1 + l1_bytes and kind == "NOBITS"
    assert found[".ef_params"][1:] == (program.params_bytes, "PROGBITS")
    assert found[".ef_job"][1:] == (job_bytes(program), "PROGBITS")
    entry = int(_readelf(siracusa_elf, "-h").split("Entry point address:")[1].split()[0], 16)
    assert entry == found[".text"][0]
    sections = siracusa_sections(siracusa_elf.read_bytes())
    assert {n: (s.address, s.size_bytes) for n, s in sections.items() if n in found} == \
        {n: found[n][:2] for n in found if n in sections}
    disasm = subprocess.run(["riscv64-unknown-elf-objdump", "-d", str(siracusa_elf)], capture_output=True,
                            text=True, check=True).stdout
    fc = disasm.split("<ef_fc_main>:")[1].split("\n\n")[0]
    assert "ef_fc_main" in disasm and not any(f"{op}.s" in fc for op in ("fadd", "fmul", "fsub", "fdiv"))
    assert "fmul.s\ta" in disasm or "fmadd.s\ta" in disasm


@needs_riscv
def test_job_patching_writes_the_sections_and_refuses_overflow(lowered, siracusa_elf):
    elf = bytearray(siracusa_elf.read_bytes())
    sections = siracusa_sections(bytes(elf))
    region = np.arange(lowered[1].params_bytes, dtype=np.uint32).astype(np.uint8).tobytes()
    patch_section(elf, ".ef_params", region)
    s = sections[".ef_params"]
    assert bytes(elf[s.file_offset: s.file_offset + s.size_bytes]) == region
    assert len(elf) == len(siracusa_elf.read_bytes())
    with pytest.raises(CompileError, match="do not fit section '.ef_job'"):
        patch_section(elf, ".ef_job", bytes(sections[".ef_job"].size_bytes + 1))
    with pytest.raises(CompileError, match="no loaded section '.bss'"):
        patch_section(elf, ".bss", b"x")


def test_siracusa_build_needs_a_program_lowered_for_siracusa(lowered, tmp_path):
    with pytest.raises(CompileError, match="needs a program lowered for a siracusa target"):
        build_elf(lowered[0], tmp_path, board="siracusa")


# ---- a lowered program on the generic HAL -----------------------------------------------------------------
@needs_gcc
def test_program_lowered_for_siracusa_trains_like_numpy_on_the_generic_hal(lowered, tmp_path):
    program, on_siracusa = lowered
    source = generate_c(on_siracusa)
    redmule = [s for s in on_siracusa.train.steps if s.unit == "redmule" and TEMPLATES[s.op].kernel in REDMULE_KERNELS]
    assert redmule and sum(source.count(f"{kernel}(") for kernel in REDMULE_KERNELS.values()) >= len(redmule)
    assert "ef_hal" not in generate_c(program)          # not lowered: the core kernels, as before
    x, y = data_for(on_siracusa, 10)
    got = QemuDevice(on_siracusa, tmp_path / "hal", board="host").train(x, y, K_STEPS)
    want = NumpyDevice(on_siracusa).train(x, y, K_STEPS)
    assert rel_diff(got.losses, want.losses) <= HAL_RTOL
    for name in want.params:
        assert rel_diff(got.params[name], want.params[name]) <= HAL_RTOL, name
    core = QemuDevice(program, tmp_path / "core", board="host").train(x, y, K_STEPS)
    assert np.array_equal(got.losses, core.losses)      # the HAL kernels add in the core kernels' order


# ---- boards built by the PULP SDK (siracusa-serial): the SDK check and the pmsis HAL ----------------------
@needs_riscv
def test_pmsis_hal_type_checks_for_rv32_and_implements_the_whole_interface(tmp_path):
    """The pmsis HAL (hal/pulp_pmsis, for siracusa-serial) type-checks against its pmsis declarations and defines
    the generic HAL's interface. Syntax and types only: it needs the PULP SDK to build."""
    obj = tmp_path / "pmsis.o"
    cmd = [RISCV_GCC, "-march=rv32imf", "-mabi=ilp32f", "-ffreestanding", "-O2", "-std=gnu11", "-Wall", "-Wextra",
           "-Werror", f"-I{HAL_DIR}", f"-I{HAL_DIR / 'pulp'}", "-c",
           str(HAL_DIR / "pulp_pmsis" / "ef_hal_pulp_pmsis.c"), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    generic = tmp_path / "generic.o"
    subprocess.run([RISCV_GCC, "-march=rv32imf", "-mabi=ilp32f", "--specs=picolibc.specs", "-O2", "-c",
                    f"-I{HAL_DIR}", f"-I{HAL_DIR / 'generic'}", str(HAL_DIR / "generic" / "ef_hal_generic.c"), "-o",
                    str(generic)], check=True)
    assert _defined_hal_symbols(obj) == _defined_hal_symbols(generic) - {"ef_hal_generic_stats",
                                                                         "ef_hal_generic_reset_stats"}


def test_sdk_check_names_exactly_what_is_missing(tmp_path):
    sdk = tmp_path / "pulp-sdk"
    (sdk / "configs").mkdir(parents=True)
    (sdk / "configs" / "siracusa.sh").write_text("")
    (sdk / "rules").mkdir()
    (sdk / "rules" / "pmsis_rules.mk").write_text("")
    toolchain = tmp_path / "gcc"
    (toolchain / "bin").mkdir(parents=True)
    gcc = toolchain / "bin" / "riscv32-unknown-elf-gcc"
    gcc.write_text("#!/bin/sh\n")
    gcc.chmod(gcc.stat().st_mode | stat.S_IEXEC)
    path = os.path.dirname(shutil.which("make") or "/usr/bin/make")
    sourced = {"PULP_SDK_HOME": str(sdk), "RULES_DIR": str(sdk / "rules"), "TARGET_CHIP": "SIRACUSA", "PATH": path,
               "PULP_RISCV_GCC_TOOLCHAIN": str(toolchain)}
    if shutil.which("make"):
        assert find_pulp_sdk(sourced)["gcc"] == str(gcc)
    with pytest.raises(CompileError, match=r"missing: the siracusa configuration .*source \$PULP_SDK_HOME"):
        find_pulp_sdk({**sourced, "TARGET_CHIP": "GAP9"})
    with pytest.raises(CompileError, match=r"missing: riscv32-unknown-elf-gcc$"):
        find_pulp_sdk({**sourced, "PULP_RISCV_GCC_TOOLCHAIN": ""})
    with pytest.raises(CompileError, match=r"missing: PULP_SDK_HOME \(.* has no configs/siracusa.sh\)"):
        find_pulp_sdk({**sourced, "PULP_SDK_HOME": str(tmp_path)})
