"""Seconds per federated round: edgefleet against a stock Flower simulation, same fleet, same machine.

The fleet: Deep-AE (640-128-128-128-128-8-128-128-128-128-640) with rank-4 LoRA adapters on all ten Linear
layers, N devices of "machine-sound" data (32 training + 32 test clips each, from ``fleet.data.device_data``),
fraction 1.0, one local SGD step at batch 32 (every device trains on its 32 samples once), then every device
evaluates the new global adapters. A round is train + aggregate + evaluate on all N devices, on both sides.

edgefleet
    ``fleet.engine.run_scenario`` on a scenario built with ``parse_scenario`` (fedit aggregation, 2 Ray
    device-host actors, 125 devices per call). Round times: the spacing of the per-round checkpoint files
    (checkpoint 0 is written just before round 1, checkpoint k at the end of round k, after aggregation and
    the round's metrics; the run directory is written on a writer thread, so the files' times follow the
    rounds' ends by the time the writes take, the same for every round); the summary's own
    ``timing.seconds_per_round`` is kept beside them. The scenario sets ``training.evaluate_after = false``:
    like the stock client, a device does not evaluate again after its step, so both systems do the same
    device work. (An edgefleet train job still reports each device's loss and AUC before its step, which it
    takes from the previous round's evaluation of the same adapters.) edgefleet's default — every device
    also evaluated after its step, for its per-round personalization numbers — is measured too, at
    ``--after-step-devices`` (1,000), and reported as ``edgefleet_with_after_step_evaluation``.
stock Flower
    ``flwr.simulation.run_simulation`` with a ``ServerApp`` running the stock ``FedAvg`` (fraction_train =
    fraction_evaluate = 1.0) and a ``ClientApp`` doing the same local work in PyTorch: the hand-written
    ``DeepAE`` of ``benchmarks/compiler_step.py`` (BatchNorm in eval mode) with ``LoraLinear`` adapters
    (only A/B trainable, A/B exchanged as the ArrayRecord), MSE loss, one ``torch.optim.SGD`` step on the 32
    training clips; evaluate returns the reconstruction loss of the 32 test clips. One CPU per client
    (``client_resources = {num_cpus: 1}``, ``torch.set_num_threads(1)``): two clients run at once. Each
    client process keeps its model and (like an edgefleet host) a bounded cache of device data, so the
    baseline pays neither twice. Round times: timestamps taken in ``evaluate_fn``, which the strategy calls
    once before round 1 and once after each round — the same mark edgefleet's engine uses.

seconds_per_round is the mean over the rounds after the first, on both sides: the first round carries
warm-up (stock Flower starts its client processes, which import torch, inside round 1; edgefleet starts its
hosts before the loop). The first round is reported apart, and the mean over all rounds too.
Every measurement runs in its own process (its own Ray instance), one after the other, after waiting (up
to ``--quiet-wait-s``) for other processes to leave the cores idle; the cores other processes used during
each measurement are recorded (``background_cores``): on a shared machine, read the figures with them.
``round_breakdown`` splits a round into device compute (edgefleet hosts / stock ClientApp code, per
parallel worker) and everything else (messages, serialization, scheduling, aggregation, bookkeeping).
device_samples_per_host_second = devices × 32 training samples / seconds_per_round;
speedup = stock seconds per round / edgefleet seconds per round at the same device count. A stock figure
for a device count that was not run is a straight line through the stock runs, labelled ``extrapolated``;
it is likely a lower bound (``STOCK_LINE_CAVEAT``: stock Flower's cost per round grows faster than N).

    python benchmarks/fleet_round.py                         # edgefleet 1,000 and 10,000; stock 1,000 and 2,000
    python benchmarks/fleet_round.py --stock-devices 1000 2000 10000   # stock 10,000 measured: ~25 min more
    python benchmarks/fleet_round.py --quick                 # 200 devices each, a smoke check
    python benchmarks/fleet_round.py --devices 1000 --stock-devices 1000 --out /tmp/r.json
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "fleet_round.json"
EDGEFLEET_DEVICES = (1000, 10000)
STOCK_DEVICES = (1000, 2000)
QUICK_DEVICES = 200
ROUNDS = 6                            # the first round carries warm-up; rounds 2.. are the figure
SAMPLES_PER_DEVICE = 32
RANK, ALPHA, LR, BATCH = 4, 8.0, 0.01, 32
# 125 devices a call: a pass's activations (~10 MB a tensor) stay nearer this machine's 32 MB L3 than at 250
# (1,000 devices, same code, interleaved runs: 0.87-0.99 s against 1.03-1.14 s per round; 10,000: the same)
HOST_ACTORS, DEVICES_PER_CALL = 2, 125
PRETRAIN_STEPS = 50                   # pretraining is not what is measured
CLIENT_CPUS = 1                       # stock: one CPU per ClientApp → two in parallel on two cores
DATA_CACHE_DEVICES = 4096             # stock client's data cache, the same bound as an edgefleet host's
RUN_TIMEOUT_S = 1800                  # deadline per measurement process
QUIET_CORES = 0.3                     # before a measurement: wait until other processes use fewer cores
QUIET_WAIT_S = 60.0                   # ... but no longer than this
AIM_SPEEDUP = 20.0                     # issue 8: at 1,000 devices
AIM_ROUND_S, AIM_ROUND_DEVICES = 15.0, 10000      # issue 8
STOCK_LINE_CAVEAT = ("likely a lower bound: Flower's simulation engine hands out messages by asking its in-memory "
                     "LinkState, node by node, for that node's messages, and each ask scans every stored message "
                     "(vce_api.add_messages_to_queue → InMemoryLinkState.get_message_ins), so its cost per round "
                     "grows faster than the device count")
AFTER_STEP = "edgefleet-after-step"   # edgefleet with its default after-step evaluation on
AFTER_STEP_DEVICES = (1000,)
ROUND_MARK = "fleet_round: round mark"  # a stock child prints one line per evaluate_fn call
LOG = logging.getLogger("fleet_round")


def scenario_dict(devices: int, rounds: int = ROUNDS, evaluate_after: bool = False) -> dict[str, Any]:
    return {"name": "bench", "seed": 0,
            "model": {"name": "deep-ae", "pretrain_steps": PRETRAIN_STEPS},
            "tuning": {"strategy": "lora", "rank": RANK, "alpha": ALPHA},
            "training": {"rounds": rounds, "fraction": 1.0, "local_steps": 1, "batch_size": BATCH, "lr": LR,
                         "evaluate_after": evaluate_after},
            "aggregation": {"strategy": "fedit"},
            "data": {"kind": "machine-sound", "samples_per_device": SAMPLES_PER_DEVICE,
                     "test_samples_per_device": SAMPLES_PER_DEVICE, "anomaly_fraction": 0.25},
            "fleet": {"groups": [{"name": "g", "count": devices, "target": "siracusa"}]},
            "ray": {"actors": HOST_ACTORS, "devices_per_call": DEVICES_PER_CALL}}


def _quiet() -> None:
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    warnings.filterwarnings("ignore")
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---- edgefleet -------------------------------------------------------------------------------------------
def run_edgefleet(devices: int, rounds: int, evaluate_after: bool = False) -> dict[str, Any]:
    from fleet.engine import run_scenario
    from fleet.runs import RunDir
    from fleet.scenario import parse_scenario

    scenario = parse_scenario(scenario_dict(devices, rounds, evaluate_after), source="fleet_round.py")
    with tempfile.TemporaryDirectory(prefix="edgefleet-run-") as run_dir:
        start = time.perf_counter()
        summary = run_scenario(scenario, run_dir, progress=False, log=lambda text: None)
        wall_s = time.perf_counter() - start
        run = RunDir(run_dir)
        marks = [run.checkpoint_path(r).stat().st_mtime for r in range(rounds + 1)]
        host = _host_seconds(run.metrics(), rounds)
    round_s = [b - a for a, b in zip(marks, marks[1:])]
    return {**round_figures(round_s),
            "summary_seconds_per_round": summary["timing"]["seconds_per_round"],
            "devices_trained": [r["devices_trained"] for r in summary["rounds"]],
            "train_loss": [r["train_loss"] for r in summary["rounds"]],
            "host_compute_seconds": host, "run_scenario_wall_seconds": wall_s,
            "summary_wall_seconds": summary["timing"]["wall_seconds"], "hosts": summary["hosts"]}


def round_figures(round_s: Sequence[float]) -> dict[str, Any]:
    """seconds_per_round: the mean over rounds after the first (the first pays warm-up: on the stock side
    Ray starts the client processes and they import torch in round 1; edgefleet starts its hosts before)."""
    steady = round_s[1:] or round_s
    return {"seconds_per_round": float(np.mean(steady)), "first_round_seconds": round_s[0],
            "mean_seconds_all_rounds": float(np.mean(round_s)), "round_seconds": list(round_s)}


def _host_seconds(records: Sequence[dict[str, Any]], rounds: int) -> dict[str, list[float]]:
    """Per round and kind: device-host time summed over devices (each device's share of its call), ÷ actors."""
    out: dict[str, list[float]] = {"train": [0.0] * rounds, "evaluate": [0.0] * rounds}
    for r in records:
        if r.get("type") == "device" and 1 <= r["round"] <= rounds:
            out[r["instruction"]][r["round"] - 1] += r["telemetry"]["wall_s"] / HOST_ACTORS
    return out


# ---- stock Flower: the ClientApp (pickled by reference, so each client process keeps its module state) ----
try:
    from flwr.clientapp import ClientApp

    client_app = ClientApp()
except ImportError:  # pragma: no cover - flwr is a dependency
    client_app = None


@functools.cache
def _torch_model() -> tuple[Any, dict[str, Any]]:
    """Deep-AE with LoRA on every Linear, BatchNorm in eval mode; built once per client process."""
    import torch
    from benchmarks.compiler_step import DeepAE, LoraLinear, _replace_module

    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = DeepAE().eval().requires_grad_(False)
    adapters: dict[str, Any] = {}
    for layer, m in list(module.named.items()):
        if isinstance(m, torch.nn.Linear):
            lora = LoraLinear(m, np.zeros((m.in_features, RANK), np.float32),
                              np.zeros((RANK, m.out_features), np.float32), ALPHA)
            _replace_module(module, m, lora)
            adapters[f"{layer}.lora_a"], adapters[f"{layer}.lora_b"] = lora.lora_a, lora.lora_b
    return module, adapters


@functools.cache
def _data_spec() -> Any:
    from fleet.scenario import parse_scenario
    return parse_scenario(scenario_dict(1)).data


@functools.lru_cache(maxsize=DATA_CACHE_DEVICES)
def _device_tensors(index: int) -> tuple[Any, Any]:
    import torch
    from fleet.data import device_data
    data = device_data(_data_spec(), 0, index)
    return torch.from_numpy(np.array(data.x_train)), torch.from_numpy(np.array(data.x_test))


def _load_adapters(msg: Any) -> tuple[Any, dict[str, Any]]:
    import torch
    module, adapters = _torch_model()
    record = msg.content["arrays"]
    with torch.no_grad():
        for name, param in adapters.items():
            param.copy_(torch.from_numpy(record[name].numpy()))
    return module, adapters


def _reply(msg: Any, arrays: dict[str, Any] | None, metrics: dict[str, Any]) -> Any:
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in arrays.items()})
    return Message(content=content, reply_to=msg)


