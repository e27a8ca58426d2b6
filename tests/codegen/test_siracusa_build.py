"""The HAL and the siracusa board.

- The generic HAL (hal/generic) and the tiled GEMM written against the HAL (hal/ef_hal_gemm.c) are compiled with
  the host gcc into a shared object and called through ctypes: 1-D and 2-D DMA copies, and ef_hal_gemm through
  the RedMulE-job stand-in against numpy (and bit for bit against the core kernel ef_gemm) for shapes that are not
  multiples of the tiles, transposed operands, every bias layout.
- The pulp HAL (hal/pulp) is only type-checked: riscv64-unknown-elf-gcc -march=rv32imf -mabi=ilp32f -c. It
  programs Siracusa's event unit, MCHAN DMA and RedMulE registers, which neither this machine nor QEMU has, so it
  cannot run here.
- The siracusa build without the PULP SDK fails with one line naming the SDK (build_elf and `edgefleet compile
  --build`); with a stand-in SDK (a fake pmsis_rules.mk that type-checks every source against the pmsis
  declarations the sources use) the build writes a complete, self-contained SDK application.
- A program lowered for siracusa, built for the host board (generic HAL), trains like NumpyDevice: its RedMulE
  steps go through the HAL kernels (ef_hal_gemm, ef_hal_lora_linear, ...). The LoRA kernels: test_hal_lora.py.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compiler import compile_model
from compiler.codegen import HAL_DIR, KERNEL_DIR, build_elf, generate_c
from compiler.codegen.build import hal_sources
from compiler.codegen.siracusa import SDK_HINT, find_pulp_sdk
from compiler.codegen.templates import REDMULE_KERNELS, TEMPLATES
from compiler.ir import CompileError
from compiler.targets import load_target, lower_to_target
from device_runtime import NumpyDevice
from device_runtime.qemu import QemuDevice
from tests.codegen.hal_harness import HAL_L1_BYTES, HAL_RTOL, Tile, close, ptr, stats
from tests.codegen.programs import AE_LORA, K_STEPS, data_for, rel_diff

ROOT = Path(__file__).resolve().parents[2]
HOST_GCC = shutil.which("gcc")
RISCV_GCC = shutil.which("riscv64-unknown-elf-gcc")
SDK_VARS = ("PULP_SDK_HOME", "PULP_RISCV_GCC_TOOLCHAIN", "RULES_DIR", "TARGET_CHIP")

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


# ---- the pulp HAL: type check only -----------------------------------------------------------------------
def _defined_hal_symbols(obj: Path) -> set[str]:
    nm = shutil.which("riscv64-unknown-elf-nm") or shutil.which("nm")
    out = subprocess.run([nm, "--defined-only", str(obj)], capture_output=True, text=True, check=True).stdout
    return {ln.split()[-1] for ln in out.splitlines() if ln.split() and ln.split()[-1].startswith("ef_hal_")}


@needs_riscv
def test_pulp_hal_compiles_for_rv32_and_implements_the_whole_interface(tmp_path):
    """Syntax and type check only: the register-level code needs Siracusa (or GVSoC), which is not here."""
    objs = {}
    for name, source, extra in (("pulp", HAL_DIR / "pulp" / "ef_hal_pulp.c", ["-ffreestanding"]),
                                ("generic", HAL_DIR / "generic" / "ef_hal_generic.c", ["--specs=picolibc.specs"])):
        objs[name] = tmp_path / f"{name}.o"
        cmd = [RISCV_GCC, "-march=rv32imf", "-mabi=ilp32f", *extra, "-O2", "-std=gnu11", "-Wall", "-Wextra",
               "-Werror", f"-I{HAL_DIR}", f"-I{HAL_DIR / name}", "-c", str(source), "-o", str(objs[name])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    generic = _defined_hal_symbols(objs["generic"]) - {"ef_hal_generic_stats", "ef_hal_generic_reset_stats"}
    assert _defined_hal_symbols(objs["pulp"]) == generic


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


# ---- the siracusa build without (and with a stand-in for) the PULP SDK ---------------------------------------
@pytest.fixture(scope="module")
def lowered():
    program = compile_model("deep-ae", tuning=AE_LORA, batch=4, lr=0.05)
    return program, lower_to_target(program, load_target("siracusa"))


@pytest.fixture
def no_sdk(monkeypatch, tmp_path):
    """An environment without the SDK: its variables unset and a PATH holding only make."""
    for var in SDK_VARS:
        monkeypatch.delenv(var, raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if shutil.which("make"):
        (bin_dir / "make").symlink_to(shutil.which("make"))
    monkeypatch.setenv("PATH", str(bin_dir))
    return dict(os.environ)


def test_siracusa_build_without_the_sdk_names_it_in_one_line(lowered, no_sdk, tmp_path):
    with pytest.raises(CompileError) as err:
        build_elf(lowered[1], tmp_path / "out", board="siracusa")
    message = str(err.value)
    assert "\n" not in message and message.startswith(SDK_HINT)
    assert "PULP_SDK_HOME" in message.split("missing:")[1] and "riscv32-unknown-elf-gcc" in message.split("missing:")[1]
    assert not (tmp_path / "out" / "firmware.elf").exists()


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


def test_siracusa_build_needs_a_program_lowered_for_siracusa(lowered, tmp_path):
    with pytest.raises(CompileError, match="needs a program lowered for a siracusa target"):
        build_elf(lowered[0], tmp_path, board="siracusa")


def test_cli_compile_build_for_siracusa_exits_2_with_the_sdk_line(no_sdk, tmp_path):
    out = tmp_path / "tmp"
    env = {**no_sdk, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "fleet.cli", "compile", "deep-ae", "--strategy", "lora", "--target",
                           "siracusa", "--build", "-o", str(out)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 2, proc.stderr
    with pytest.raises(CompileError) as expected:
        find_pulp_sdk(no_sdk)
    assert proc.stderr.splitlines() == [f"edgefleet: error: {expected.value}"]
    assert (out / "manifest.json").exists()            # the program artifact is written before the build


PMSIS_STUB = """/* Stand-in for the pmsis headers: only the declarations the siracusa sources use, with pulp-sdk's
 * signatures (rtos/pmsis/pmsis_api, pmsis_bsp). For type checking in tests; not the SDK. */
