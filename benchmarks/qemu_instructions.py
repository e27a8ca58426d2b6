"""Instructions per training step on QEMU (rv32imf) for deep-ae LoRA, the kernel library against a naive build,
and the time to compile and build the firmware.

Builds of the same program (compile_model("deep-ae", "lora", batch=8)), all for board rv32-qemu:

    kernels    the kernel library as shipped: GEMMs in i-k-j order (dot products when B is transposed)
    naive      the same sources with -DEF_NAIVE_GEMM: GEMMs as the textbook i-j-k triple loop (no blocking, no
               loop-order care, transposes resolved in the inner loop, the sum kept in Y); everything else identical
    hal        the program lowered for siracusa: its RedMulE GEMM steps go through ef_hal_gemm on the generic HAL
               (memcpy "DMA" into an L1 pool, a C loop standing in for RedMulE); for reference only

Instructions are counted two ways:

    minstret   the firmware reads minstret around each step (phase.run() only); exact under -icount shift=0
    plugin     a TCG plugin (benchmarks/qemu_insn_plugin.c) counting every executed guest instruction of a run;
               per step = (count of a 1+S-step run - count of a 1-step run) / S, so it includes each step's batch
               read and record write. Built in a temp dir when QEMU's qemu-plugin.h is found
               ($EF_QEMU_PLUGIN_INCLUDE, /usr/include, /usr/local/include); Debian ships none, so without it only
               minstret is reported.

Every build must produce the same losses (the GEMMs do the same sums in the same order), checked before
anything is written; the kernels build is also checked against NumpyDevice.

Compile time: compile_model, then build_elf for rv32-qemu with an empty object cache (cold: the kernel library,
the HAL and the firmware entry are compiled too) and again with the cache filled (warm: program.c only).

    python benchmarks/qemu_instructions.py                 # writes benchmarks/results/qemu_instructions.json
    python benchmarks/qemu_instructions.py --steps 2 --out /tmp/q.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler.codegen import build_elf, read_manifest  # noqa: E402
from compiler.pipeline import compile_model  # noqa: E402
from compiler.program import Program  # noqa: E402
from compiler.targets import load_target, lower_to_target  # noqa: E402
from device_runtime import NumpyDevice  # noqa: E402
from device_runtime.qemu import (MODE_TRAIN, QEMU, decode_out, encode_batches, encode_params)  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "qemu_instructions.json"
PLUGIN_SOURCE = ROOT / "benchmarks" / "qemu_insn_plugin.c"
MODEL, TUNING, BATCH = "deep-ae", "lora", 8
STEPS = 4
SEED = 0
RUN_TIMEOUT_S = 600.0
PARITY_RTOL = 1e-4
NAIVE_FLAGS = ("-DEF_NAIVE_GEMM",)
PLUGIN_HEADER_DIRS = ("/usr/include", "/usr/include/qemu", "/usr/local/include", "/usr/local/include/qemu")


# ---- the firmware runs ---------------------------------------------------------------------------------------
def param_region(program: Program) -> np.ndarray:
    """The parameter region as QemuDevice lays it out: every persistent tensor's initial value at its offset."""
    region = np.zeros(program.params_bytes, np.uint8)
    for name, offset in program.param_offsets.items():
        if name in program.values:
            info = program.tensors[name]
            data = np.ascontiguousarray(np.asarray(program.values[name]).astype(info.dtype)).view(np.uint8).ravel()
            region[offset:offset + info.nbytes] = data
    return region


