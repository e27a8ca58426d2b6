"""The compiler as a straight, named list of passes:

    import_onnx → apply_tuning → add_loss → differentiate (+ SGD placement) → plan_memory → Program
    [→ lower_to_target → codegen → build]   (compiler.targets / compiler.codegen, when a target is given)
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx

from compiler import zoo
from compiler.autodiff import SGDConfig, differentiate, optimizer_config
from compiler.device_axis import add_device_axis, per_device_tensors, scale_loss
from compiler.frontend import import_onnx
from compiler.ir import CompileError, Graph, Node, Role, TensorSpec
from compiler.ops import UPDATE_OPS, get_op
from compiler.plan import MemoryPlan, check_plan, plan_memory
from compiler.program import Phase, Program, Step, TensorInfo
from compiler.quantize import Int8Options, quantize_graph
from compiler.report import build_report, layer_table
from compiler.tuning import TuningSpec, apply_tuning

LOSSES = ("auto", "cross_entropy", "mse", "mse_input")
LABEL = "labels"


@dataclass(frozen=True)
class CompileOptions:
    tuning: TuningSpec = field(default_factory=lambda: TuningSpec("lora"))
    batch: int = 8
    loss: str = "auto"
    sgd: SGDConfig = field(default_factory=SGDConfig)
    devices: int = 1  # device axis: one program trains this many devices at once (import with batch·devices)
    int8: Int8Options | None = None  # train the int8 form of the model (compiler/quantize.py)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise CompileError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise CompileError(f"batch must be an integer >= 1, got {self.batch!r}")
        if self.int8 is not None and self.devices != 1:
            raise CompileError("int8 programs train one device each (devices = 1)")


def load_model(model: str | os.PathLike | onnx.ModelProto, seed: int = 0) -> tuple[onnx.ModelProto | str, str, str]:
    """(model or path, display name, task hint) from a zoo name, an ONNX path or a ModelProto."""
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "model", "auto"
    text = os.fspath(model)
    if text in zoo.names():
        entry = zoo.ZOO[text]
        return zoo.build(text, seed), text, entry.task
    if not text.endswith(".onnx") and not os.path.exists(text):
        raise CompileError(f"unknown model {text!r}: not a file and not a zoo model ({', '.join(zoo.names())})")
    return text, os.path.basename(text), "auto"


def add_loss(graph: Graph, loss: str, task_hint: str = "auto") -> tuple[Graph, str, str, str]:
    """Append the loss node. Returns (graph, loss tensor, label feed or '', task)."""
    if len(graph.outputs) != 1:
        raise CompileError(f"the model must have exactly one output to train, it has {len(graph.outputs)}")
    out = graph.outputs[0]
    out_spec, in_spec = graph.tensors[out], graph.tensors[graph.inputs[0]]
    if loss == "auto":
        if task_hint == "reconstruction" or (task_hint == "auto" and out_spec.shape == in_spec.shape):
            loss = "mse_input"
        elif task_hint == "regression":
            loss = "mse"
        else:
            loss = "cross_entropy"
    tensors = dict(graph.tensors)
    inputs = list(graph.inputs)
    if loss == "cross_entropy":
        if len(out_spec.shape) != 2:
            raise CompileError(f"cross-entropy needs (batch, classes) logits; output {out!r} has shape "
                               f"{out_spec.shape}")
        label, task = LABEL, "classification"
        tensors[label] = TensorSpec(label, out_spec.shape[:1], "int64", Role.LABEL)
        inputs.append(label)
        node = Node("loss", "SoftmaxCrossEntropy", (out, label), ("loss",), {}, "forward", "loss")
    elif loss == "mse":
        label, task = LABEL, "regression"
        tensors[label] = TensorSpec(label, out_spec.shape, "float32", Role.LABEL)
        inputs.append(label)
        node = Node("loss", "MSELoss", (out, label), ("loss",), {}, "forward", "loss")
    else:
        if out_spec.shape != in_spec.shape:
            raise CompileError(f"mse_input needs the output shape {out_spec.shape} to equal the input shape "
                               f"{in_spec.shape}")
        label, task = "", "reconstruction"
        node = Node("loss", "MSELoss", (out, graph.inputs[0]), ("loss",), {}, "forward", "loss")
    tensors["loss"] = TensorSpec("loss", (), "float32", Role.LOSS)
    graph = graph.replace(tensors=tensors, nodes=tuple(graph.nodes) + (node,), inputs=tuple(inputs))
    return graph, "loss", label, task


def _steps(graph: Graph) -> tuple[Step, ...]:
    steps = []
    for node in graph.nodes:
        op = get_op(node.op)
        in_shapes = [graph.tensors[i].shape for i in node.inputs]
        out_shapes = tuple(graph.tensors[o].shape for o in node.outputs)
        steps.append(Step(node.name, node.op, node.inputs, node.outputs, dict(node.attrs), node.phase, node.layer,
                          int(op.flops(out_shapes, *in_shapes, **node.attrs))))
    return tuple(steps)


def _phase(graph: Graph, plan: MemoryPlan, results: Sequence[str]) -> Phase:
    return Phase(_steps(graph), tuple(graph.inputs), tuple(results), plan.arena_offsets, plan.arena_bytes,
                 plan.lower_bound_bytes)


def compile_graph(graph: Graph, options: CompileOptions, name: str = "model", task_hint: str = "auto") -> Program:
    """Compile an imported graph (batch ``options.batch``, or batch·devices with a device axis)."""
    sgd = options.sgd
    if options.int8 is not None:
        graph = quantize_graph(graph, options.int8.calibration)
        sgd = dataclasses.replace(sgd, qas=options.int8.qas, int_update=options.int8.update)
    tuned = apply_tuning(graph, options.tuning)
    per_device = per_device_tensors(tuned)
    graph = add_device_axis(tuned, options.devices)
    forward, loss, label, task = add_loss(graph, options.loss, task_hint)
    forward, loss = scale_loss(forward, loss, options.devices)
    train, _ = differentiate(forward, loss, sgd)
    # batched devices also keep the outputs, so each device's loss can be read per step
    train_results = (loss,) if options.devices == 1 else (loss, forward.outputs[0])
    train = train.pruned(keep=train_results, always=UPDATE_OPS)
    train.check()
    train_plan = plan_memory(train, keep=train_results)
    check_plan(train, train_plan)
    eval_graph = forward.pruned(keep=(forward.outputs[0], loss))
    eval_plan = plan_memory(eval_graph, keep=(eval_graph.outputs[0], loss))
    check_plan(eval_graph, eval_plan)
    tensors = {n: TensorInfo(n, s.shape, s.dtype, s.role.value, per_device=n in per_device)
               for n, s in train.tensors.items()}
    for n, s in eval_graph.tensors.items():
        tensors.setdefault(n, TensorInfo(n, s.shape, s.dtype, s.role.value, per_device=n in per_device))
    param_offsets = dict(train_plan.param_offsets)
    values = {n: np.asarray(v) for n, v in train.values.items() if n in param_offsets}
    program = Program(
        model=name, batch=options.batch, task=task, input=forward.inputs[0], label=label,
        output=forward.outputs[0], loss=loss, tensors=tensors, param_offsets=param_offsets,
        params_bytes=train_plan.params_bytes, values=values,
        train=_phase(train, train_plan, train_results), evaluate=_phase(eval_graph, eval_plan, (forward.outputs[0], loss)),
        tuning=options.tuning.to_dict(),
        optimizer=sgd.manifest(train), devices=options.devices)
    return program.replace(report=build_report(program, train_plan, tuned.notes, layer_table(tuned)))


def compile_model(model: str | os.PathLike | onnx.ModelProto, tuning: str | dict | TuningSpec = "lora",
                  batch: int = 8, loss: str = "auto", lr: float = 0.01, momentum: float = 0.0,
                  weight_decay: float = 0.0, seed: int = 0, devices: int = 1, fused_update: bool = True,
                  proximal: bool = False, int8: Int8Options | None = None, optimizer: str = "sgd") -> Program:
    """Compile a zoo model name, an ONNX file or a ModelProto into a training Program (``devices`` > 1: one
    program that trains that many devices at once; see compiler.device_axis; ``proximal``: FedProx's pull
    towards anchor values, see compiler.autodiff.SGDConfig; ``int8``: train the model's int8 form, see
    compiler/quantize.py; ``optimizer``: "sgd" or "adam", see compiler.autodiff.AdamConfig)."""
    source, name, task_hint = load_model(model, seed)
    options = CompileOptions(TuningSpec.parse(tuning), batch, loss,
                             optimizer_config(optimizer, lr, momentum, weight_decay, fused_update, proximal), devices,
                             int8)
    graph = import_onnx(source, options.batch * options.devices)
    return compile_graph(graph, options, name, task_hint)