#pragma once
#include <stdint.h>
struct pi_device { void *api, *config, *data; };
struct pi_cluster_conf { int id; };
struct pi_cluster_task { void (*entry)(void *); void *arg; void *stacks; uint32_t stack_size, slave_stack_size; };
struct pi_fs_conf { int type; };
struct pi_hostfs_conf { struct pi_fs_conf fs; };
typedef struct pi_fs_file_s pi_fs_file_t;
enum { PI_PERF_INSTR = 1, PI_PERF_CYCLES = 17, PI_FS_FLAGS_READ = 0, PI_FS_FLAGS_WRITE = 1 };
void pi_open_from_conf(struct pi_device *device, void *conf);
void pi_cluster_conf_init(struct pi_cluster_conf *conf);
int pi_cluster_open(struct pi_device *device);
int pi_cluster_close(struct pi_device *device);
struct pi_cluster_task *pi_cluster_task(struct pi_cluster_task *task, void (*entry)(void *), void *arg);
int pi_cluster_send_task_to_cl(struct pi_device *device, struct pi_cluster_task *task);
void pi_cl_team_fork(int nb_cores, void (*entry)(void *), void *arg);
int pi_cl_team_nb_cores(void);
int pi_cl_cluster_nb_cores(void);
uint32_t pi_core_id(void);
void *pi_cl_l1_malloc(struct pi_device *device, uint32_t size);
void pi_perf_conf(unsigned events);
void pi_perf_reset(void);
void pi_perf_start(void);
void pi_perf_stop(void);
unsigned int pi_perf_read(int id);
void pi_hostfs_conf_init(struct pi_hostfs_conf *conf);
int32_t pi_fs_mount(struct pi_device *device);
void pi_fs_unmount(struct pi_device *device);
pi_fs_file_t *pi_fs_open(struct pi_device *device, const char *file, int flags);
void pi_fs_close(pi_fs_file_t *file);
int32_t pi_fs_read(pi_fs_file_t *file, void *buffer, uint32_t size);
int32_t pi_fs_write(pi_fs_file_t *file, void *buffer, uint32_t size);
int pmsis_kickoff(void *arg);
void pmsis_exit(int err);
"""

# The stand-in SDK's rules: type-check every APP_SRCS file for rv32 against the stub, then "link" by touching
# the executable where the real rules put it (build/$(APP)/$(APP)).
FAKE_RULES = """all: build/$(APP)/$(APP)
build/$(APP)/$(APP): $(APP_SRCS)
\tmkdir -p build/$(APP)
\tfor f in $(APP_SRCS); do riscv32-unknown-elf-gcc -fsyntax-only -Werror $(APP_CFLAGS) $$f || exit 1; done
\ttouch $@
"""


@needs_riscv
def test_siracusa_build_with_a_stand_in_sdk_writes_a_complete_sdk_application(lowered, monkeypatch, tmp_path):
    sdk = tmp_path / "pulp-sdk"
    (sdk / "configs").mkdir(parents=True)
    (sdk / "configs" / "siracusa.sh").write_text("")
    rules = sdk / "tools" / "rules"
    rules.mkdir(parents=True)
    (rules / "pmsis_rules.mk").write_text(FAKE_RULES)
    stub = tmp_path / "pmsis-stub"
    (stub / "bsp" / "fs").mkdir(parents=True)
    (stub / "pmsis.h").write_text(PMSIS_STUB)
    (stub / "bsp" / "fs.h").write_text('#include "pmsis.h"\n')
    (stub / "bsp" / "fs" / "hostfs.h").write_text('#include "pmsis.h"\n')
    bin_dir = tmp_path / "toolchain" / "bin"
    bin_dir.mkdir(parents=True)
    gcc = bin_dir / "riscv32-unknown-elf-gcc"   # PULP GCC stand-in: rv32imf with picolibc headers and the stub
    gcc.write_text(f'#!/bin/sh\nexec {RISCV_GCC} -march=rv32imf -mabi=ilp32f --specs=picolibc.specs -I{stub} "$@"\n')
    gcc.chmod(gcc.stat().st_mode | stat.S_IEXEC)
    for var, value in (("PULP_SDK_HOME", sdk), ("RULES_DIR", rules), ("TARGET_CHIP", "SIRACUSA"),
                       ("PULP_RISCV_GCC_TOOLCHAIN", bin_dir.parent)):
        monkeypatch.setenv(var, str(value))
    out = tmp_path / "out"
    exe = build_elf(lowered[1], out, board="siracusa")
    assert exe == out / "firmware.elf" and exe.exists()
    makefile = (out / "Makefile").read_text()
    for name in ("program.c", "src/ef_linear.c", "src/ef_hal_gemm.c", "src/ef_hal_lora.c", "src/ef_hal_pulp.c",
                 "src/main.c", "include $(RULES_DIR)/pmsis_rules.mk"):
        assert name in makefile
    assert "ef_hal_generic" not in makefile
    assert any(f"{kernel}(" in (out / "program.c").read_text() for kernel in REDMULE_KERNELS.values())
    assert build_elf(lowered[1], out, board="siracusa") == exe   # same content: reused, make not run again


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