if client_app is not None:
    @client_app.train()
    def stock_train(msg: Any, context: Any) -> Any:
        import torch
        import torch.nn.functional as F
        start = time.perf_counter()
        x_train, _ = _device_tensors(int(context.node_config["partition-id"]))
        data_s = time.perf_counter() - start
        module, adapters = _load_adapters(msg)
        optimizer = torch.optim.SGD(list(adapters.values()), lr=LR)
        for p in adapters.values():
            p.requires_grad_(True)
        optimizer.zero_grad()
        loss = F.mse_loss(module(x_train), x_train)
        loss.backward()
        optimizer.step()
        for p in adapters.values():
            p.requires_grad_(False)
        return _reply(msg, adapters, {"train-loss": float(loss), "num-examples": len(x_train),
                                      "data-s": data_s, "work-s": time.perf_counter() - start - data_s})

    @client_app.evaluate()
    def stock_evaluate(msg: Any, context: Any) -> Any:
        import torch
        import torch.nn.functional as F
        start = time.perf_counter()
        _, x_test = _device_tensors(int(context.node_config["partition-id"]))
        data_s = time.perf_counter() - start
        module, _ = _load_adapters(msg)
        with torch.no_grad():
            loss = F.mse_loss(module(x_test), x_test)
        return _reply(msg, None, {"eval-loss": float(loss), "num-examples": len(x_test),
                                  "data-s": data_s, "work-s": time.perf_counter() - start - data_s})


