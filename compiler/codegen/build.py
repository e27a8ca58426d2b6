"""Build a program's firmware: generated program.c + the kernel library + a HAL + the board's firmware entry.

Boards are a data table. ``rv32-qemu`` cross-compiles for QEMU virt (rv32imf, picolibc, semihosting) with a
memory map sized to the program; ``host`` compiles the same sources with the host gcc (tests, debugging); both
link the generic HAL (hal/generic). ``siracusa`` links the pulp HAL (hal/pulp) bare metal for Siracusa's FC and cluster
and is built with zig's clang (``compiler/codegen/siracusa.py``).
A build directory holds program.c, the executable and firmware.json (board, memory map, fingerprint, the
content key); ``build_elf`` reuses it when the key matches.

The object cache (the kernel library, HAL and firmware entry compiled once per board, sources and flags) is
private: its directory is created 0700 and refused when another user owns it or can write to it; each cached
object set is keyed by the hash of its sources and flags and carries objects.json with every object's
SHA-256, checked before the objects are linked (an object that does not match is rebuilt, never linked).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from compiler.ir import CompileError
from compiler.private_dir import PrivateDirError, private_dir
from compiler.program import Program
from compiler.codegen.emit import generate

CODEGEN_DIR = Path(__file__).resolve().parent
KERNEL_DIR = CODEGEN_DIR / "kernels"
BOARD_DIR = CODEGEN_DIR / "boards"
FIRMWARE_MAIN = BOARD_DIR / "main.c"
HAL_DIR = CODEGEN_DIR / "hal"
GENERIC_L1_BYTES = 64 * 1024   # the generic HAL's static L1 pool (hal/generic: EF_HAL_L1_BYTES)
BUILD_TIMEOUT_S = 300.0
MANIFEST = "firmware.json"
OBJECTS_MANIFEST = "objects.json"
COMMON_CFLAGS = ("-std=gnu11", "-Wall")

MIB = 1 << 20
KIB = 1 << 10
RISCV_PACKAGES = "gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf"
PULP_GCC = "riscv32-unknown-elf-gcc"
PICOLIBC_SPECS = Path("/usr/lib/picolibc/riscv64-unknown-elf/picolibc.specs")
PICOLIBC_INCLUDE = Path("/usr/lib/picolibc/riscv64-unknown-elf/include")
ZIG_TARGET = "riscv32-freestanding-none"
ZFINX_CPU = "generic_rv32+m+c+zfinx+zicsr"
ZFINX_CFLAGS = ("-target", ZIG_TARGET, f"-mcpu={ZFINX_CPU}", "-O2", "-ffp-contract=off",
                "-isystem", str(PICOLIBC_INCLUDE))


def zig_cc() -> list[str]:
    """zig's C compiler from the PyPI package ziglang."""
    try:
        import ziglang  # noqa: F401  (zig runs as ``python -m ziglang``)
    except ImportError:
        raise CompileError("building for Zfinx needs the PyPI package ziglang (pip install ziglang)") from None
    return [sys.executable, "-m", "ziglang", "cc"]


