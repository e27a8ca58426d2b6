"""Build a program's firmware: generated program.c + the kernel library + the board's firmware entry.

Boards are a data table. ``rv32-qemu`` cross-compiles for QEMU virt (rv32imf, picolibc, semihosting) with a
memory map sized to the program; ``host`` compiles the same sources with the host gcc (tests, debugging).
A build directory holds program.c, the executable and firmware.json (board, memory map, fingerprint, the
content key); ``build_elf`` reuses it when the key matches.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from compiler.ir import CompileError
from compiler.program import Program
from compiler.codegen.emit import generate

CODEGEN_DIR = Path(__file__).resolve().parent
KERNEL_DIR = CODEGEN_DIR / "kernels"
BOARD_DIR = CODEGEN_DIR / "boards"
FIRMWARE_MAIN = BOARD_DIR / "main.c"
BUILD_TIMEOUT_S = 300.0
MANIFEST = "firmware.json"
COMMON_CFLAGS = ("-std=gnu11", "-Wall")

MIB = 1 << 20
KIB = 1 << 10
RISCV_PACKAGES = "gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf"
PICOLIBC_SPECS = Path("/usr/lib/picolibc/riscv64-unknown-elf/picolibc.specs")


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


BOARDS: dict[str, Board] = {
    "rv32-qemu": Board("rv32-qemu", "riscv64-unknown-elf-gcc",
                       ("-march=rv32imf", "-mabi=ilp32f", "-O2", "--specs=picolibc.specs", "--oslib=semihost",
                        "--crt0=semihost"),
                       "rv32_qemu", "firmware.elf", RISCV_PACKAGES, True),
    "host": Board("host", "gcc", ("-O2",), "host", "firmware", "gcc", False),
}


def get_board(name: str) -> Board:
    try:
        return BOARDS[name]
    except KeyError:
        raise CompileError(f"unknown board {name!r}; boards: {', '.join(BOARDS)}") from None


def memory_map(program: Program, board: Board) -> MemoryMap | None:
    """Flash for the code, then RAM for .data/.bss (the parameter region and the arena), heap and stack."""
    if not board.bare_metal:
        return None
    arena = max(program.train.arena_bytes, program.evaluate.arena_bytes)
    need = program.params_bytes + arena + board.stack_bytes + board.heap_bytes + 64 * KIB
    ram = -(-need // MIB) * MIB
    if ram > board.max_ram_bytes:
        raise CompileError(f"program {program.model!r} needs {ram // MIB} MiB of RAM on {board.name} (parameters "
                           f"{program.params_bytes} B, arena {arena} B); the board has at most "
                           f"{board.max_ram_bytes // MIB} MiB")
    return MemoryMap(board.ram_origin, board.flash_bytes, board.ram_origin + board.flash_bytes, ram,
                     board.stack_bytes)


def kernel_sources() -> list[Path]:
    return sorted(KERNEL_DIR.glob("*.c"))


def _sources_digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def firmware_key(source: str, board: Board, memory: MemoryMap | None) -> str:
    """Content hash of everything that goes into the executable."""
    headers = sorted(KERNEL_DIR.glob("*.h")) + [BOARD_DIR / board.folder / "ef_board.h"]
    h = hashlib.sha256()
    for part in (source, _sources_digest(kernel_sources() + headers + [FIRMWARE_MAIN]),
                 json.dumps(asdict(board), sort_keys=True), json.dumps(memory and asdict(memory), sort_keys=True)):
        h.update(part.encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """Where content-addressed build products are shared: $EDGEFLEET_FIRMWARE_CACHE, else
    $EDGEFLEET_CACHE/firmware (the project's cache root), else <tmp>/edgefleet-firmware-<uid>."""
    if "EDGEFLEET_FIRMWARE_CACHE" in os.environ:
        return Path(os.environ["EDGEFLEET_FIRMWARE_CACHE"])
    if "EDGEFLEET_CACHE" in os.environ:
        return Path(os.environ["EDGEFLEET_CACHE"]) / "firmware"
    return Path(tempfile.gettempdir()) / f"edgefleet-firmware-{os.getuid()}"


def _library_objects(cc: str, board: Board, timeout_s: float) -> list[Path]:
    """The kernel library and the firmware entry compiled once per board and source content, then reused."""
    sources = kernel_sources() + [FIRMWARE_MAIN]
    headers = sorted(KERNEL_DIR.glob("*.h")) + [BOARD_DIR / board.folder / "ef_board.h"]
    key = hashlib.sha256((_sources_digest(sources + headers) + cc + " ".join(board.cflags)).encode()).hexdigest()
    cache = default_cache_dir() / "objects" / f"{board.name}-{key[:16]}"
    objects = [cache / f"{src.stem}.o" for src in sources]
    if all(o.exists() for o in objects):
        return objects
    cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cache, ignore_errors=True)  # incomplete (someone removed files): rebuild it whole
    work = Path(tempfile.mkdtemp(prefix=f"{cache.name}.tmp-", dir=cache.parent))
    try:
        cmd = [cc, *board.cflags, *COMMON_CFLAGS, f"-I{KERNEL_DIR}", f"-I{BOARD_DIR / board.folder}", "-c",
               *map(str, sources)]
        _compile(cmd, work / "build.log", f"building the kernel library for {board.name}", timeout_s, cwd=work)
        try:
            os.replace(work, cache)
        except OSError:  # another build got there first (same content)
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return objects


def _require_toolchain(board: Board) -> str:
    cc = shutil.which(board.cc)
    if cc is None:
        raise CompileError(f"{board.cc} not found: install the Debian packages {board.packages}")
    if board.name == "rv32-qemu" and not PICOLIBC_SPECS.exists():
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
              timeout_s: float = BUILD_TIMEOUT_S, reuse: bool = True) -> Path:
    """Compile ``program`` for ``board`` into ``out_dir``; returns the executable (an ELF for rv32-qemu)."""
    spec = get_board(board)
    source, mark = generate(program)
    memory = memory_map(program, spec)
    key = firmware_key(source, spec, memory)
    out = Path(out_dir)
    exe = out / spec.executable
    manifest = out / MANIFEST
    if reuse and exe.exists() and manifest.exists():
        try:
            if json.loads(manifest.read_text()).get("key") == key:
                return exe
        except json.JSONDecodeError:
            pass
    cc = _require_toolchain(spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "program.c").write_text(source)
    tmp = out / f"{spec.executable}.tmp-{os.getpid()}"
    objects = _library_objects(cc, spec, timeout_s)
    cmd = [cc, *spec.cflags, *COMMON_CFLAGS, f"-I{KERNEL_DIR}", f"-I{BOARD_DIR / spec.folder}",
           *(memory.linker_flags() if memory else []), str(out / "program.c"), *map(str, objects), "-lm",
           "-o", str(tmp)]
    _compile(cmd, out / "build.log", f"building {program.model!r} for {spec.name}", timeout_s)
    os.replace(tmp, exe)
    info = {"board": spec.name, "model": program.model, "fingerprint": mark, "key": key,
            "executable": spec.executable, "memory": memory and {**asdict(memory), "memory_mib": memory.memory_mib}}
    tmp_manifest = out / f"{MANIFEST}.tmp-{os.getpid()}"
    tmp_manifest.write_text(json.dumps(info, indent=1))
    os.replace(tmp_manifest, manifest)
    return exe


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