def initial_adapters(seed: int = 0) -> dict[str, np.ndarray]:
    """zero_b LoRA: A ~ N(0, 1/fan_in), B = 0, for every Linear of Deep-AE."""
    from compiler.zoo.deep_ae import DECODER_DIMS, ENCODER_DIMS
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for part, dims in (("encoder", ENCODER_DIMS), ("decoder", DECODER_DIMS)):
        for i, (fan_in, fan_out) in enumerate(zip(dims, dims[1:])):
            out[f"{part}.{i}.lora_a"] = (rng.standard_normal((fan_in, RANK)) / np.sqrt(fan_in)).astype(np.float32)
            out[f"{part}.{i}.lora_b"] = np.zeros((RANK, fan_out), np.float32)
    return out


def run_stock(devices: int, rounds: int) -> dict[str, Any]:
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    import benchmarks.fleet_round as module  # by its importable name: Ray ships the ClientApp by reference

    marks: list[float] = []
    results: list[Any] = []
    server_app = ServerApp()

    def mark(server_round: int, arrays: Any) -> None:
        marks.append(time.perf_counter())
        print(f"{ROUND_MARK} {server_round} {marks[-1] - start:.3f}", flush=True)  # the parent reads these

    @server_app.main()
    def server_main(grid: Any, context: Any) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=devices,
                          min_evaluate_nodes=devices, min_available_nodes=devices)
        initial = ArrayRecord({k: Array(v) for k, v in initial_adapters().items()})
        results.append(strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds,
                                      evaluate_fn=mark))

    backend = {"client_resources": {"num_cpus": CLIENT_CPUS, "num_gpus": 0.0},
               "init_args": {"num_cpus": os.cpu_count() or 1, "log_to_driver": False, "logging_level": "ERROR"}}
    start = time.perf_counter()
    run_simulation(server_app=server_app, client_app=module.client_app, num_supernodes=devices,
                   backend_config=backend)
    wall_s = time.perf_counter() - start
    if len(marks) != rounds + 1 or not results:
        raise RuntimeError(f"stock simulation did not finish {rounds} rounds ({len(marks) - 1} marks)")
    result = results[0]
    round_s = [b - a for a, b in zip(marks, marks[1:])]
    train = [dict(result.train_metrics_clientapp.get(r, {})) for r in range(1, rounds + 1)]
    evaluate = [dict(result.evaluate_metrics_clientapp.get(r, {})) for r in range(1, rounds + 1)]
    workers = max(1, (os.cpu_count() or 1) // CLIENT_CPUS)
    return {**round_figures(round_s), "startup_seconds": marks[0] - start, "run_simulation_wall_seconds": wall_s,
            "train_loss": [m.get("train-loss") for m in train],
            "eval_loss": [m.get("eval-loss") for m in evaluate],
            # mean per-client seconds × devices ÷ parallel clients: the share of the round spent in client code
            "client_compute_seconds": {
                "train": [m.get("work-s", 0.0) * devices / workers for m in train],
                "evaluate": [m.get("work-s", 0.0) * devices / workers for m in evaluate],
                "data": [(t.get("data-s", 0.0) + e.get("data-s", 0.0)) * devices / workers
                         for t, e in zip(train, evaluate)]}}


# ---- driver ----------------------------------------------------------------------------------------------
def child(system: str, devices: int, rounds: int, result_path: Path) -> int:
    _quiet()
    if system == "stock":
        result = run_stock(devices, rounds)
    else:
        result = run_edgefleet(devices, rounds, evaluate_after=system == AFTER_STEP)
    result_path.write_text(json.dumps(result))
    return 0


class Background:
    """CPU seconds used by processes outside the measured process's session (other users of the machine),
    sampled from /proc every ``interval_s``; a process that exits between samples loses at most one interval."""

    def __init__(self, exclude_session: int | None = None, interval_s: float = 1.0):
        self.exclude = {exclude_session, os.getsid(0)} - {None}
        self.interval_s = interval_s
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._start = time.perf_counter()
        self._elapsed = 0.0

    def __enter__(self) -> "Background":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.interval_s)
        self._elapsed = time.perf_counter() - self._start

    @property
    def cores(self) -> float:
        """Average cores the other processes kept busy."""
        return self.cpu_s / max(self._elapsed or (time.perf_counter() - self._start), 1e-9)

    def _loop(self) -> None:
        last = _cpu_by_pid(self.exclude)
        while not self._stop.wait(self.interval_s):
            now = _cpu_by_pid(self.exclude)
            self.cpu_s += sum(max(0.0, t - last.get(pid, 0.0)) for pid, t in now.items())  # new pid: born since
            last = now


