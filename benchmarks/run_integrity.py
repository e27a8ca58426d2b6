"""What the crash-safe run directory costs per round: atomic writes (fsync + rename + directory fsync),
CRC-checked metrics records, the manifest of checkpoint hashes — against the run directory before them.

One round's writes, as the engine does them after a round: the metrics records (a train and an evaluate
record per device, made by fleet.records.round_log_records from DeviceRecords shaped like a numpy
device's, telemetry included, and the round record), the checkpoint (Deep-AE rank-4 LoRA adapters,
53.5 KB, as in benchmarks/fleet_round.py) and state.json. The baseline is fleet/runs.py as of commit 1533576
(before this work: no fsync of checkpoints or state, no CRC, no manifest), loaded from git.

Both write into their own fresh directory on the same disk, interleaved: every round is written by both,
one right after the other, the order alternating from round to round, so a change in the machine's load
hits both; before each, gc.collect() and os.sync() (so neither pays for the other's unsynced writes in a
journal commit). The figure is the median over rounds of the paired difference (integrity minus baseline,
same round), with its quartiles; the medians of each side and of each part (metrics, checkpoint, state)
are given too, and apart from them the seconds round_log_records takes to make a round's records (the
same for both, counted in neither). The share of a round is the extra over the seconds per round in
benchmarks/results/fleet_round.json at the same device count, read when this runs. The load average is
recorded before and after each configuration: a figure taken on a loaded machine says so.

    python benchmarks/run_integrity.py                  # 1,000 and 10,000 devices
    python benchmarks/run_integrity.py --devices 1000 --rounds 15 --out /tmp/r.json
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from device_runtime.protocol import Telemetry  # noqa: E402
from fleet.records import round_log_records  # noqa: E402
from fleet.roundlog import DeviceRecord, RoundLog  # noqa: E402
from fleet.runs import RunDir, encode_record  # noqa: E402

BASELINE_COMMIT = "1533576"
ROUNDS = 31
AIM_SHARE = 0.02  # issue 9: the integrity path costs under 2 % of a round
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "run_integrity.json"
TOML = 'name = "bench"\nseed = 0\n\n[training]\nrounds = 5\n'


def baseline_runs():
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE_COMMIT}:fleet/runs.py"],
                            capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as directory:  # the module is in memory once loaded
        path = Path(directory) / "runs_baseline.py"
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


def round_log(devices: int, round_: int) -> RoundLog:
    """A round as the round driver closes it: a train and an evaluate DeviceRecord per device (the evaluate
    one without training numbers, NaN), telemetry as a numpy device fills it, the round's timings."""
    rng = np.random.default_rng(round_)
    out = []
    for instruction in ("train", "evaluate"):
        train = instruction == "train"
        for d in range(devices):
            telemetry = Telemetry(samples=32 if train else 0, steps=4 if train else 0, wall_s=float(rng.random()),
                                  modelled_cycles_per_step=708381, peak_bytes_by_level={"L1": 196608, "L2": 270592,
                                                                                         "L3": 0},
                                  bytes_down=53504, bytes_up=53504 if train else 0, link_s=0.0539,
                                  modelled_s=0.0039 if train else 0.0)
            numbers = ([float(v) for v in rng.random(5)] if train else [float(v) for v in rng.random(2)])
            out.append(DeviceRecord(round_, instruction, d, "g", "siracusa", "numpy", "", "", 32, *numbers,
                                    telemetry=telemetry))
    return RoundLog(round_, 1.0e9, 1.0e9 + 1.3, list(range(devices)), out, {},
                    {"train_s": 0.8, "aggregate_train_s": 0.1, "evaluate_s": 0.4}, {"loss": 0.5})


def records(devices: int, round_: int) -> list[dict]:
    """The metrics.jsonl records the engine writes for that round (fleet.records.round_log_records)."""
    return round_log_records(round_log(devices, round_))


def records_seconds(devices: int, repeats: int = 5) -> float:
    """Median seconds of fleet.records.round_log_records: the engine's step before every run directory's
    append (RoundLog → records), the same for the baseline and this one."""
    log = round_log(devices, 1)
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        round_log_records(log)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


PARTS = ("metrics", "checkpoint", "state")


def one_round(run, round_: int, rows: list[dict], arrays) -> dict[str, float]:
    """Seconds of each part of one round's writes, as fleet.engine.RunRecorder does them."""
    t0 = time.perf_counter()
    run.append_metrics(rows)
    t1 = time.perf_counter()
    run.save_checkpoint(round_, arrays, {"momentum_vector/0": arrays["l0.lora_a"]})
    t2 = time.perf_counter()
    run.write_state({"rounds_completed": round_, "finished": False})
    t3 = time.perf_counter()
    return {"metrics": t1 - t0, "checkpoint": t2 - t1, "state": t3 - t2, "total": t3 - t0}


