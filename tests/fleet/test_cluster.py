"""A local run's Ray listens on loopback only and refuses calls without the run's token (real Ray, real
sockets from /proc)."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import grpc
import pytest

from compiler.private_dir import PrivateDirError, private_dir
from fleet.cluster import cluster_address, descendants, listeners

CHILD = textwrap.dedent("""
    import sys, time, ray
    from fleet.cluster import start_ray
    from fleet.scenario import RaySpec

    class Scenario:
        ray = RaySpec(actors=2)

    session = start_ray(Scenario(), 2)

    @ray.remote
    class Echo:
        def ping(self):
            return "pong"

    actors = [Echo.remote() for _ in range(2)]
    assert ray.get([a.ping.remote() for a in actors]) == ["pong", "pong"]
    print(session.address, flush=True)
    sys.stdin.readline()  # hold Ray up until the test has looked
    ray.shutdown()
""")


def _kv_get(address: str, token: str | None) -> grpc.StatusCode:
    channel = grpc.insecure_channel(address)
    call = channel.unary_unary("/ray.rpc.InternalKVGcsService/InternalKVGet",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        call(b"", metadata=[("authorization", f"Bearer {token}")] if token else None, timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()
    finally:
        channel.close()


def test_local_ray_binds_loopback_and_requires_the_token():
    ray_tmp = tempfile.mkdtemp(prefix="ef-ray-")  # short: unix socket paths are limited to 107 bytes
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_TOKEN=token, RAY_TMPDIR=ray_tmp, PYTHONPATH=os.getcwd())
    child = subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        address = child.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        time.sleep(1.0)  # the agents finish binding after the driver connects
        found = listeners(descendants(child.pid))
        commands = " | ".join(sorted({f.command.split()[0].rsplit('/', 1)[-1] for f in found}))
        assert len({f.pid for f in found}) >= 4, commands  # driver, GCS, raylet, actors, agents
        assert any("gcs_server" in f.command for f in found) and any("raylet" in f.command for f in found)
        exposed = [f for f in found if not f.loopback]
        assert not exposed, f"listening beyond loopback: {exposed}"
        assert _kv_get(address, None) == grpc.StatusCode.UNAUTHENTICATED
        assert _kv_get(address, "0" * 64) == grpc.StatusCode.UNAUTHENTICATED
        assert _kv_get(address, token) == grpc.StatusCode.OK
    finally:
        child.communicate("\n", timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert child.returncode == 0


def test_the_default_session_directory_stays_private_across_runs(tmp_path):
    """Without RAY_TMPDIR, two local Ray sessions one after the other both start (Ray chmods the directory it
    is given to 0777; the one edgefleet checks must stay 0700 so the second run is not refused)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    short = tempfile.mkdtemp(prefix="ef-")  # TMPDIR for the children: short, for the unix socket paths
    env.update(TMPDIR=short, PYTHONPATH=os.getcwd())
    try:
        for _ in range(2):
            child = subprocess.run([sys.executable, "-c", CHILD], env=env, input="\n", capture_output=True,
                                   text=True, timeout=300)
            assert child.returncode == 0, child.stderr[-2000:]
            private = os.path.join(short, f"edgefleet-ray-{os.geteuid()}")
            assert os.stat(private).st_mode & 0o777 == 0o700
            assert any(name.startswith("session_") for name in os.listdir(os.path.join(private, "r")))
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_cluster_address_comes_from_the_scenario_then_the_environment(monkeypatch):
    class Ray:
        address = None

    class Scenario:
        ray = Ray()

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(Scenario()) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster_address(Scenario()) == "10.0.0.5:6379"
    Scenario.ray.address = "10.0.0.6:6379"
    assert cluster_address(Scenario()) == "10.0.0.6:6379"


def test_private_dir_refuses_other_owners_and_open_modes(tmp_path):
    mine = private_dir(tmp_path / "mine")
    assert os.stat(mine).st_mode & 0o777 == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    os.chmod(open_dir, 0o777)
    with pytest.raises(PrivateDirError, match=f"{open_dir} is open to other users \\(mode 0777\\)"):
        private_dir(open_dir)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(PrivateDirError, match="owned by uid 65534"):
        private_dir(theirs)
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(PrivateDirError, match="not a directory"):
        private_dir(link)
