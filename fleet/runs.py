"""The run directory: resolved scenario, metrics.jsonl, per-round checkpoints (.npz, no pickle), state.json
and summary.json. Every file is written atomically; resuming never overwrites what a finished round saved."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

SCENARIO = "scenario.toml"
METRICS = "metrics.jsonl"
STATE = "state.json"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"


class RunError(RuntimeError):
    """A run directory problem; one line naming the cause."""


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ---- creation / resume ----------------------------------------------------------------------------
    def create(self, scenario_toml: str) -> None:
        if self.path.exists() and any(self.path.iterdir()):
            raise RunError(f"run directory {self.path} already holds a run; use --resume {self.path} or "
                           "another --run-dir")
        (self.path / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / SCENARIO, scenario_toml.encode())
        self.write_state({"rounds_completed": 0, "finished": False})

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / STATE).read_text())
        except FileNotFoundError:
            raise RunError(f"{self.path}: no {STATE}; not an edgefleet run directory") from None
        except json.JSONDecodeError as exc:
            raise RunError(f"{self.path / STATE}: corrupt ({exc.msg})") from None

    def write_state(self, state: Mapping[str, Any]) -> None:
        atomic_write(self.path / STATE, json.dumps(state, indent=1).encode())

    # ---- metrics --------------------------------------------------------------------------------------
    def append_metrics(self, records: Iterable[Mapping[str, Any]]) -> None:
        with open(self.path / METRICS, "a") as f:
            for record in records:
                f.write(json.dumps(record, allow_nan=False, default=_plain) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, rounds_completed: int) -> None:
        """Drop records of a round that did not finish (it will be run again)."""
        kept = [r for r in self.metrics() if r.get("round", 0) <= rounds_completed]
        atomic_write(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in kept).encode())

    # ---- checkpoints ----------------------------------------------------------------------------------
    def checkpoint_path(self, round_: int) -> Path:
        return self.path / CHECKPOINTS / f"round-{round_:04d}.npz"

    def save_checkpoint(self, round_: int, arrays: Mapping[str, np.ndarray],
                        strategy_state: Mapping[str, np.ndarray]) -> Path:
        path = self.checkpoint_path(round_)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **{f"arrays/{k}": v for k, v in arrays.items()},
                 **{f"strategy/{k}": v for k, v in strategy_state.items()})
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, round_: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        path = self.checkpoint_path(round_)
        try:
            with np.load(path, allow_pickle=False) as npz:
                items = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise RunError(f"{path}: cannot read checkpoint ({exc})") from None
        arrays = {k[len("arrays/"):]: v for k, v in items.items() if k.startswith("arrays/")}
        state = {k[len("strategy/"):]: v for k, v in items.items() if k.startswith("strategy/")}
        return arrays, state

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write(self.path / SUMMARY, json.dumps(summary, indent=1, default=_plain).encode())


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