def batches_for(program: Program, steps: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    rng = np.random.default_rng(SEED)
    x_info = program.tensors[program.input]
    if program.label:
        raise SystemExit(f"{program.model}: this benchmark feeds autoencoders (the loss targets the input)")
    return [(rng.standard_normal(x_info.shape).astype(np.float32), None) for _ in range(steps)]


def run_qemu(exe: Path, program: Program, fingerprint: int, steps: int, plugin: Path | None, work: Path):
    """One train job of ``steps`` steps; returns (OutFile, plugin count or None)."""
    work.mkdir(parents=True, exist_ok=True)
    x_bytes = program.tensors[program.input].nbytes
    (work / "params.bin").write_bytes(encode_params(param_region(program), fingerprint))
    (work / "batches.bin").write_bytes(encode_batches(MODE_TRAIN, fingerprint, batches_for(program, steps), x_bytes, 0))
    (work / "out.bin").unlink(missing_ok=True)
    memory_mib = (read_manifest(exe).get("memory") or {}).get("memory_mib", 128)
    cmd = [QEMU, "-machine", "virt", "-cpu", "rv32", "-m", f"{memory_mib}M", "-bios", "none", "-nographic",
           "-monitor", "none", "-semihosting-config", "enable=on,target=native", "-icount", "shift=0"]
    count_file = work / "insn.txt"
    if plugin is not None:
        count_file.unlink(missing_ok=True)
        cmd += ["-plugin", f"{plugin},out={count_file}"]
    proc = subprocess.run(cmd + ["-kernel", str(exe)], cwd=work, capture_output=True, timeout=RUN_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"{exe}: exit {proc.returncode}: {(proc.stdout + proc.stderr).decode(errors='replace')[-400:]}")
    out = decode_out((work / "out.bin").read_bytes(), MODE_TRAIN, fingerprint, steps, program.params_bytes, 0)
    return out, (int(count_file.read_text()) if plugin is not None else None)


# ---- the plugin --------------------------------------------------------------------------------------------------
def find_plugin_header() -> Path | None:
    dirs = [os.environ["EF_QEMU_PLUGIN_INCLUDE"]] if os.environ.get("EF_QEMU_PLUGIN_INCLUDE") else []
    for d in [*dirs, *PLUGIN_HEADER_DIRS]:
        if (Path(d) / "qemu-plugin.h").is_file():
            return Path(d)
    return None


def build_plugin(work: Path) -> tuple[Path | None, dict]:
    header = find_plugin_header()
    if header is None:
        return None, {"available": False, "reason": "qemu-plugin.h not found: Debian ships no QEMU plugin header; set "
                                                    "EF_QEMU_PLUGIN_INCLUDE to a directory holding QEMU 7.2's "
                                                    "include/qemu/qemu-plugin.h"}
    lib = work / "libefinsn.so"
    proc = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", f"-I{header}", str(PLUGIN_SOURCE), "-o", str(lib)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None, {"available": False, "reason": f"plugin build failed: {proc.stderr.strip()[:300]}"}
    return lib, {"available": True, "header_dir": str(header)}


# ---- the benchmark ---------------------------------------------------------------------------------------------
def measure(name: str, program: Program, exe: Path, steps: int, plugin: Path | None, work: Path) -> dict:
    fingerprint = read_manifest(exe)["fingerprint"]
    start = time.perf_counter()
    out, total = run_qemu(exe, program, fingerprint, steps + 1, plugin, work / f"{name}-long")
    wall = time.perf_counter() - start
    per_step = out.instructions[1:].astype(np.int64)     # steps 1..S: the span the plugin's difference covers
    row = {"instructions_per_step_minstret": int(per_step.mean()),
           "minstret_per_step_all": [int(v) for v in out.instructions],
           "qemu_wall_s": round(wall, 3), "elf_bytes": exe.stat().st_size, "losses": [float(v) for v in out.losses]}
    if plugin is not None:
        _, one = run_qemu(exe, program, fingerprint, 1, plugin, work / f"{name}-one")
        row["instructions_per_step_plugin"] = round((total - one) / steps)
        row["plugin_total_instructions"] = {"steps": steps + 1, "count": total, "one_step_count": one}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="measured steps per run (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if shutil.which(QEMU) is None:
        raise SystemExit(f"{QEMU} not found: install the Debian package qemu-system-misc")

    with tempfile.TemporaryDirectory(prefix="ef-qemu-bench-") as tmp:
        work = Path(tmp)
        os.environ["EDGEFLEET_FIRMWARE_CACHE"] = str(work / "cache")    # cold: an empty object cache
        t0 = time.perf_counter()
        program = compile_model(MODEL, tuning=TUNING, batch=BATCH)
        t1 = time.perf_counter()
        builds = {"kernels": (program, build_elf(program, work / "kernels", reuse=False))}
        t2 = time.perf_counter()
        warm = build_elf(program, work / "kernels-warm", reuse=False)
        t3 = time.perf_counter()
        builds["naive"] = (program, build_elf(program, work / "naive", extra_cflags=NAIVE_FLAGS))
        lowered = lower_to_target(program, load_target("siracusa"))
        builds["hal"] = (lowered, build_elf(lowered, work / "hal"))
        assert warm.exists()

        plugin, plugin_info = build_plugin(work)
        rows = {name: measure(name, prog, exe, args.steps, plugin, work) for name, (prog, exe) in builds.items()}

    reference = NumpyDevice(program).train(np.stack([x for x, _ in batches_for(program, args.steps + 1)])
                                           .reshape(-1, *program.tensors[program.input].shape[1:]), None,
                                           args.steps + 1)
    for name, row in rows.items():
        if row["losses"] != rows["kernels"]["losses"]:
            raise SystemExit(f"{name}: losses differ from the kernels build: {row['losses']} vs "
                             f"{rows['kernels']['losses']}")
    err = float(np.max(np.abs(np.array(rows["kernels"]["losses"]) - reference.losses)) / np.max(np.abs(reference.losses)))
    if err > PARITY_RTOL:
        raise SystemExit(f"the firmware's losses differ from NumpyDevice by {err:.2e} (relative)")

    kernels, naive = rows["kernels"], rows["naive"]
    result = {
        "model": MODEL, "tuning": TUNING, "batch": BATCH, "steps_measured": args.steps,
        "board": "rv32-qemu", "qemu": subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
        .splitlines()[0], "host": platform.platform(), "python": platform.python_version(),
        "counting": {"minstret": "firmware reads minstret around phase.run(), QEMU -icount shift=0 (exact)",
                     "plugin": plugin_info},
        "builds": rows,
        "ratio_naive_over_kernels_minstret": round(naive["instructions_per_step_minstret"]
                                                   / kernels["instructions_per_step_minstret"], 3),
        "ratio_hal_over_kernels_minstret": round(rows["hal"]["instructions_per_step_minstret"]
                                                 / kernels["instructions_per_step_minstret"], 3),
        "losses_equal_across_builds": True, "kernels_vs_numpy_loss_rel_err": err,
        "compile_seconds": {"compile_model": round(t1 - t0, 3), "build_elf_cold": round(t2 - t1, 3),
                            "build_elf_warm": round(t3 - t2, 3), "compile_plus_cold_build": round(t2 - t0, 3)},
    }
    if plugin is not None:
        result["ratio_naive_over_kernels_plugin"] = round(naive["instructions_per_step_plugin"]
                                                          / kernels["instructions_per_step_plugin"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, row in rows.items():
        plug = row.get("instructions_per_step_plugin")
        print(f"{name:8s} {row['instructions_per_step_minstret']:>13,} instructions/step (minstret)"
              + (f"  {plug:>13,} (plugin)" if plug is not None else ""))
    print(f"naive / kernels: {result['ratio_naive_over_kernels_minstret']}x;  compile_model "
          f"{result['compile_seconds']['compile_model']} s + build_elf cold {result['compile_seconds']['build_elf_cold']}"
          f" s (warm {result['compile_seconds']['build_elf_warm']} s)\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
