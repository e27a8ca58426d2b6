"""RoundLogs of a small fleet with failures and drop-outs, and a run directory holding them, for the monitoring
tests. They are built here, as the round driver (fleet.rounds, being rewritten) will build them: a test of a
real run with the exporter on replaces this once the driver calls observers."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from device_runtime.protocol import Telemetry
from fleet.records import round_log_records
from fleet.roundlog import DeviceRecord, RoundLog
from fleet.runs import RunDir
from fleet.scenario import parse_scenario

GROUPS = (("big", "siracusa", 2_000_000, {"L1": 60_000, "L2": 900_000}, 150_000),
          ("small", "siracusa-small-l2", 600_000, {"L1": 50_000, "L2": 450_000}, 210_000))
FAULTS = {(1, 5): "error", (2, 3): "dropout", (2, 7): "straggler", (3, 3): "offline", (3, 9): "nonfinite"}
T0 = 1_790_000_000.0


def scenario_raw(devices: int, rounds: int) -> dict:
    half = devices // 2
    return {"name": "monitoring", "seed": 1,
            "model": {"name": "cct-digits", "pretrain_steps": 10},
            "tuning": {"strategy": "lora", "rank": 2, "targets": ["*attn*"]},
            "training": {"rounds": rounds, "fraction": 0.5, "local_steps": 2, "batch_size": 8},
            "aggregation": {"strategy": "fedit"},
            "data": {"kind": "digits", "samples_per_device": 16},
            "fleet": {"groups": [{"name": "big", "count": half, "target": "siracusa"},
                                 {"name": "small", "count": devices - half, "target": "siracusa-small-l2"}]},
            "metrics": {"enabled": True, "address": "127.0.0.1:0"}}


def device_record(round_: int, instruction: str, device: int, devices: int, rng) -> DeviceRecord:
    group, target, budget, peak, cycles = GROUPS[0 if device < devices // 2 else 1]
    cause = FAULTS.get((round_, device), "") if instruction == "train" else ""
    replied = cause in ("", "error", "nonfinite")
    samples, steps = (16, 2) if instruction == "train" and replied else (0, 0)
    telemetry = Telemetry(samples=samples, steps=steps, wall_s=float(rng.uniform(0.01, 0.05)) if replied else 0.0,
                          modelled_cycles_per_step=cycles, peak_bytes_by_level=peak,
                          bytes_down=4096 if cause != "offline" else 0,
                          bytes_up=4096 if instruction == "train" and not cause else 0,
                          modelled_s=steps * cycles / 370e6)
    if device == devices - 1 and replied:  # the last device stands for a board: counted cycles, a serial link
        telemetry = replace(telemetry, measured_cycles=steps * (cycles + 1234), instructions=steps * cycles,
                            link_s=0.25 * (1 + steps), link_bytes=5000 * (1 + steps))
    if cause:
        return DeviceRecord(round_, instruction, device, group, target, "numpy", cause, f"injected {cause}",
                            budget_bytes=budget, telemetry=telemetry)
    loss = float(2.0 / round_ + 0.01 * device)
    return DeviceRecord(round_, instruction, device, group, target, "numpy", "", "", 16,
                        loss_before=loss + 0.2, metric_before=float(0.3 + 0.1 * round_ + 0.001 * device),
                        loss=loss if instruction == "train" else float("nan"),
                        loss_after=loss - 0.1 if instruction == "train" else float("nan"),
                        metric_after=float(0.4 + 0.1 * round_ + 0.001 * device) if instruction == "train"
                        else float("nan"), budget_bytes=budget, telemetry=telemetry)


def round_logs(devices: int = 12, rounds: int = 3, seed: int = 0) -> list[RoundLog]:
    rng = np.random.default_rng(seed)
    logs = []
    for r in range(1, rounds + 1):
        sampled = sorted(int(d) for d in rng.permutation(devices)[: devices // 2])
        for d in (3, 5, 7, 9):  # the faulty devices are always asked
            if d < devices and d not in sampled:
                sampled.append(d)
        sampled.sort()
        records = [device_record(r, "train", d, devices, rng) for d in sampled]
        records += [device_record(r, "evaluate", d, devices, rng) for d in range(devices) if d not in sampled]
        started = T0 + 60.0 * r
        timings = {"train_s": 1.5 + r, "aggregate_train_s": 0.2 * r, "evaluate_s": 0.5}
        logs.append(RoundLog(r, started, started + sum(timings.values()), sampled, records, {"nan": int(r == 3)},
                             timings, {"train_loss": float(2.0 / r)}))
    return logs


def write_run_dir(path: Path, logs: list[RoundLog], devices: int, rounds: int, finished: bool = True) -> RunDir:
    scenario = parse_scenario(scenario_raw(devices, rounds), source="test")
    run = RunDir(path)
    run.create(scenario.to_toml())
    for log in logs:
        run.append_metrics(round_log_records(log))
    run.write_state({"rounds_completed": len(logs), "finished": finished})
    if finished:
        rng = np.random.default_rng(1)
        base = rng.uniform(0.2, 0.5, devices)
        per_device = {"device": list(range(devices)), "base": base.tolist(),
                      "global": (base + 0.1).tolist(), "personalized": (base + rng.uniform(-0.05, 0.3, devices)).tolist()}
        (path / "summary.json").write_text(json.dumps({
            "scenario": "monitoring", "rounds_completed": len(logs), "devices": devices, "metric": "accuracy",
            "personalization": {"base_accuracy_mean": float(np.mean(per_device["base"])),
                                "global_accuracy_mean": float(np.mean(per_device["global"])),
                                "personalized_accuracy_mean": float(np.mean(per_device["personalized"])),
                                "share_of_devices_improved": 0.8, "per_device": per_device},
            "timing": {"seconds_per_round": 3.0, "wall_seconds": 20.0}}))
    return run
