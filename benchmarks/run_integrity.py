"""What the crash-safe run directory costs per round: atomic writes (fsync + rename + directory fsync),
CRC-checked metrics records, the manifest of checkpoint hashes — against the run directory before them.

One round's writes, as the engine does them after a round: the metrics records of every device (a train and
an evaluate record each, shaped like the engine's, with telemetry) plus the round record, the checkpoint
(Deep-AE rank-4 LoRA adapters, 53.5 KB, as in benchmarks/fleet_round.py) and state.json. The baseline is
fleet/runs.py as of commit 1533576 (before this work: no fsync of checkpoints or state, no CRC, no manifest),
loaded from git. Each configuration runs ROUNDS rounds into a fresh directory on the same disk; the figure is
the median per round. The share of a round is that cost over the measured seconds per round of
benchmarks/results/fleet_round.json at the same device count (edgefleet, 1,000 and 10,000 devices).

    python benchmarks/run_integrity.py                  # 1,000 and 10,000 devices
    python benchmarks/run_integrity.py --devices 1000 --out /tmp/r.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleet.runs import RunDir  # noqa: E402

BASELINE_COMMIT = "1533576"
ROUNDS = 9
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "run_integrity.json"
TOML = 'name = "bench"\nseed = 0\n\n[training]\nrounds = 5\n'


def baseline_runs():
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE_COMMIT}:fleet/runs.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "runs_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("runs_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RunDir


def adapters() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    dims = [(640, 128), (128, 128), (128, 128), (128, 128), (128, 8), (8, 128), (128, 128), (128, 128),
            (128, 128), (128, 640)]
    out = {}
    for i, (n_in, n_out) in enumerate(dims):
        out[f"l{i}.lora_a"] = rng.normal(size=(n_in, 4)).astype(np.float32)
        out[f"l{i}.lora_b"] = rng.normal(size=(4, n_out)).astype(np.float32)
    return out


def records(devices: int, round_: int) -> list[dict]:
    rng = np.random.default_rng(round_)
    out = []
    for kind in ("train", "evaluate"):
        for d in range(devices):
            out.append({"type": "device", "round": round_, "kind": kind, "device": d, "group": "g",
                        "num_examples": 32, "train_loss": float(rng.random()), "loss_before": float(rng.random()),
                        "loss_after": float(rng.random()), "metric_before": float(rng.random()),
                        "metric_after": float(rng.random()), "modelled_s": 0.12, "bytes_down": 53504,
                        "bytes_up": 53504 if kind == "train" else 0, "wall_s": 0.001, "cycles": 123456,
                        "peak_bytes_by_level": {"L1": 65536, "L2": 500000, "L3": 0}})
    out.append({"type": "round", "round": round_, "devices_trained": devices, "failures": {},
                "train_loss": 0.5, "global_metric": 0.7, "bytes_up": devices * 53504})
    return out


def one_round(run, round_: int, rows: list[dict], arrays) -> float:
    start = time.perf_counter()
    run.append_metrics(rows)
    run.save_checkpoint(round_, arrays, {"momentum_vector/0": arrays["l0.lora_a"]})
    run.write_state({"rounds_completed": round_, "finished": False})
    return time.perf_counter() - start


def measure(run_cls, devices: int, directory: Path) -> list[float]:
    run = run_cls(directory)
    run.create(TOML)
    arrays = adapters()
    run.save_checkpoint(0, arrays, {})
    times = []
    for r in range(1, ROUNDS + 1):
        rows = records(devices, r)  # built outside the timing: the engine has them already
        times.append(one_round(run, r, rows, arrays))
    if hasattr(run, "unlock"):
        run.unlock()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    round_s = {c["devices"]: c["edgefleet"]["seconds_per_round"] for c in
               json.loads((ROOT / "benchmarks/results/fleet_round.json").read_text())["configurations"]}
    baseline = baseline_runs()
    work = Path(tempfile.mkdtemp(prefix="run-integrity-", dir=ROOT / "benchmarks"))
    configurations = []
    try:
        for devices in args.devices:
            old = measure(baseline, devices, work / f"old-{devices}")
            new = measure(RunDir, devices, work / f"new-{devices}")
            extra = statistics.median(new) - statistics.median(old)
            entry = {"devices": devices, "baseline_s_per_round": statistics.median(old),
                     "integrity_s_per_round": statistics.median(new), "extra_s_per_round": extra,
                     "baseline_rounds_s": old, "integrity_rounds_s": new,
                     "metrics_bytes_per_round": (work / f"new-{devices}" / "metrics.jsonl").stat().st_size // ROUNDS}
            if devices in round_s:
                entry["round_s_fleet_round_json"] = round_s[devices]
                entry["extra_share_of_round"] = extra / round_s[devices]
            configurations.append(entry)
            print(json.dumps({k: v for k, v in entry.items() if not k.endswith("rounds_s")}))
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    result = {"benchmark": "run_integrity", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "argv": sys.argv[1:], "baseline": f"fleet/runs.py at {BASELINE_COMMIT}",
              "rounds": ROUNDS, "disk": "the repository's file system (benchmarks/run-integrity-*)",
              "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "configurations": configurations}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