def _cpu_by_pid(exclude_sessions: set[int]) -> dict[int, float]:
    """utime + stime (seconds) of every process not in ``exclude_sessions``."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) in exclude_sessions:  # field 6 of stat: session id
            continue
        out[int(entry)] = (int(fields[11]) + int(fields[12])) / tick  # fields 14, 15: utime, stime
    return out


def wait_for_quiet(max_wait_s: float, busy_cores: float = QUIET_CORES, sample_s: float = 5.0) -> float:
    """Wait (at most ``max_wait_s``) until other processes use under ``busy_cores``; returns what they used."""
    deadline = time.monotonic() + max_wait_s
    while True:
        with Background() as bg:
            time.sleep(sample_s)
        if bg.cores < busy_cores or time.monotonic() >= deadline:
            return bg.cores
        LOG.info("  machine busy (%.1f cores used by other processes); waiting", bg.cores)


def measure(system: str, devices: int, rounds: int, timeout_s: float) -> dict[str, Any]:
    """One measurement in a fresh process (its own Ray instance); killed with its children at the deadline."""
    with tempfile.TemporaryDirectory(prefix="fleet-round-") as tmp:
        result_path = Path(tmp) / "result.json"
        ray_tmp = Path(tmp) / "ray"
        ray_tmp.mkdir()
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_TMPDIR": str(ray_tmp),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "PYTHONWARNINGS": "ignore", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, str(devices),
               "--rounds", str(rounds), "--result", str(result_path)]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        output: list[bytes] = []
        reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
        reader.start()
        with Background(exclude_session=proc.pid) as background:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                reader.join(timeout=5)
                return {"error": f"timed out after {timeout_s:.0f} s", **partial_rounds(output, timeout_s)}
            finally:
                reader.join(timeout=5)
        process_s = time.perf_counter() - start
        if proc.returncode != 0 or not result_path.exists():
            tail = b"".join(output).decode(errors="replace").strip().splitlines()[-15:]
            return {"error": f"exit code {proc.returncode}", "output_tail": tail}
        return {**json.loads(result_path.read_text()), "process_seconds": process_s,
                "background_cores": background.cores}


def partial_rounds(output: Sequence[bytes], timeout_s: float) -> dict[str, Any]:
    """What a stock run that hit its deadline had finished: its round marks (seconds since start)."""
    marks = [float(line.split()[-1]) for line in b"".join(output).decode(errors="replace").splitlines()
             if line.startswith(ROUND_MARK)]
    if not marks:
        return {"rounds_completed": 0}
    round_s = [b - a for a, b in zip(marks, marks[1:])]
    return {"rounds_completed": len(round_s), "startup_seconds": marks[0], "round_seconds": round_s,
            # the round under way when the deadline came had already lasted this long
            "unfinished_round_seconds_at_least": timeout_s - marks[-1]}


def per_second(devices: int, seconds_per_round: float) -> float:
    return devices * SAMPLES_PER_DEVICE / seconds_per_round


def stock_line(measured: dict[int, float]) -> tuple[float, float] | None:
    """Least-squares seconds_per_round = intercept + slope × devices through the stock runs (one run: through 0)."""
    if not measured:
        return None
    n = np.array(sorted(measured), float)
    s = np.array([measured[int(k)] for k in n])
    if len(n) == 1:
        return 0.0, float(s[0] / n[0])
    slope, intercept = np.polyfit(n, s, 1)
    return float(intercept), float(slope)


def machine() -> dict[str, Any]:
    import flwr
    import ray
    import torch
    from benchmarks.compiler_step import _cpu_model
    return {"cpu_count": os.cpu_count(), "processor": _cpu_model(), "python": platform.python_version(),
            "platform": platform.platform(), "numpy": np.__version__, "torch": torch.__version__,
            "flwr": flwr.__version__, "ray": ray.__version__,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def compute_share(system: str, r: dict[str, Any]) -> dict[str, float]:
    """Mean over the steady rounds: seconds of device compute (hosts or ClientApps, per parallel worker) and
    the rest of the round (messages, serialization, scheduling, aggregation, bookkeeping)."""
    if system != "stock":
        parts = r["host_compute_seconds"]
    else:
        parts = {k: r["client_compute_seconds"][k] for k in ("train", "evaluate", "data")}
    steady = slice(1, None) if len(r["round_seconds"]) > 1 else slice(None)
    out = {f"{k}_s": float(np.mean(v[steady])) for k, v in parts.items()}
    out["other_s"] = r["seconds_per_round"] - sum(out.values())
    return out


def entry(system: str, devices: int, r: dict[str, Any]) -> dict[str, Any]:
    if "error" in r:
        return {"error": r["error"], "details": r}
    return {"seconds_per_round": r["seconds_per_round"],
            "device_samples_per_host_second": per_second(devices, r["seconds_per_round"]),
            "first_round_seconds": r["first_round_seconds"], "mean_seconds_all_rounds": r["mean_seconds_all_rounds"],
            "measured": True, "background_cores": r["background_cores"],
            "round_breakdown": compute_share(system, r), "details": r}


def report(edge: dict[int, dict], stock: dict[int, dict], rounds: int, source: dict[str, Any],
           after: dict[int, dict] | None = None) -> dict[str, Any]:
    stock_s = {n: r["seconds_per_round"] for n, r in stock.items() if "error" not in r}
    line = stock_line(stock_s)
    configurations = []
    for n in sorted(set(edge) | set(stock)):
        row: dict[str, Any] = {"devices": n, "samples_per_device": SAMPLES_PER_DEVICE}
        if n in edge:
            row["edgefleet"] = entry("edgefleet", n, edge[n])
        if n in (after or {}):
            row["edgefleet_with_after_step_evaluation"] = entry(AFTER_STEP, n, after[n])
        if n in stock:
            row["stock_flower"] = entry("stock", n, stock[n])
        if n not in stock_s and line is not None:
            sec = line[0] + line[1] * n
            row["stock_flower"] = {"seconds_per_round": sec, "device_samples_per_host_second": per_second(n, sec),
                                   "measured": False, "extrapolated": True,
                                   "from": f"straight line through the stock runs at {sorted(stock_s)} devices: "
                                           f"{line[0]:.2f} s + {line[1] * 1000:.2f} s per 1,000 devices",
                                   "caveat": STOCK_LINE_CAVEAT}
            if n in stock:
                row["stock_flower"]["failed_run"] = stock[n]
        e, st = row.get("edgefleet", {}), row.get("stock_flower", {})
        if "seconds_per_round" in e and "seconds_per_round" in st:
            row["speedup"] = st["seconds_per_round"] / e["seconds_per_round"]
            row["speedup_extrapolated"] = not st["measured"]
            if st["measured"]:
                row["speedup_all_rounds"] = st["mean_seconds_all_rounds"] / e["mean_seconds_all_rounds"]
        a = row.get("edgefleet_with_after_step_evaluation", {})
        if "seconds_per_round" in a and "seconds_per_round" in st:
            row["speedup_with_after_step_evaluation"] = st["seconds_per_round"] / a["seconds_per_round"]
        configurations.append(row)
    speedups = [r["speedup"] for r in configurations if "speedup" in r and not r["speedup_extrapolated"]]
    at_aim = next((r for r in configurations if r["devices"] == AIM_ROUND_DEVICES and
                   "seconds_per_round" in r.get("edgefleet", {})), None)
    return {
        "benchmark": "fleet_round", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
        "machine": machine(),
        "source": source,
        "setup": {"scenario": scenario_dict(0, rounds) | {"fleet": "groups[0].count = devices"},
                  "round": "train (1 SGD step, batch 32, on 32 samples) + aggregate + evaluate (32 test "
                           "samples), every device, both systems (edgefleet: training.evaluate_after = false; "
                           "edgefleet_with_after_step_evaluation: true, each device also evaluated after its step)",
                  "seconds_per_round": f"mean over rounds 2..{rounds} (round 1 is reported apart as "
                                       "first_round_seconds; mean_seconds_all_rounds includes it)",
                  "stock": {"strategy": "flwr.serverapp.strategy.FedAvg(fraction_train=1.0, fraction_evaluate=1.0)",
                            "client_resources": {"num_cpus": CLIENT_CPUS}, "torch_threads": 1,
                            "timing": "evaluate_fn timestamps (before round 1, after each round)"},
                  "edgefleet": {"timing": "checkpoint file times (checkpoint k closes round k); "
                                          "details.summary_seconds_per_round is the engine's own mean over all rounds",
                                "actors": HOST_ACTORS, "devices_per_call": DEVICES_PER_CALL},
                  "device_samples_per_host_second": "devices × 32 training samples / seconds_per_round "
                                                    "(the round also evaluates 32 test samples per device)",
                  "background_cores": "average cores other processes on the machine used during the measurement"},
        "configurations": configurations,
        "aims": {"speedup_at_least": AIM_SPEEDUP,
                 "speedup_measured_min": min(speedups) if speedups else None,
                 "speedup_met": bool(speedups) and min(speedups) >= AIM_SPEEDUP,
                 "round_seconds_at_most": AIM_ROUND_S, "round_devices": AIM_ROUND_DEVICES,
                 "round_seconds_measured": at_aim["edgefleet"]["seconds_per_round"] if at_aim else None,
                 "round_met": (at_aim["edgefleet"]["seconds_per_round"] <= AIM_ROUND_S) if at_aim else None},
    }


def source_state() -> dict[str, Any]:
    """The commit measured and the files that differed from it (the working tree is what ran)."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
            return done.stdout.rstrip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": git("rev-parse", "HEAD"), "modified": git("status", "--porcelain").splitlines(),
            "diff_sha256": hashlib.sha256(git("diff", "HEAD").encode()).hexdigest()}


