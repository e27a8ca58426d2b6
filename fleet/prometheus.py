"""A local Prometheus server (the Debian `prometheus` binary, a plain process on loopback) scraping a run's
exporter, with its configuration and data in the run directory."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE = "prometheus"                  # the Debian package holding the binary
DEFAULT_LISTEN = "127.0.0.1:9090"
SCRAPE_INTERVAL_S = 5
READY_TIMEOUT_S = 30.0
DIR = "prometheus"                      # inside the run directory: prometheus.yml, data/, prometheus.log


class PrometheusError(RuntimeError):
    """One line naming the cause."""


def prometheus_config(target: str, interval_s: int = SCRAPE_INTERVAL_S) -> str:
    """The scrape configuration for one exporter (monitoring/prometheus.yml is this for 127.0.0.1:9464)."""
    return (f"# Prometheus scraping one edgefleet run's exporter (`edgefleet monitor RUN_DIR` writes this file\n"
            f"# with the run's own exporter address into RUN_DIR/{DIR}/).\n"
            f"global:\n"
            f"  scrape_interval: {interval_s}s\n"
            f"  evaluation_interval: {interval_s}s\n"
            f"scrape_configs:\n"
            f"  - job_name: edgefleet\n"
            f"    static_configs:\n"
            f"      - targets: [\"{target}\"]\n")


def query(url: str, expr: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """An instant query through a Prometheus server's HTTP API (``url``: http://host:port); the result vector."""
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}),
                                timeout=timeout_s) as response:
        body = json.loads(response.read())
    if body.get("status") != "success":
        raise PrometheusError(f"query {expr!r}: {body.get('error', body)}")
    return body["data"]["result"]


def find_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise PrometheusError(f"prometheus: binary not found; install the Debian package '{PACKAGE}' "
                              f"(apt-get install {PACKAGE}, as scripts/setup.sh does)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PrometheusServer:
    process: subprocess.Popen
    listen: str                          # host:port of its web UI and HTTP API
    directory: Path

    @property
    def url(self) -> str:
        return f"http://{self.listen}"

    def query(self, expr: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        return query(self.url, expr, timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)

    def __enter__(self) -> "PrometheusServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_prometheus(directory: str | Path, target: str, listen: str = DEFAULT_LISTEN,
                     interval_s: int = SCRAPE_INTERVAL_S, ready_timeout_s: float = READY_TIMEOUT_S) -> PrometheusServer:
    """Write ``directory``/prometheus.yml for ``target`` and start Prometheus on ``listen``, data in
    ``directory``/data; returns once it answers /-/ready."""
    binary = find_binary()
    directory = Path(directory)
    (directory / "data").mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    config.write_text(prometheus_config(target, interval_s))
    log = open(directory / "prometheus.log", "ab")
    process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
                                f"--web.listen-address={listen}", "--log.level=warn"],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    server = PrometheusServer(process, listen, directory)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PrometheusError(f"prometheus exited with code {process.returncode}; see {directory / 'prometheus.log'}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    server.stop()
    raise PrometheusError(f"prometheus not ready on {listen} after {ready_timeout_s:.0f} s; "
                          f"see {directory / 'prometheus.log'}")
