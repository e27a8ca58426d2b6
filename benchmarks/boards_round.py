"""A Deep-AE LoRA board in a fleet round: seconds per round spent on the serial link, through `run_scenario`.

One QEMU board (rv32-qemu-serial firmware of the fleet's program, `-serial pty`) sits behind a relay on a pty
pair that paces each direction to the line rate (10 bits per byte, 8N1), standing in for a USB-serial adapter;
the scenario lists it as `[[fleet.boards]]` with the relay's pty as its port, beside simulated devices, and
runs ROUNDS rounds with every device sampled. Per round the board's DeviceRecords give the job's time on the
link (`link_s`: evaluate before, the LOCAL_STEPS training steps, evaluate after; and the round's evaluate job)
and the bytes that crossed it both ways (`link_bytes`); the line-bound time is link_bytes × 10 / baud.
Round 1 includes the first contact (the board boots with its parameter region zeroed, so the whole region goes
up once per session); later rounds are the steady state. Stopped after the last round (no personalization).

Scenario: the deep-ae-anomaly scenario's model, tuning (LoRA rank 4 on every layer), batch 16, 10 local steps
and learning rate; 32 training and 32 test samples per device.

    python benchmarks/boards_round.py                 # writes benchmarks/results/boards_round.json
    python benchmarks/boards_round.py --bauds 921600 --rounds 2 --out /tmp/b.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_runtime.serial.qemu_board import QemuBoard, build_serial_firmware  # noqa: E402
from device_runtime.serial.relay import Faults, Relay  # noqa: E402
from fleet.engine import run_scenario  # noqa: E402
from fleet.programs import ProgramBuilder, pretrain_base  # noqa: E402
from fleet.runs import RunDir  # noqa: E402
from fleet.scenario import parse_scenario  # noqa: E402

SIMULATED = 4
SCENARIO = {
    "name": "boards-round", "seed": 3,
    "model": {"name": "deep-ae", "pretrain_steps": 100, "pretrain_lr": 0.01},
    "tuning": {"strategy": "lora", "rank": 4, "targets": ["*"]},
    "training": {"rounds": 2, "fraction": 1.0, "local_steps": 10, "batch_size": 16, "lr": 0.005},
    "aggregation": {"strategy": "fedit"},
    "data": {"kind": "machine-sound", "samples_per_device": 32, "test_samples_per_device": 32},
    "fleet": {"groups": [{"name": "sim", "count": SIMULATED, "target": "siracusa"}]},
    "ray": {"actors": 1},
}


def one_baud(baud: int, rounds: int, work: Path) -> dict:
    raw = json.loads(json.dumps(SCENARIO))
    raw["training"]["rounds"] = rounds
    scenario = parse_scenario(raw, source="benchmark")
    program = ProgramBuilder(scenario, pretrain_base(scenario, log=lambda _: None)).program("siracusa", 4)
    firmware = build_serial_firmware(program)
    with QemuBoard(firmware) as board, Relay(board.url, Faults(baud_rate=baud)) as relay:
        raw["fleet"]["boards"] = [{"name": "board", "port": relay.url, "baud": baud}]
        scenario = parse_scenario(raw, source="benchmark")
        run_dir = work / f"run-{baud}"
        t0 = time.perf_counter()
        run_scenario(scenario, run_dir, progress=False, stop_after_round=rounds)
        wall_s = time.perf_counter() - t0
    records = list(RunDir(run_dir).metrics())
    per_round = []
    for round_ in range(1, rounds + 1):
        board = [r for r in records if r["type"] == "device" and r["round"] == round_ and r["runtime"] == "serial"]
        sims = [r for r in records if r["type"] == "device" and r["round"] == round_ and r["runtime"] == "numpy"]
        summary = next(r for r in records if r["type"] == "round" and r["round"] == round_)
        train = next(r for r in board if r["instruction"] == "train")
        link_s = sum(r["telemetry"]["link_s"] for r in board)
        link_bytes = sum(r["telemetry"]["link_bytes"] for r in board)
        per_round.append({
            "round": round_, "board_causes": [r["cause"] for r in board],
            "board_link_s": link_s, "board_link_bytes": link_bytes,
            "line_bound_s": link_bytes * 10 / baud, "link_over_line_bound": link_s / (link_bytes * 10 / baud),
            "train_job": {k: train["telemetry"][k] for k in ("link_s", "link_bytes", "wall_s", "measured_cycles",
                                                               "instructions", "bytes_up", "bytes_down")},
            "round_duration_s": summary["duration_s"],
            "simulated_wall_s_max": max(r["telemetry"]["wall_s"] for r in sims),
        })
    return {"baud": baud, "line_bytes_per_s": baud / 10, "adapter_bytes": per_round[0]["train_job"]["bytes_up"],
            "params_bytes": program.params_bytes, "rounds": per_round, "run_wall_s": wall_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bauds", type=int, nargs="+", default=[115200, 921600])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "boards_round.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edgefleet-boards-round-") as work:
        results = [one_baud(baud, args.rounds, Path(work)) for baud in args.bauds]
    out = {"benchmark": "boards_round", "command": " ".join(["python", "benchmarks/boards_round.py", *sys.argv[1:]]),
           "scenario": SCENARIO, "simulated_devices": SIMULATED, "results": results,
           "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "cpus": os.cpu_count(), "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for r in results:
        for x in r["rounds"]:
            print(f"{r['baud']:>7} baud, round {x['round']}: board on the link {x['board_link_s']:.1f} s "
                  f"({x['board_link_bytes']:,} bytes; line-bound {x['line_bound_s']:.1f} s), "
                  f"round {x['round_duration_s']:.1f} s, causes {x['board_causes']}")
    print(f"load average before {load_before}, after {out['load_average_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