def print_table(result: dict[str, Any]) -> None:
    nan = float("nan")
    print(f"{'devices':>8} | {'edgefleet s/round':>17} {'samples/s':>9} {'1st round':>9} | "
          f"{'stock s/round':>13} {'samples/s':>9} {'1st round':>9} | {'speedup':>7}")
    for row in result["configurations"]:
        e, s = row.get("edgefleet", {}), row.get("stock_flower", {})
        mark = "*" if s and not s.get("measured", True) else " "
        print(f"{row['devices']:>8} | {e.get('seconds_per_round', nan):>17.2f} "
              f"{e.get('device_samples_per_host_second', nan):>9.0f} {e.get('first_round_seconds', nan):>9.2f} | "
              f"{s.get('seconds_per_round', nan):>12.2f}{mark} {s.get('device_samples_per_host_second', nan):>9.0f} "
              f"{s.get('first_round_seconds', nan):>9.2f} | {row.get('speedup', nan):>6.1f}{mark}")
    print("s/round: mean of rounds after the first; * extrapolated from the stock runs")
    for row in result["configurations"]:
        a = row.get("edgefleet_with_after_step_evaluation", {})
        if "seconds_per_round" in a:
            print(f"with edgefleet's default after-step evaluation: {a['seconds_per_round']:.2f} s/round at "
                  f"{row['devices']} devices ({row.get('speedup_with_after_step_evaluation', nan):.1f}x stock)")
    aims = result["aims"]
    print(f"aims: speedup >= {aims['speedup_at_least']:g} (measured min {aims['speedup_measured_min']}); "
          f"{aims['round_devices']} devices <= {aims['round_seconds_at_most']:g} s/round "
          f"(measured {aims['round_seconds_measured']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=list(EDGEFLEET_DEVICES),
                        help="edgefleet device counts")
    parser.add_argument("--stock-devices", type=int, nargs="*", default=list(STOCK_DEVICES),
                        help="stock Flower device counts actually run (others are extrapolated)")
    parser.add_argument("--after-step-devices", type=int, nargs="*", default=list(AFTER_STEP_DEVICES),
                        help="edgefleet device counts also run with the after-step evaluation on (its default)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_DEVICES} devices each, a smoke check")
    parser.add_argument("--timeout-s", type=float, default=RUN_TIMEOUT_S, help="deadline per measurement")
    parser.add_argument("--quiet-wait-s", type=float, default=QUIET_WAIT_S,
                        help="before each measurement, wait up to this long for other processes to go idle")
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "DEVICES"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], int(args.child[1]), args.rounds, args.result)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.devices, args.stock_devices, args.after_step_devices = [QUICK_DEVICES], [QUICK_DEVICES], []
    source = {"at_start": source_state()}  # the working tree may change under a long run (shared checkouts)
    edge: dict[int, dict] = {}
    stock: dict[int, dict] = {}
    after: dict[int, dict] = {}
    for system, counts, table in (("edgefleet", args.devices, edge), (AFTER_STEP, args.after_step_devices, after),
                                  ("stock", args.stock_devices, stock)):
        for n in counts:
            LOG.info("%s, %d devices, %d rounds ...", system, n, args.rounds)
            before = wait_for_quiet(args.quiet_wait_s)
            table[n] = {**measure(system, n, args.rounds, args.timeout_s), "background_cores_before": before}
            r = table[n]
            LOG.info("  %s", r.get("error") or f"{r['seconds_per_round']:.2f} s per round, first round "
                     f"{r['first_round_seconds']:.2f} s ({r['process_seconds']:.0f} s in all; other processes "
                     f"used {r['background_cores']:.2f} cores meanwhile)")
    source["at_end"] = source_state()
    source["changed_during_run"] = source["at_end"] != source["at_start"]
    result = report(edge, stock, args.rounds, source, after)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"wrote {args.out}")
    return 0 if not any("error" in r for r in (*edge.values(), *after.values(), *stock.values())) else 1


if __name__ == "__main__":
    sys.exit(main())
