"""Serial link benchmark: effective parameter upload / download throughput against the line rate, and the
seconds per federated round a Deep-AE LoRA board spends on the link.

The board is the rv32-qemu-serial firmware on QEMU (`-serial pty`); between host and board a relay on a pty
pair (device_runtime/serial/relay.py) paces each direction to the line rate (10 bits per byte, 8N1), standing in
for a USB-serial adapter at 115200 and 921600 baud. The baseline every figure is quoted against is that line
rate: ratio = effective bytes/s / (baud / 10).

Program: compile_model("deep-ae", tuning={"strategy": "lora", "rank": 4, "targets": ["*"]}, batch=16, lr=0.005)
(the deep-ae-anomaly scenario's tuning, batch and learning rate). A round is what SerialDevice.train does for a
job: upload the adapter (trainable + hyperparameters, committed by CRC-32), stream LOCAL_STEPS batches and run
them, read the adapter back (checked by CRC-32), read the counters. The first contact (the board boots with
its parameter region zeroed, so the whole region goes up once per session) is timed separately.

    python benchmarks/serial_link.py                  # writes benchmarks/results/serial_link.json
    python benchmarks/serial_link.py --bauds 115200 --steps 2 --out /tmp/s.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from compiler import compile_model  # noqa: E402
from device_runtime import NumpyDevice  # noqa: E402
from device_runtime.serial import framing as fr  # noqa: E402
from device_runtime.serial.device import UPLOADED_ROLES, SerialDevice  # noqa: E402
from device_runtime.serial.qemu_board import QemuBoard, build_serial_firmware  # noqa: E402
from device_runtime.serial.relay import Faults, Relay  # noqa: E402

TUNING = {"strategy": "lora", "rank": 4, "targets": ["*"]}
BATCH, LR, LOCAL_STEPS = 16, 0.005, 10
REPEATS = 3


def transfer_rates(device: SerialDevice) -> dict:
    """Upload (write + commit) and download (read + checksum) of the adapter, best of REPEATS."""
    spans = device._spans(UPLOADED_ROLES)
    nbytes = sum(n for _, n in spans)
    up, down = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        device._upload(spans)
        up.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        device._download(device._spans(("trainable",)))
        down.append(time.perf_counter() - t0)
    return {"adapter_bytes": nbytes, "upload_s": min(up), "download_s": min(down),
            "upload_bytes_per_s": nbytes / min(up), "download_bytes_per_s": nbytes / min(down)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bauds", type=int, nargs="+", default=[115200, 921600])
    ap.add_argument("--steps", type=int, default=LOCAL_STEPS)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "serial_link.json"))
    args = ap.parse_args()

    program = compile_model("deep-ae", tuning=TUNING, batch=BATCH, lr=LR)
    elf = build_serial_firmware(program)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, *program.tensors[program.input].shape[1:])).astype(np.float32)
    want = NumpyDevice(program).train(x, None, args.steps)
    runs = []
    for baud in args.bauds:
        line = baud / 10
        with QemuBoard(elf) as board, Relay(board.url, Faults(baud_rate=baud)) as relay:
            device = SerialDevice(program, relay.url, baud_rate=baud)
            t0 = time.perf_counter()
            device._sync()                              # first contact: the whole region (the board boots zeroed)
            first_contact_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = device.train(x, None, args.steps)
            round_s = time.perf_counter() - t0
            diff = max(float(np.max(np.abs(got.params[n] - want.params[n])) / (np.max(np.abs(want.params[n])) or 1))
                       for n in want.params)
            if diff > 1e-4:
                raise SystemExit(f"board and numpy executor differ by {diff:.2e} (relative)")
            rates = transfer_rates(device)
            t = got.telemetry
            batch_bytes = args.steps * program.tensors[program.input].nbytes
            runs.append({
                "baud": baud, "line_bytes_per_s": line,
                **rates,
                "upload_vs_line": rates["upload_bytes_per_s"] / line,
                "download_vs_line": rates["download_bytes_per_s"] / line,
                "round": {"local_steps": args.steps, "link_s": t.link_s, "wall_s": round_s,
                          "bytes_on_link": t.bytes_moved, "batch_bytes": batch_bytes,
                          "measured_cycles": t.cycles, "instructions": t.instructions,
                          "line_bound_s": t.bytes_moved / line},
                "first_contact": {"params_bytes": program.params_bytes, "s": first_contact_s,
                                  "line_bound_s": program.params_bytes / line},
                "max_relative_diff_vs_numpy": diff,
            })
            device.close()
            print(f"{baud} baud: upload {rates['upload_bytes_per_s'] / 1024:.1f} KiB/s "
                  f"({runs[-1]['upload_vs_line']:.2f} of line), download {rates['download_bytes_per_s'] / 1024:.1f} "
                  f"KiB/s ({runs[-1]['download_vs_line']:.2f}); round: {t.link_s:.1f} s on the link "
                  f"({t.bytes_moved / 1024:.0f} KiB, line-bound {t.bytes_moved / line:.1f} s)")
    result = {"benchmark": "serial_link", "program": {"model": "deep-ae", "tuning": TUNING, "batch": BATCH,
                                                      "trainable_bytes": runs[0]["adapter_bytes"] if runs else 0,
                                                      "params_bytes": program.params_bytes},
              "baseline": "line rate (baud / 10 bytes/s, 8N1)", "runs": runs,
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
              "command": "python benchmarks/serial_link.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
