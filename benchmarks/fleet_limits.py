"""Peak memory of a one-round fleet run against fleet.limits' estimate, and the largest fleet the estimate
lets this machine run.

Each device count runs in its own process: the Deep-AE rank-4 LoRA fleet of benchmarks/fleet_round.py
(machine-sound data, 32 + 32 clips per device, fedit, one local step), one round, hosts in the process
(actors = 0, so one process holds everything and its peak RSS is the run's). Recorded: wall seconds, the
engine's seconds per round, peak RSS (ru_maxrss), and ``fleet.limits.estimate_memory`` for the same scenario
with the program's adapter bytes. ``largest_fleet_estimate`` is the estimate's largest device count for the
memory available now (``MemAvailable``).

    python benchmarks/fleet_limits.py                       # 1,000 and 4,000 devices
    python benchmarks/fleet_limits.py --devices 500 2000 --out /tmp/l.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "fleet_limits.json"


def scenario_dict(devices: int) -> dict:
    return {"name": "limits", "seed": 0, "model": {"name": "deep-ae", "pretrain_steps": 50},
            "tuning": {"strategy": "lora", "rank": 4, "alpha": 8.0},
            "training": {"rounds": 1, "fraction": 1.0, "local_steps": 1, "batch_size": 32, "lr": 0.01},
            "aggregation": {"strategy": "fedit"},
            "data": {"kind": "machine-sound", "samples_per_device": 32, "test_samples_per_device": 32,
                     "anomaly_fraction": 0.25},
            "fleet": {"groups": [{"name": "g", "count": devices}]}, "ray": {"actors": 2, "devices_per_call": 250}}


def child(devices: int) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    sys.path.insert(0, str(ROOT))
    from compiler import compile_model
    from fleet.engine import run_scenario
    from fleet.limits import estimate_memory
    from fleet.scenario import parse_scenario
    scenario = parse_scenario(scenario_dict(devices))
    program = compile_model("deep-ae", tuning={"strategy": "lora", "rank": 4}, batch=32)
    adapter_bytes = sum(program.tensors[n].nbytes for n in program.trainable)
    estimate = estimate_memory(scenario, adapter_bytes, actors=1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_scenario(scenario, Path(tmp) / "run", progress=False, actors=0)
    print(json.dumps({"devices": devices, "wall_s": time.perf_counter() - start,
                      "seconds_per_round": summary["timing"]["seconds_per_round"],
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "estimate_bytes": estimate.total_bytes, "adapter_bytes": adapter_bytes,
                      "largest_fleet_estimate": estimate.max_devices,
                      "available_bytes": estimate.available_bytes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    rows = []
    for devices in args.devices:
        proc = subprocess.run([sys.executable, __file__, "--child", str(devices)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    if len(rows) >= 2:
        slope = (rows[-1]["peak_rss_bytes"] - rows[0]["peak_rss_bytes"]) / (rows[-1]["devices"] - rows[0]["devices"])
    else:
        slope = None
    result = {"benchmark": "fleet_limits", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
              "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(),
                          "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
              "setup": scenario_dict(0) | {"fleet": "groups[0].count = devices", "hosts": "in process (actors=0)"},
              "runs": rows, "measured_bytes_per_device": slope}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
