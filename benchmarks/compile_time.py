"""Compile + lower time of a 300k-parameter model (cct-2-3x2, LoRA, batch 8) onto siracusa: the median of
several runs after a warm-up, against the aim of well under a second. Writes benchmarks/results/compile_time.json.

    python benchmarks/compile_time.py
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from compiler import compile_model
from compiler.targets import load_target, lower_to_target

RUNS = 5
AIM_S = 1.0


def main() -> None:
    target = load_target("siracusa")
    compile_model("cct-2-3x2", tuning="lora", batch=8)  # warm caches
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        lower_to_target(compile_model("cct-2-3x2", tuning="lora", batch=8), target)
        times.append(time.perf_counter() - start)
    result = {"model": "cct-2-3x2", "tuning": "lora", "batch": 8, "target": "siracusa", "runs": RUNS,
              "median_s": statistics.median(times), "min_s": min(times), "aim_s": AIM_S}
    out = Path(__file__).parent / "results" / "compile_time.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
