"""Directories only their owner can enter: the firmware build cache and Ray's session directory.

A predictable path under /tmp can be created by any local user before we get there; whoever owns it then
decides what we link or which socket we talk to. ``private_dir`` creates a directory with mode 0700, or
accepts an existing one only when it is a real directory (not a symlink) owned by the effective user with no
group or world access; anything else is one line naming the path and what is wrong.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path


class PrivateDirError(PermissionError):
    """A directory that is meant to be private is not; one line naming it."""


def private_dir(path: str | os.PathLike, what: str = "directory") -> Path:
    """``path`` created (parents as needed, the last component 0700) or checked private; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_private(path, what)
    return path


def check_private(path: Path, what: str = "directory") -> None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise PrivateDirError(f"{what} {path} is not a directory (a symlink or a file); remove it")
    if info.st_uid != os.geteuid():
        raise PrivateDirError(f"{what} {path} is owned by uid {info.st_uid}, not by this user "
                              f"(uid {os.geteuid()}); refusing to use it")
    if info.st_mode & 0o077:
        raise PrivateDirError(f"{what} {path} is open to other users (mode {stat.S_IMODE(info.st_mode):04o}); "
                              f"run: chmod 700 {path}")
