"""The executor's direct kernels (``Op.forward_into`` overrides writing into the planned views) give bitwise the
same training and evaluation as the default path (``forward`` into a temporary, then ``np.copyto``).

Every zoo model × {full, last-1 (not deep-ae), LoRA with random factors} × {plain SGD, momentum + weight decay}
× batch {1, 4}: five training steps and one evaluation on two devices, one forced onto the default path.

    python benchmarks/check_direct_kernels.py
"""
from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler import zoo  # noqa: E402
from compiler.ops import Op, get_op  # noqa: E402
from compiler.pipeline import compile_model  # noqa: E402
from compiler.program import Phase  # noqa: E402
from device_runtime import NumpyDevice  # noqa: E402
from device_runtime.numpy_executor import PhaseRunner  # noqa: E402

STRATEGIES = {"full": "full", "last-1": "last-1", "lora": {"strategy": "lora", "rank": 4, "init": "random"}}
OPTIMIZERS = ((0.0, 0.0), (0.9, 1e-3))  # (momentum, weight_decay)
BATCHES = (1, 4)
STEPS = 5


def force_default(runner: PhaseRunner, phase: Phase) -> None:
    steps = [s for s in phase.steps if not get_op(s.op).view]
    runner.calls = [(functools.partial(Op.forward_into, get_op(s.op)), *call[1:])
                    for call, s in zip(runner.calls, steps, strict=True)]


def direct_count(runner: PhaseRunner) -> int:
    return sum(not isinstance(call[0], functools.partial) for call in runner.calls)


def main() -> int:
    for model, (name, spec), (momentum, wd), batch in itertools.product(zoo.names(), STRATEGIES.items(),
                                                                        OPTIMIZERS, BATCHES):
        if model == "deep-ae" and name == "last-1":
            continue  # no blocks; covered by full
        program = compile_model(model, spec, batch=batch, momentum=momentum, weight_decay=wd)
        entry = zoo.ZOO[model]
        rng = np.random.default_rng(3)
        x = rng.normal(size=(3 * batch, *entry.input_shape)).astype(np.float32)
        y = rng.integers(0, entry.num_classes, 3 * batch) if entry.task == "classification" else None
        direct, default = NumpyDevice(program), NumpyDevice(program)
        force_default(default.trainer, program.train)
        force_default(default.evaluator, program.evaluate)
        a, b = direct.train(x, y, STEPS), default.train(x, y, STEPS)
        where = f"{model} {name} momentum={momentum} batch={batch}"
        assert np.array_equal(a.losses, b.losses), where
        for key, view in direct.param_views.items():  # trained parameters and momentum buffers
            assert np.array_equal(view, default.param_views[key]), f"{where}: {key}"
        ea, eb = direct.evaluate(x, y), default.evaluate(x, y)
        assert np.array_equal(ea.outputs, eb.outputs) and ea.loss == eb.loss, where
        print(f"{where}: bitwise equal ({direct_count(direct.trainer)}/{len(direct.trainer.calls)} train kernels "
              "direct)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
