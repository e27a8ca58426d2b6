"""Ray for a run: a local instance on loopback with token authentication, or an existing cluster.

Local runs (no ``ray.address`` in the scenario and no ``RAY_ADDRESS``) start Ray so that

- every listener (GCS, raylet and object manager, the dashboard agent, the runtime-env agent, each worker and
  actor) binds 127.0.0.1. ``ray.init(_node_ip_address="127.0.0.1")`` alone does not do that in Ray 2.55: it
  replaces a loopback address with the machine's external one (``services.resolve_ip_for_localhost``); with
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray takes the node address to be loopback and its servers bind it;
- Ray's token authentication is on (``RAY_AUTH_MODE=token``): every gRPC call into the GCS, the raylets and the
  workers must carry the run's random token (``RAY_AUTH_TOKEN``, inherited by the processes Ray starts, never
  written to disk); a call without it is refused as UNAUTHENTICATED;
- Ray's session directory (logs, the object store's and raylet's unix sockets) lies inside a private directory
  (0700, owner checked) unless ``RAY_TMPDIR`` names another. Ray makes the directory it is given world-writable
  (``try_make_directory_shared``: mode 0777 at every ``ray.init``), so it is given a subdirectory of the private
  one: what Ray opens up stays behind the 0700 parent.

Joining a cluster (``ray.address`` or ``RAY_ADDRESS``): what the cluster binds and whether it wants a token is
the cluster's own configuration; docs/cluster.md says what must be open and how to pass the token.
"""
from __future__ import annotations

import os
import secrets
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.private_dir import private_dir

LOOPBACK = "127.0.0.1"
AUTH_ENV = {"RAY_AUTH_MODE": "token"}
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # node address = loopback (see the module docstring)
INIT_OPTIONS: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR",
                                "configure_logging": False}


@dataclass(frozen=True)
class RaySession:
    address: str        # the GCS address
    local: bool         # started here (loopback + token) or joined
    started: bool       # False when Ray was already initialized in this process


def cluster_address(scenario: Any) -> str | None:
    """The cluster to join: the scenario's ``ray.address``, else ``RAY_ADDRESS``, else None (start locally)."""
    address = getattr(getattr(scenario, "ray", None), "address", None)
    return address or os.environ.get("RAY_ADDRESS") or None


def start_ray(scenario: Any, actors: int) -> RaySession | None:
    """Start (or join) Ray for a run with ``actors`` host actors; None when ``actors`` is 0 (in-process)."""
    if actors <= 0:
        return None
    import ray
    if ray.is_initialized():
        return RaySession(ray.get_runtime_context().gcs_address, False, False)
    address = cluster_address(scenario)
    if address:
        ray.init(address=address, **INIT_OPTIONS)
        return RaySession(ray.get_runtime_context().gcs_address, False, True)
    boards = getattr(getattr(scenario, "fleet", None), "boards", ())  # plugged in here: their proxies' resources
    return start_local_ray(max(actors, os.cpu_count() or 1), dashboard=bool(getattr(scenario.ray, "dashboard", False)),
                           resources={board.ray_resource: 1.0 for board in boards})  # fleet.limits warns when actors > cores


def start_local_ray(num_cpus: int, dashboard: bool = False, resources: dict[str, float] | None = None) -> RaySession:
    """A local Ray instance on loopback with token authentication (see the module docstring); ``resources``:
    custom resources of this node (a board's, ``{"board:<name>": 1}``, places its proxy here)."""
    import ray
    import ray._private.ray_constants as ray_constants
    os.environ.update(LOCAL_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False  # the same switch, for a process that imported ray already
    os.environ.update(AUTH_ENV)
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))  # one token per process and its children
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    _reload_ray_config()
    temp_dir = os.environ.get("RAY_TMPDIR") or str(ray_temp_dir())
    options = {**INIT_OPTIONS, "include_dashboard": dashboard, "dashboard_host": LOOPBACK}  # opt-in
    ray.init(num_cpus=num_cpus, _node_ip_address=LOOPBACK, _temp_dir=temp_dir, resources=dict(resources or {}),
             **options)
    return RaySession(ray.get_runtime_context().gcs_address, True, True)


def ray_temp_dir() -> Path:
    """Short (unix socket paths are limited to 107 bytes) and private: ``r`` inside a 0700 directory, since Ray
    chmods the directory it is given to 0777."""
    parent = private_dir(Path(tempfile.gettempdir()) / f"edgefleet-ray-{os.geteuid()}", "Ray session directory")
    inner = parent / "r"
    inner.mkdir(mode=0o700, exist_ok=True)
    return inner


def _reload_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE into its C++ config once per process; re-read it (a process that ran Ray
    without authentication before, e.g. a test session)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # another Ray version: the environment is read at ray.init
        return
    AuthenticationTokenLoader.instance().reset_cache()
    Config.initialize("")


# ---- what is listening ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Listener:
    pid: int
    protocol: str       # tcp | tcp6 | udp | udp6
    address: str
    port: int
    command: str

    @property
    def loopback(self) -> bool:
        address = self.address.removeprefix("::ffff:")
        return address.startswith("127.") or address == "::1"


def listeners(pids: set[int] | None = None) -> list[Listener]:
    """Listening TCP sockets and bound UDP sockets of ``pids`` (every process when None), from /proc."""
    sockets: dict[str, tuple[str, str, int]] = {}
    for protocol, state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        try:
            lines = Path(f"/proc/net/{protocol}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == state:
                sockets[fields[9]] = (protocol, *_address(fields[1]))
    found = []
    for pid in pids if pids is not None else [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            inode = link[len("socket:["):-1] if link.startswith("socket:[") else None
            if inode in sockets:
                found.append(Listener(pid, *sockets[inode], command.strip()[:200]))
    return found


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(children.get(current, []))
    return found


def _address(hex_address: str) -> tuple[str, int]:
    ip, port = hex_address.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # /proc prints each 32-bit word host-endian
    return socket.inet_ntop(socket.AF_INET6, words), int(port, 16)