@dataclass(frozen=True)
class MemoryMap:
    """Where the linker puts the firmware (QEMU virt has RAM from 0x80000000)."""
    flash_origin: int
    flash_bytes: int
    ram_origin: int
    ram_bytes: int
    stack_bytes: int

    @property
    def memory_mib(self) -> int:
        """RAM QEMU must give the machine (-m) to hold flash and RAM."""
        end = self.ram_origin + self.ram_bytes - self.flash_origin
        return max(128, -(-end // MIB))

    def linker_flags(self) -> list[str]:
        return [f"-Wl,--defsym=__flash=0x{self.flash_origin:08x}", f"-Wl,--defsym=__flash_size=0x{self.flash_bytes:x}",
                f"-Wl,--defsym=__ram=0x{self.ram_origin:08x}", f"-Wl,--defsym=__ram_size=0x{self.ram_bytes:x}",
                f"-Wl,--defsym=__stack_size=0x{self.stack_bytes:x}"]


@dataclass(frozen=True)
class Board:
    name: str
    cc: str
    cflags: tuple[str, ...]
    folder: str                 # boards/<folder>/ef_board.h
    executable: str
    packages: str               # what to install when ``cc`` is missing
    bare_metal: bool            # needs a memory map
    ram_origin: int = 0x80000000
    flash_bytes: int = 2 * MIB  # code, read-only data and .data images (the kernels take ~40 KiB)
    stack_bytes: int = 64 * KIB
    heap_bytes: int = 64 * KIB  # libc I/O; the kernels never allocate
    max_ram_bytes: int = 1024 * MIB
    hal: str = "generic"        # hal/<hal>/: the HAL implementation linked in
    main: str = "main.c"        # the firmware entry, relative to boards/
    builder: str = "gcc"        # "gcc": compile and link here; "ziglang": compiler/codegen/siracusa.py;
                                # "pulp-sdk": the PULP SDK's make rules (compiler/codegen/pulp_sdk.py)
    extra_sources: tuple[str, ...] = ()   # more firmware sources, relative to boards/ (their folders are included)
    compile_with: str = ""      # "zig": objects by zig's clang with ``cflags`` (Zfinx), linked by ``cc``
    link_flags: tuple[str, ...] = ()   # the link's flags when compile_with is set (else ``cflags``)
    qemu_cpu: str = "rv32"      # QEMU's -cpu for boards that run on qemu-system-riscv32

    @property
    def extra_dirs(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys((BOARD_DIR / s).parent for s in self.extra_sources))

    @property
    def include_dirs(self) -> tuple[Path, ...]:
        return KERNEL_DIR, BOARD_DIR / self.folder, HAL_DIR, HAL_DIR / self.hal, *self.extra_dirs

    @property
    def sources(self) -> list[Path]:
        """Everything compiled besides program.c: kernels, the HAL (the kernels written against it and its
        implementation), main."""
        return kernel_sources() + hal_sources() + [*sorted((HAL_DIR / self.hal).glob("*.c")), BOARD_DIR / self.main,
                                                   *(BOARD_DIR / s for s in self.extra_sources)]

    @property
    def headers(self) -> list[Path]:
        return (sorted(KERNEL_DIR.glob("*.h")) + sorted(HAL_DIR.glob("*.h")) + sorted((HAL_DIR / self.hal).glob("*.h"))
                + sorted((BOARD_DIR / self.folder).glob("*.h")) + [h for d in self.extra_dirs for h in sorted(d.glob("*.h"))])


BOARDS: dict[str, Board] = {
    "rv32-qemu": Board("rv32-qemu", "riscv64-unknown-elf-gcc",
                       ("-march=rv32imf", "-mabi=ilp32f", "-O2", "--specs=picolibc.specs", "--oslib=semihost",
                        "--crt0=semihost"),
                       "rv32_qemu", "firmware.elf", RISCV_PACKAGES, True),
    # The cluster cores' ISA (rv32imc + Zfinx: floats in the integer registers), compiled by zig's clang and
    # linked with picolibc's rv32imac/ilp32 multilib, run by QEMU with zfinx=true: the siracusa kernels in CI. The
    # generic HAL runs a team of 8 "cores" in turn, so the HAL kernels split their work as on the cluster.
    "rv32-zfinx-qemu": Board("rv32-zfinx-qemu", "riscv64-unknown-elf-gcc", (*ZFINX_CFLAGS, "-DEF_HAL_GENERIC_CORES=8"),
                             "rv32_qemu", "firmware.elf",
                             RISCV_PACKAGES + " and the PyPI package ziglang", True, compile_with="zig",
                             link_flags=("-march=rv32imac", "-mabi=ilp32", "--specs=picolibc.specs",
                                         "--oslib=semihost", "--crt0=semihost"),
                             qemu_cpu="rv32,f=false,d=false,zfinx=true"),
    "host": Board("host", "gcc", ("-O2",), "host", "firmware", "gcc", False),
    # Bare metal FC + cluster, built with zig's clang (compiler/codegen/siracusa.py), run by GVSoC.
    "siracusa": Board("siracusa", "ziglang", ("-O2",), "siracusa", "firmware.elf",
                      "the PyPI package ziglang, gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf", False,
                      hal="pulp", main="siracusa/main.c", builder="ziglang"),
    # Boards on a serial line (docs/boards.md): the serial protocol's command loop instead of the job files.
    "rv32-qemu-serial": Board("rv32-qemu-serial", "riscv64-unknown-elf-gcc",
                              ("-march=rv32imf", "-mabi=ilp32f", "-O2", "--specs=picolibc.specs", "--oslib=semihost",
                               "--crt0=semihost"),
                              "rv32_qemu", "firmware.elf", RISCV_PACKAGES, True, main="serial/main.c",
                              extra_sources=("serial/ef_serial.c", "serial/uart_16550.c")),
    # Built by the PULP SDK (compiler/codegen/pulp_sdk.py) on the PULP runtime: the pmsis HAL (hal/pulp_pmsis).
    "siracusa-serial": Board("siracusa-serial", PULP_GCC, ("-O3",), "siracusa_sdk", "firmware.elf",
                             "the PULP SDK (pulp-platform/pulp-sdk) and PULP GCC", False, hal="pulp_pmsis",
                             main="serial/main.c", builder="pulp-sdk",
                             extra_sources=("serial/ef_serial.c", "serial/uart_pulp.c")),
}
# `edgefleet compile --target NAME --build`: the board a built-in target builds for.
TARGET_BOARDS = {"rv32-qemu": "rv32-qemu", "siracusa": "siracusa", "siracusa-small-l2": "siracusa"}


def board_for_target(target: str) -> str:
    return TARGET_BOARDS.get(target, target)


def get_board(name: str) -> Board:
    """A board by name; a built-in target's name gives the board it builds for (siracusa-small-l2 → siracusa)."""
    board = BOARDS.get(name) or BOARDS.get(board_for_target(name))
    if board is None:
        raise CompileError(f"unknown board {name!r}; boards: {', '.join(BOARDS)}")
    return board


def memory_map(program: Program, board: Board) -> MemoryMap | None:
    """Flash for the code, then RAM for .data/.bss (the parameter region and the arena), heap and stack."""
    if not board.bare_metal:
        return None
    arena = max(program.train.arena_bytes, program.evaluate.arena_bytes)
    hal = GENERIC_L1_BYTES if board.hal == "generic" else 0
    need = program.params_bytes + arena + hal + board.stack_bytes + board.heap_bytes + 64 * KIB
    ram = -(-need // MIB) * MIB
    if ram > board.max_ram_bytes:
        raise CompileError(f"program {program.model!r} needs {ram // MIB} MiB of RAM on {board.name} (parameters "
                           f"{program.params_bytes} B, arena {arena} B); the board has at most "
                           f"{board.max_ram_bytes // MIB} MiB")
    return MemoryMap(board.ram_origin, board.flash_bytes, board.ram_origin + board.flash_bytes, ram,
                     board.stack_bytes)


def kernel_sources() -> list[Path]:
    return sorted(KERNEL_DIR.glob("*.c"))


def hal_sources() -> list[Path]:
    """The kernels written once against ef_hal.h (hal/*.c: the tiled GEMM, the LoRA layer), for every HAL."""
    return sorted(HAL_DIR.glob("*.c"))


def _sources_digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def firmware_key(source: str, board: Board, memory: MemoryMap | None, extra_cflags: Sequence[str] = ()) -> str:
    """Content hash of everything that goes into the executable."""
    h = hashlib.sha256()
    for part in (source, _sources_digest(board.sources + board.headers), json.dumps(asdict(board), sort_keys=True),
                 json.dumps(memory and asdict(memory), sort_keys=True), " ".join(extra_cflags)):
        h.update(part.encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """Where content-addressed build products are kept, private to this user (0700, owner checked):
    $EDGEFLEET_FIRMWARE_CACHE, else $EDGEFLEET_CACHE/firmware (the project's cache root), else
    $XDG_CACHE_HOME/edgefleet/firmware (~/.cache/edgefleet/firmware)."""
    if "EDGEFLEET_FIRMWARE_CACHE" in os.environ:
        path = Path(os.environ["EDGEFLEET_FIRMWARE_CACHE"])
    elif "EDGEFLEET_CACHE" in os.environ:
        path = Path(os.environ["EDGEFLEET_CACHE"]) / "firmware"
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgefleet" / "firmware"
    try:
        return private_dir(path, "firmware cache")
    except PrivateDirError as error:
        raise CompileError(str(error)) from None


def _include_flags(board: Board) -> list[str]:
    return [f"-I{d}" for d in board.include_dirs]


def _library_objects(cc: str, board: Board, timeout_s: float, extra_cflags: Sequence[str] = ()) -> list[Path]:
    """The kernel library, the HAL and the firmware entry compiled once per board and source content, then
    reused."""
    sources = board.sources
    flags = [*board.cflags, *extra_cflags]
    key = hashlib.sha256((_sources_digest(sources + board.headers) + cc + " ".join(flags)).encode()).hexdigest()
    root = private_dir(default_cache_dir() / "objects", "firmware cache")
    cache = root / f"{board.name}-{key[:16]}"
    objects = [cache / f"{src.stem}.o" for src in sources]   # stems are unique across kernels, hal, boards
    if verified_objects(cache, key, objects):
        return objects
    shutil.rmtree(cache, ignore_errors=True)  # incomplete or not what we built: rebuild it whole
    work = Path(tempfile.mkdtemp(prefix=f"{cache.name}.tmp-", dir=root))
    try:
        what = f"building the kernel library for {board.name}"
        if board.compile_with == "zig":
            compile_each(sources, work, [*flags, *COMMON_CFLAGS, *_include_flags(board)], what, timeout_s)
        else:
            cmd = [cc, *flags, *COMMON_CFLAGS, *_include_flags(board), "-c", *map(str, sources)]
            _compile(cmd, work / "build.log", what, timeout_s, cwd=work)
        digests = {o.name: _file_digest(work / o.name) for o in objects}
        (work / OBJECTS_MANIFEST).write_text(json.dumps({"key": key, "objects": digests}, indent=1))
        try:
            os.replace(work, cache)
        except OSError:  # another build got there first (same content)
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return objects


def verified_objects(cache: Path, key: str, objects: Sequence[Path]) -> bool:
    """The cached objects are the ones built for ``key``: objects.json names the key and every object's SHA-256
    matches. Anything else (missing, planted, truncated, another key) → False (the caller rebuilds)."""
    try:
        manifest = json.loads((cache / OBJECTS_MANIFEST).read_text())
        return (manifest.get("key") == key and set(manifest["objects"]) == {o.name for o in objects}
                and all(_file_digest(o) == manifest["objects"][o.name] for o in objects))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compile_each(sources: Sequence[Path], out: Path, flags: Sequence[str], what: str, timeout_s: float) -> None:
    """zig cc -c, one source per call (given several, it compiles only the first), two at a time."""
    zig = zig_cc()

    def one(src: Path) -> None:
        _compile([*zig, *flags, "-c", str(src), "-o", str(out / f"{src.stem}.o")], out / f"{src.stem}.log", what,
                 timeout_s)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(one, sources))


def _require_toolchain(board: Board) -> str:
    cc = shutil.which(board.cc)
    if cc is None:
        raise CompileError(f"{board.cc} not found: install the Debian packages {board.packages}")
    if (board.name.startswith("rv32-qemu") or board.name == "rv32-zfinx-qemu") and not PICOLIBC_SPECS.exists():
        raise CompileError(f"picolibc for riscv64-unknown-elf not found ({PICOLIBC_SPECS}): install the Debian "
                           f"packages {board.packages}")
    return cc


def _compile(cmd: list[str], log: Path, what: str, timeout_s: float, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise CompileError(f"{what}: the compiler did not finish within {timeout_s:g} s") from None
    log.write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if "error" in ln or "overflowed" in ln]
        cause = (lines or proc.stderr.strip().splitlines() or ["no output"])[0].strip()
        if "overflowed" in cause:
            cause = f"the program does not fit the memory map ({cause})"
        raise CompileError(f"{what} failed: {cause} (full log: {log})")


def build_elf(program: Program, out_dir: str | os.PathLike, board: str = "rv32-qemu", *,
              timeout_s: float = BUILD_TIMEOUT_S, reuse: bool = True, extra_cflags: Sequence[str] = ()) -> Path:
    """Compile ``program`` for ``board`` into ``out_dir``; returns the executable (an ELF for rv32-qemu).

    ``extra_cflags`` go to every compile (e.g. ``-DEF_NAIVE_GEMM`` for the benchmark's baseline); they are part of
    the content key."""
    spec = get_board(board)
    if spec.builder == "ziglang":
        from compiler.codegen.siracusa import build_siracusa
        return build_siracusa(program, out_dir, spec, timeout_s=timeout_s, reuse=reuse, extra_cflags=extra_cflags)
    if spec.builder == "pulp-sdk":
        from compiler.codegen.pulp_sdk import build_pulp_sdk
        return build_pulp_sdk(program, out_dir, spec, timeout_s=timeout_s, reuse=reuse, extra_cflags=extra_cflags)
    source, mark = generate(program)
    memory = memory_map(program, spec)
    key = firmware_key(source, spec, memory, extra_cflags)
    out = Path(out_dir)
    exe = out / spec.executable
    if reuse and reusable(out, spec.executable, key):
        return exe
    cc = _require_toolchain(spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "program.c").write_text(source)
    tmp = out / f"{spec.executable}.tmp-{os.getpid()}"
    objects = _library_objects(cc, spec, timeout_s, extra_cflags)
    if spec.compile_with == "zig":
        compile_each([out / "program.c"], out, [*spec.cflags, *extra_cflags, *COMMON_CFLAGS, *_include_flags(spec)],
                     f"building {program.model!r} for {spec.name}", timeout_s)
        cmd = [cc, *spec.link_flags, *(memory.linker_flags() if memory else []), str(out / "program.o"),
               *map(str, objects), "-lm", "-o", str(tmp)]
    else:
        cmd = [cc, *spec.cflags, *extra_cflags, *COMMON_CFLAGS, *_include_flags(spec),
               *(memory.linker_flags() if memory else []), str(out / "program.c"), *map(str, objects), "-lm",
               "-o", str(tmp)]
    _compile(cmd, out / "build.log", f"building {program.model!r} for {spec.name}", timeout_s)
    os.replace(tmp, exe)
    info = {"board": spec.name, "model": program.model, "fingerprint": mark, "key": key,
            "executable": spec.executable, "memory": memory and {**asdict(memory), "memory_mib": memory.memory_mib}}
    write_manifest(out, info)
    return exe


def write_manifest(out: Path, info: dict) -> None:
    """firmware.json for the executable ``info["executable"]`` in ``out``, with its SHA-256 (``reusable``)."""
    info = {**info, "sha256": _file_digest(out / info["executable"])}
    tmp_manifest = out / f"{MANIFEST}.tmp-{os.getpid()}"
    tmp_manifest.write_text(json.dumps(info, indent=1))
    os.replace(tmp_manifest, out / MANIFEST)


def reusable(out: Path, executable: str, key: str) -> bool:
    """``out`` holds the executable built from the same content key (its SHA-256 as recorded)."""
    try:
        info = json.loads((out / MANIFEST).read_text())
        return info.get("key") == key and info.get("sha256") == _file_digest(out / executable)
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def read_manifest(exe: str | os.PathLike) -> dict:
    return json.loads((Path(exe).parent / MANIFEST).read_text())


def build_kernel_library(out_dir: str | os.PathLike, cc: str = "gcc", *, timeout_s: float = BUILD_TIMEOUT_S) -> Path:
    """The kernel library as a host shared object (for tests that call kernels through ctypes)."""
    if shutil.which(cc) is None:
        raise CompileError(f"{cc} not found: install the Debian package gcc")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lib = out / f"libef_kernels-{_sources_digest(kernel_sources())[:12]}.so"
    if not lib.exists():
        tmp = out / f"{lib.name}.tmp-{os.getpid()}"
        cmd = [cc, "-O2", *COMMON_CFLAGS, "-fPIC", "-shared", f"-I{KERNEL_DIR}",
               *map(str, kernel_sources()), "-lm", "-o", str(tmp)]
        _compile(cmd, out / "kernels-build.log", "building the kernel library", timeout_s)
        os.replace(tmp, lib)
    return lib


def build_hal_library(out_dir: str | os.PathLike, cc: str = "gcc", *, defines: Sequence[str] = (),
                      timeout_s: float = BUILD_TIMEOUT_S) -> Path:
    """The kernels + the generic HAL + the HAL kernels as a host shared object (tests call them through ctypes).
    ``defines`` (``NAME=VALUE``) configure the generic HAL, e.g. ``EF_HAL_L1_BYTES=4096`` to force small tiles."""
    if shutil.which(cc) is None:
        raise CompileError(f"{cc} not found: install the Debian package gcc")
    generic = get_board("host")
    sources = kernel_sources() + hal_sources() + sorted((HAL_DIR / "generic").glob("*.c"))
    flags = [f"-D{d}" for d in defines]
    digest = hashlib.sha256((_sources_digest(sources + generic.headers) + " ".join(flags)).encode()).hexdigest()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lib = out / f"libef_hal-{digest[:12]}.so"
    if not lib.exists():
        tmp = out / f"{lib.name}.tmp-{os.getpid()}"
        cmd = [cc, "-O2", *COMMON_CFLAGS, *flags, "-fPIC", "-shared", f"-I{KERNEL_DIR}", f"-I{HAL_DIR}",
               f"-I{HAL_DIR / 'generic'}", *map(str, sources), "-lm", "-o", str(tmp)]
        _compile(cmd, out / "hal-build.log", "building the generic HAL library", timeout_s)
        os.replace(tmp, lib)
    return lib
