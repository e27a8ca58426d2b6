"""The metrics exporter of a run: ``FleetMetrics`` served over HTTP (GET /metrics) on 127.0.0.1:9464 by
default, and ``exporter.json`` in the run directory saying where (``edgefleet status`` and ``edgefleet
monitor`` read it; port 0 in a scenario picks a free port)."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fleet.metrics import FleetMetrics
from fleet.records import read_round_logs
from fleet.runs import atomic_write

EXPORTER_FILE = "exporter.json"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class ExporterInfo:
    address: str                         # host:port the exporter listens on
    pid: int                             # the process serving it

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ExporterInfo":
        return cls(str(raw["address"]), int(raw["pid"]))


def read_exporter_info(run_dir: str | os.PathLike) -> ExporterInfo | None:
    path = Path(run_dir) / EXPORTER_FILE
    try:
        return ExporterInfo.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not an exporter record ({exc})") from None


class MetricsExporter:
    """Serves ``metrics.render()`` until ``close``; a context manager."""

    def __init__(self, metrics: FleetMetrics, address: str = "127.0.0.1:9464"):
        host, _, port = address.rpartition(":")
        self.metrics = metrics
        self.server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), _handler(metrics))
        self.server.daemon_threads = True
        self.address = f"{self.server.server_address[0]}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="edgefleet-exporter", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def write_info(self, run_dir: str | os.PathLike) -> None:
        info = ExporterInfo(self.address, os.getpid())
        atomic_write(Path(run_dir) / EXPORTER_FILE, json.dumps(info.to_dict()).encode())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> "MetricsExporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve_run(run_dir: str | os.PathLike, address: str, planned_rounds: int,
              metrics: FleetMetrics | None = None) -> MetricsExporter:
    """The exporter of a run (new or resumed): counters restored from the run directory's finished rounds,
    the listener started and its address written to ``exporter.json``."""
    metrics = metrics or FleetMetrics()
    metrics.restore(read_round_logs(run_dir), planned_rounds)
    exporter = MetricsExporter(metrics, address)
    exporter.write_info(run_dir)
    return exporter


def _handler(metrics: FleetMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics is served")
                return
            body = metrics.render()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
            pass

    return Handler