def fsyncs_per_round(run, round_: int, rows: list[dict], arrays) -> int:
    """How many fsync calls one round's writes make (counted on a round outside the timing)."""
    real, count = os.fsync, [0]

    def counting(fd):
        count[0] += 1
        return real(fd)

    os.fsync = counting
    try:
        one_round(run, round_, rows, arrays)
    finally:
        os.fsync = real
    return count[0]


def measure(devices: int, rounds: int, work: Path, baseline_cls) -> dict:
    arrays = adapters()
    runs = {"baseline": baseline_cls(work / f"baseline-{devices}"),
            "integrity": RunDir(work / f"integrity-{devices}")}
    for run in runs.values():
        run.create(TOML)
        run.save_checkpoint(0, arrays, {})
    rows = records(devices, 1)
    fsyncs = {name: fsyncs_per_round(run, 1, rows, arrays) for name, run in runs.items()}
    times: dict[str, list[dict[str, float]]] = {"baseline": [], "integrity": []}
    load_before = os.getloadavg()
    for r in range(2, rounds + 2):
        rows = records(devices, r)  # built outside the timing: the engine has them already
        order = ("baseline", "integrity") if r % 2 == 0 else ("integrity", "baseline")
        for name in order:
            gc.collect()  # the garbage of building the records is not the writer's cost
            os.sync()  # nor the other side's unsynced writes, which a journal commit would flush with ours
            times[name].append(one_round(runs[name], r, rows, arrays))
    load_after = os.getloadavg()
    runs["integrity"].unlock()
    base = [t["total"] for t in times["baseline"]]
    new = [t["total"] for t in times["integrity"]]
    extra = [n - b for n, b in zip(new, base)]
    return {"devices": devices, "rounds": rounds,
            "load_average_1_5_15min": {"before": [round(v, 2) for v in load_before],
                                       "after": [round(v, 2) for v in load_after]},
            "extra_s_per_round": statistics.median(extra),
            "extra_s_per_round_quartiles": [round(q, 6) for q in statistics.quantiles(extra, n=4)],
            "baseline_s_per_round": statistics.median(base), "integrity_s_per_round": statistics.median(new),
            "parts_s_per_round": {name: {part: statistics.median(t[part] for t in times[name]) for part in PARTS}
                                  for name in times},
            "fsyncs_per_round": fsyncs,
            "records_s_per_round": records_seconds(devices),
            "metrics_bytes_per_round": sum(len(encode_record(x)) for x in rows),
            "baseline_rounds_s": [round(t, 6) for t in base], "integrity_rounds_s": [round(t, 6) for t in new]}


def fleet_round_seconds() -> tuple[dict[int, float], str]:
    path = ROOT / "benchmarks/results/fleet_round.json"
    data = json.loads(path.read_text())
    return ({c["devices"]: c["edgefleet"]["seconds_per_round"] for c in data["configurations"]},
            f"{path.relative_to(ROOT)} (created {data.get('created', '?')})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds per configuration ({ROUNDS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds: at least 2 (the figure is a median over rounds)")
    round_s, round_source = fleet_round_seconds()
    baseline = baseline_runs()
    work = Path(tempfile.mkdtemp(prefix="run-integrity-", dir=ROOT / "benchmarks"))
    configurations = []
    try:
        for devices in args.devices:
            entry = measure(devices, args.rounds, work, baseline)
            shutil.rmtree(work / f"baseline-{devices}")
            shutil.rmtree(work / f"integrity-{devices}")
            if devices in round_s:
                entry["round_s_fleet_round_json"] = round_s[devices]
                entry["extra_share_of_round"] = entry["extra_s_per_round"] / round_s[devices]
            configurations.append(entry)
            print(json.dumps({k: v for k, v in entry.items() if not k.endswith("rounds_s")}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": "run_integrity", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "argv": sys.argv[1:], "baseline": f"fleet/runs.py at {BASELINE_COMMIT}",
              "statistic": "extra_s_per_round: median over rounds of (integrity - baseline) seconds of the same "
                           "round's writes, the two written one after the other in alternating order; "
                           "*_s_per_round and parts_s_per_round: medians over rounds",
              "round_seconds_from": round_source,
              "aim": {"extra_share_of_round_at_most": AIM_SHARE},
              "disk": "the repository's file system (benchmarks/run-integrity-*)",
              "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "configurations": configurations}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
