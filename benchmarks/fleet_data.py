"""Seconds to generate 1,000 devices' data (32 train + 32 test samples each) in one call, per data kind,
against the aim of under 5 s. Writes benchmarks/results/fleet_data.json.

    python benchmarks/fleet_data.py
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from fleet.data import fleet_data
from fleet.scenario import DataSpec

KINDS = {"digits": DataSpec(kind="digits", dirichlet_alpha=0.5, samples_per_device=32, test_samples_per_device=32),
         "machine-sound": DataSpec(kind="machine-sound", dirichlet_alpha=None, samples_per_device=32,
                                   test_samples_per_device=32, anomaly_fraction=0.2)}
DEVICES = 1000
AIM_S = 5.0


def main() -> None:
    result = {"devices": DEVICES, "aim_s": AIM_S, "seconds": {}}
    for name, spec in KINDS.items():
        fleet_data(spec, 0, range(8))  # warm-up (pools, constants)
        start = time.perf_counter()
        fleet_data(spec, 0, range(DEVICES))
        result["seconds"][name] = time.perf_counter() - start
    out = Path(__file__).parent / "results" / "fleet_data.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
