"""The firmware object cache is private and verified: a planted object is never linked (real gcc, host board)."""
from __future__ import annotations

import os
import subprocess

import pytest

from compiler.codegen import build_elf
from compiler.codegen.build import OBJECTS_MANIFEST, default_cache_dir, get_board
from compiler.ir import CompileError
from tests.codegen.programs import compiled

PLANTED = "int edgefleet_planted_marker(void) { return 42; }\nint main(void) { return edgefleet_planted_marker(); }\n"


@pytest.fixture(scope="module")
def program():
    return compiled("torch-mlp", "lora+head")


def _symbols(path) -> str:
    return subprocess.run(["nm", str(path)], capture_output=True, text=True, check=True).stdout


def test_a_planted_object_is_rebuilt_not_linked(program, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFLEET_FIRMWARE_CACHE", str(tmp_path / "cache"))
    exe = build_elf(program, tmp_path / "first", board="host")
    assert os.stat(tmp_path / "cache").st_mode & 0o777 == 0o700
    (objects_dir,) = [p for p in (tmp_path / "cache" / "objects").iterdir() if p.name.startswith("host-")]
    assert (objects_dir / OBJECTS_MANIFEST).exists()
    main_o = objects_dir / "main.o"  # the firmware entry: replaced by another user's code
    (tmp_path / "evil.c").write_text(PLANTED)
    subprocess.run(["gcc", "-c", str(tmp_path / "evil.c"), "-o", str(main_o)], check=True)
    assert "edgefleet_planted_marker" in _symbols(main_o)
    exe2 = build_elf(program, tmp_path / "second", board="host")
    assert "edgefleet_planted_marker" not in _symbols(exe2)
    assert "edgefleet_planted_marker" not in _symbols(main_o)  # the cache entry was rebuilt
    assert _symbols(exe2) == _symbols(exe)


def test_a_planted_executable_is_not_reused(program, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFLEET_FIRMWARE_CACHE", str(tmp_path / "cache"))
    exe = build_elf(program, tmp_path / "out", board="host")
    good = exe.read_bytes()
    exe.write_bytes(good[:-16] + b"\0" * 16)  # same key in firmware.json, other bytes
    again = build_elf(program, tmp_path / "out", board="host")
    assert again.read_bytes() == good


def test_a_cache_directory_another_user_owns_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, 65534, 65534)
    monkeypatch.setenv("EDGEFLEET_FIRMWARE_CACHE", str(cache))
    with pytest.raises(CompileError, match=f"firmware cache {cache} is owned by uid 65534"):
        default_cache_dir()
    os.chown(cache, os.geteuid(), os.getegid())
    os.chmod(cache, 0o777)
    with pytest.raises(CompileError, match=r"is open to other users \(mode 0777\)"):
        default_cache_dir()
    assert get_board("host").name == "host"
