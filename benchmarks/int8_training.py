"""int8 training with QAS (issue 13, deliverable 4): accuracy, memory and cycles per step of fp32 full, fp32 LoRA,
fp32 sparse, int8 sparse with QAS and int8 sparse without QAS — same steps, same data, same learning rate.

Two tasks, each a pretrained fp32 base (full training in the numpy executor) personalized on a device's data:
- digits: the fleet's digits personalization task (fleet.data: each device a writer with its own rotation, slant,
  scale, stroke, contrast, noise and label mix); base pretrained on the non-personalized pool; averaged over
  DIGITS_DEVICES devices. Model: a small DS-CNN-style CNN for 8×8 digits built here (``digits_cnn``), since
  int8 training covers CNNs as TTE does (cct-digits' attention and LayerNorm have no quantized form).
- keywords: ds-cnn on the synthetic keywords (compiler/zoo/task_data.py), base pretrained on them; the device is
  a new speaker/microphone: a fixed per-coefficient gain and offset on the MFCCs.

Sparse scheme: ``choose_sparse`` (contribution analysis on the pretrained base and the device's training data)
for SPARSE_BUDGET_KIB at batch 1; the int8 runs use the same scheme on the int8 form, calibrated on the
device's training data. int8 variants: QAS on, QAS off (both updating int8 weights in place, rounded), and QAS with
float32 master copies of the updated channels. Memory: the compiled program's total (parameters + arena) at
batch 1; cycles per step: the cost model on ``siracusa`` and ``siracusa-256k`` (256 KiB of L2 for the program);
for fp32 sparse and int8 sparse, the instructions per step the built firmware executes on QEMU (rv32imf).

    python benchmarks/int8_training.py    # writes benchmarks/results/int8_training.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler import zoo  # noqa: E402
from compiler.autodiff import SGDConfig  # noqa: E402
from compiler.frontend import import_onnx  # noqa: E402
from compiler.ir import Graph  # noqa: E402
from compiler.pipeline import CompileOptions, compile_graph  # noqa: E402
from compiler.quantize import Int8Options  # noqa: E402
from compiler.sparse_search import TaskData, choose_sparse  # noqa: E402
from compiler.targets import load_target, lower_to_target  # noqa: E402
from compiler.tuning import TuningSpec  # noqa: E402
from compiler.zoo._graph import INPUT_NAME, OUTPUT_NAME, GraphBuilder  # noqa: E402
from compiler.zoo.task_data import task_data  # noqa: E402
from device_runtime import NumpyDevice  # noqa: E402
from fleet.data import device_data, global_dataset  # noqa: E402
from fleet.scenario import DataSpec  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "int8_training.json"
SEED = 0
SPARSE_BUDGET_KIB = {"digits": 24, "keywords": 256}  # digits: the whole CNN trains in 28.5 KiB
PRETRAIN = {"digits": dict(steps=600, batch=32, lr=0.05), "keywords": dict(steps=400, batch=32, lr=0.02)}
TUNE = {"digits": dict(steps=256, lr=0.02), "keywords": dict(steps=256, lr=0.005)}  # batch 1, plain SGD
DIGITS_DEVICES = 4
DIGITS_DATA = DataSpec(kind="digits", dirichlet_alpha=0.5, samples_per_device=128, test_samples_per_device=128,
                       writer_strength=1.0)
LORA = {"strategy": "lora", "rank": 4, "targets": ["*"]}
TARGETS = ("siracusa", "siracusa-256k")
QEMU_VARIANTS = ("fp32 sparse", "int8 sparse QAS")
QEMU_STEPS = 2


def digits_cnn(seed: int = 0):
    """A DS-CNN-style CNN for 8×8 digits: conv 3×3 1→16, then depthwise 3×3 (stride 2) + pointwise 16→32 and
    depthwise 3×3 + pointwise 32→32, each with BatchNorm + ReLU; global average pooling; classifier 32→10."""
    g = GraphBuilder("cnn-digits", seed)

    def bn_relu(layer, x, c):
        return g.relu(layer, g.batch_norm(f"{layer}.bn", x, c, 1e-3))
    x = bn_relu("conv0", g.conv("conv0", INPUT_NAME, 1, 16, (3, 3), pads=(1, 1, 1, 1)), 16)
    x = bn_relu("blocks.0.dw", g.conv("blocks.0.dw", x, 16, 16, (3, 3), (2, 2), (1, 1, 1, 1), group=16), 16)
    x = bn_relu("blocks.0.pw", g.conv("blocks.0.pw", x, 16, 32, (1, 1)), 32)
    x = bn_relu("blocks.1.dw", g.conv("blocks.1.dw", x, 32, 32, (3, 3), pads=(1, 1, 1, 1), group=32), 32)
    x = bn_relu("blocks.1.pw", g.conv("blocks.1.pw", x, 32, 32, (1, 1)), 32)
    x = g.node("GlobalAveragePool", [x], "pool/GlobalAveragePool")
    x = g.node("Flatten", [x], "pool/Flatten", axis=1)
    g.gemm("classifier", x, 32, 10, output=OUTPUT_NAME)
    return g.finish((1, 8, 8), (10,), doc="cnn-digits")


@dataclass
class Task:
    name: str
    model: object
    x_pre: np.ndarray
    y_pre: np.ndarray
    devices: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # (x_train, y_train, x_test, y_test)


def tasks() -> list[Task]:
    data = global_dataset(DIGITS_DATA, SEED, n_train=4096)
    digits = Task("digits", digits_cnn(SEED), data.x_train, data.y_train,
                  [(d.x_train, d.y_train, d.x_test, d.y_test)
                   for d in (device_data(DIGITS_DATA, SEED, k) for k in range(DIGITS_DEVICES))])
    x_pre, y_pre = task_data("ds-cnn", 4096, seed=SEED)
    speaker = np.random.default_rng(77)
    gain, offset = speaker.uniform(0.7, 1.3, 10).astype(np.float32), speaker.normal(0, 0.5, 10).astype(np.float32)
    x_tr, y_tr = task_data("ds-cnn", 256, seed=10)
    x_te, y_te = task_data("ds-cnn", 512, seed=11)
    keywords = Task("keywords", zoo.build("ds-cnn", SEED), x_pre, y_pre,
                    [(x_tr * gain + offset, y_tr, x_te * gain + offset, y_te)])
    return [digits, keywords]


def pretrained(task: Task) -> dict[str, np.ndarray]:
    p = PRETRAIN[task.name]
    graph = import_onnx(task.model, p["batch"])
    program = compile_graph(graph, CompileOptions(TuningSpec("full"), p["batch"], sgd=SGDConfig(p["lr"], 0.9)),
                            task.name, "classification")
    device = NumpyDevice(program)
    order = np.random.default_rng(SEED).permutation(len(task.x_pre))
    result = device.train(task.x_pre[order], task.y_pre[order], p["steps"])
    print(f"{task.name}: pretrained {p['steps']} steps, loss {result.losses[:20].mean():.3f} → "
          f"{result.losses[-20:].mean():.3f}", flush=True)
    return result.params


def accuracy(device, x, y) -> float:
    return float(np.mean(device.evaluate(x, y).outputs.argmax(axis=1) == y))


def variants(scheme: tuple[tuple[str, str], ...], calibration: np.ndarray) -> dict[str, tuple[TuningSpec, object]]:
    sparse = TuningSpec("sparse", sparse=scheme)
    return {"fp32 full": (TuningSpec("full"), None), "fp32 LoRA": (TuningSpec.parse(LORA), None),
            "fp32 sparse": (sparse, None),
            "int8 sparse QAS": (sparse, Int8Options(calibration, qas=True)),
            "int8 sparse no QAS": (sparse, Int8Options(calibration, qas=False)),
            "int8 sparse QAS, fp32 masters": (sparse, Int8Options(calibration, qas=True, update="master"))}


def run_task(task: Task) -> dict:
    base = pretrained(task)
    graph = import_onnx(task.model, 1)
    graph = graph.replace(values={**graph.values, **{k: v for k, v in base.items() if k in graph.values}})
    tune = TUNE[task.name]
    options = CompileOptions(TuningSpec("full"), 1, sgd=SGDConfig(tune["lr"]))
    x0, y0 = task.devices[0][0], task.devices[0][1]
    choice, _ = choose_sparse(graph, options, SPARSE_BUDGET_KIB[task.name] * 1024, TaskData.split(x0, y0, seed=SEED),
                              task.name, "classification")
    print(f"{task.name}: sparse scheme for {SPARSE_BUDGET_KIB[task.name]} KiB: {list(choice.scheme)}", flush=True)
    rows = {}
    for k, (x_tr, y_tr, x_te, y_te) in enumerate(task.devices):
        for name, (tuning, int8) in variants(choice.scheme, x_tr).items():
            program = compile_graph(graph, CompileOptions(tuning, 1, sgd=SGDConfig(tune["lr"]), int8=int8),
                                    task.name, "classification")
            device = NumpyDevice(program)
            before = accuracy(device, x_te, y_te)
            order = np.random.default_rng([SEED, k]).permutation(len(x_tr))
            start = time.perf_counter()
            result = device.train(x_tr[order], y_tr[order], tune["steps"])
            after = accuracy(device, x_te, y_te)
            row = rows.setdefault(name, {"before": [], "after": [], "final_loss": [], "wall_s": []})
            row["before"].append(before)
            row["after"].append(after)
            row["final_loss"].append(float(result.losses[-32:].mean()))
            row["wall_s"].append(time.perf_counter() - start)
            if k == 0:
                row.update(cost(program))
                if name in QEMU_VARIANTS:
                    row["rv32_qemu_instructions_per_step"] = qemu_instructions(program, x_tr, y_tr)
            print(f"{task.name} device {k} {name:30} accuracy {before:.3f} → {after:.3f}", flush=True)
    for row in rows.values():
        row["accuracy_before"] = float(np.mean(row["before"]))
        row["accuracy_after"] = float(np.mean(row["after"]))
    fp32, qas, no_qas = (rows[n]["accuracy_after"] for n in ("fp32 sparse", "int8 sparse QAS", "int8 sparse no QAS"))
    gap = fp32 - no_qas
    return {"task": task.name, "sparse_scheme": [list(p) for p in choice.scheme],
            "sparse_budget_kib": SPARSE_BUDGET_KIB[task.name], "pretrain": PRETRAIN[task.name], "tune": tune,
            "devices": len(task.devices), "variants": rows,
            "qas_closes_gap": None if gap <= 0 else round((qas - no_qas) / gap, 3)}


def qemu_instructions(program, x, y) -> int | None:
    """Instructions per training step of the built firmware on QEMU (rv32imf, minstret around each step): what
    the plain C kernels execute, int8 against fp32 (scalar here: no XpulpV2 in this build). None without QEMU."""
    import shutil
    import tempfile

    from device_runtime.qemu import QemuDevice
    if shutil.which("qemu-system-riscv32") is None:
        return None
    with tempfile.TemporaryDirectory() as work:
        result = QemuDevice(program, work, timeout_s=600).train(x, y, QEMU_STEPS)
    return int(result.telemetry.instructions // QEMU_STEPS)


def cost(program) -> dict:
    out = {"trainable_params": program.report["params"]["trainable"],
           "total_bytes": program.report["memory"]["total_bytes"],
           "fits_256k": program.report["memory"]["total_bytes"] <= 256 * 1024}
    for name in TARGETS:
        out[f"{name}_cycles_per_step"] = lower_to_target(program, load_target(name)).report["perf"]["cycles_per_step"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--task", choices=("digits", "keywords"), action="append")
    args = parser.parse_args(argv)
    results = [run_task(t) for t in tasks() if not args.task or t.name in args.task]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": __doc__.splitlines()[0], "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
