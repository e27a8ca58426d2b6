"""The living definition: a plain interpreter of the IR, no memory plan, any float dtype.

Other executors (the arena executor, the C kernels, QEMU) are tested against it, and it is tested
against onnxruntime and PyTorch.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from compiler.ir import CompileError, Graph
from compiler.ops import get_op


def evaluate(graph: Graph, feeds: Mapping[str, np.ndarray], dtype: str | None = None,
             values: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Run every node in order; returns every tensor's value. ``dtype`` recasts float tensors (e.g.
    float64 for tight gradient checks). SGD nodes update their parameters in the returned dict."""
    def cast(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        return a.astype(dtype) if dtype and a.dtype.kind == "f" else a

    env = {k: cast(v) for k, v in (values if values is not None else graph.values).items()}
    for name in graph.inputs:
        if name not in feeds:
            raise CompileError(f"missing input {name!r}")
    env.update({k: cast(v) for k, v in feeds.items()})
    for node in graph.nodes:
        op = get_op(node.op)
        args = [env[i] for i in node.inputs]
        try:
            results = op.run(args, dict(node.attrs))
        except CompileError:
            raise
        except Exception as exc:  # name the node in any kernel error
            raise CompileError(f"node {node.name!r} ({node.op}) failed: {exc}") from exc
        if op.updates:
            for index, value in zip(op.updates, results):
                env[node.inputs[index]] = value
        else:
            for name, value in zip(node.outputs, results):
                env[name] = value
    return env
