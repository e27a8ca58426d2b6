"""`edgefleet compile MODEL ...`: the compiler's command line (wired into the top-level CLI in fleet.cli)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import numpy as np

from compiler import zoo
from compiler.autodiff import OPTIMIZERS, SGDConfig, optimizer_config
from compiler.frontend import import_onnx
from compiler.ir import CompileError
from compiler.pipeline import LOSSES, CompileOptions, compile_graph, load_model
from compiler.program import Program
from compiler.quantize import UPDATES, Int8Options
from compiler.report import format_layers, format_table
from compiler.sparse_search import DEFAULT_STEPS, TaskData, choose_sparse, parse_bytes
from compiler.tuning import LoraConfig, TuningSpec


# boards that are build targets but have no cost model of their own: the program is built unlowered
UNLOWERED_BOARDS = ("rv32-qemu", "host")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compile", help="compile an ONNX model (or zoo name) into a training program",
                              description="Compile MODEL (an .onnx path or a zoo name) into an on-device "
                                          "training program and print its report.")
    p.add_argument("model", help="ONNX file or zoo model name (cct-2-3x2, cct-digits, deep-ae, ds-cnn)")
    p.add_argument("--strategy", default="lora",
                   help="full | selective | lora | lora+head | classifier | bias | last-K | sparse (default lora)")
    p.add_argument("--train", action="append", default=[], metavar="PATTERN",
                   help="parameter/layer glob trained fully (repeatable; with selective or lora)")
    p.add_argument("--last-k", type=int, help="selective: train the last K blocks")
    p.add_argument("--bias-only", action="store_true", help="selective: train every bias")
    p.add_argument("--sparse", action="append", default=[], metavar="LAYER=CHOICE",
                   help="sparse update of the layers matching the glob LAYER: bias, 1/8, 1/4, 1/2, all (the bias and "
                        "that share of the weight's output channels) or a channel count (repeatable; --strategy sparse)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="with --strategy sparse and no --sparse: choose the layers and channel ratios that fit SIZE "
                        "(e.g. 256KiB) by contribution analysis on the task data (docs/sparse.md)")
    p.add_argument("--data", metavar="FILE.npz",
                   help="task data for --memory-budget: arrays x (samples, *input) and y (labels; absent for "
                        "reconstruction); default: the zoo model's task samples")
    p.add_argument("--search-steps", type=int, default=DEFAULT_STEPS,
                   help=f"SGD steps of each contribution run of --memory-budget (default {DEFAULT_STEPS})")
    p.add_argument("--int8", action="store_true",
                   help="train the model's int8 form (TTE's quantized graph, docs/int8.md), calibrated on --data or "
                        "the zoo task's samples")
    p.add_argument("--no-qas", dest="qas", action="store_false",
                   help="int8: no quantization-aware scaling of the gradients")
    p.add_argument("--int8-update", choices=UPDATES, default="round",
                   help="int8: round (int8 weights updated in place, default) or master (float32 copies of the "
                        "updated channels)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default 4)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    p.add_argument("--lora-targets", help="comma-separated layer globs (default auto: attention and MLP layers, else every MatMul/Gemm layer)")
    p.add_argument("--lora-init", choices=["zero_b", "gaussian", "random"], help="LoRA init (default zero_b)")
    p.add_argument("--batch", type=int, default=8, help="batch size, fixed at compile time (default 8)")
    p.add_argument("--loss", choices=LOSSES, default="auto")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help="the on-device optimizer: sgd (with --momentum) or adam (PyTorch's betas and eps)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--no-fused-update", dest="fused_update", action="store_false",
                   help="update every parameter after the whole backward pass (accumulate-then-update, as the "
                        "reference framework does) instead of as soon as its gradient is complete")
    p.add_argument("--seed", type=int, default=0, help="seed for zoo weights and LoRA init")
    p.add_argument("--target", help="lower for a target: siracusa, siracusa-small-l2, rv32-qemu, or a TOML file")
    p.add_argument("--build", action="store_true", help="generate C and build the ELF (needs --target and -o)")
    p.add_argument("-o", "--output", help="write the program artifact (manifest.json, params.npz) here")
    p.add_argument("--json", action="store_true", help="print the report as JSON (schema: docs/report.md)")
    p.add_argument("--list-layers", action="store_true",
                   help="list every layer (PyTorch module path, op, parameter shapes) and what the strategy does "
                        "with it: full, partial, lora or frozen")
    p.set_defaults(handler=run)
    return p


def _sparse_scheme(items: list[str]) -> tuple[tuple[str, str], ...]:
    scheme = []
    for item in items:
        layer, sep, choice = item.partition("=")
        if not sep or not layer.strip():
            raise CompileError(f"--sparse {item!r}: expected LAYER=CHOICE, e.g. blocks.3.pw=1/4")
        scheme.append((layer.strip(), choice.strip()))
    return tuple(scheme)


def tuning_from_args(args: argparse.Namespace) -> TuningSpec:
    if args.strategy == "sparse" or args.sparse:
        if args.strategy != "sparse":
            raise CompileError(f"--sparse needs --strategy sparse, not {args.strategy!r}")
        if args.last_k is not None or args.bias_only or args.lora_rank or args.lora_targets:
            raise CompileError("--strategy sparse takes --sparse LAYER=CHOICE and --train, not selective/LoRA options")
        if not args.sparse:
            raise CompileError("--strategy sparse needs --sparse LAYER=CHOICE (bias, 1/8, 1/4, 1/2, all or k) "
                               "or --memory-budget SIZE")
        return TuningSpec("sparse", train=tuple(args.train), sparse=_sparse_scheme(args.sparse))
    spec = TuningSpec.parse(args.strategy) if args.strategy != "selective" else None
    lora_opts = {k: v for k, v in (("rank", args.lora_rank), ("alpha", args.lora_alpha),
                                   ("init", args.lora_init), ("seed", args.seed)) if v is not None}
    if args.lora_targets:
        lora_opts["targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    strategy = spec.strategy if spec else "selective"
    if set(lora_opts) - {"seed"} and strategy != "lora":
        raise CompileError(f"--lora-* options need a LoRA strategy, not {args.strategy!r}")
    lora = None
    if strategy == "lora":
        base = spec.lora or LoraConfig()
        lora = LoraConfig(**{**base.__dict__, **lora_opts})
    return TuningSpec(strategy, train=tuple(spec.train if spec else ()) + tuple(args.train),
                      last_k=args.last_k if args.last_k is not None else (spec.last_k if spec else None),
                      bias_only=args.bias_only or bool(spec and spec.bias_only), lora=lora)


def build_program(args: argparse.Namespace) -> Program:
    source, name, task = load_model(args.model, args.seed)
    if getattr(args, "memory_budget", None):
        return _lower(args, _search(args, source, name, task))
    if not args.int8 and (not args.qas or args.int8_update != "round"):
        raise CompileError("--no-qas and --int8-update apply to int8 training: add --int8")
    options = CompileOptions(tuning_from_args(args), args.batch, args.loss,
                             optimizer_config(args.optimizer, args.lr, args.momentum, args.weight_decay,
                                              args.fused_update), int8=_int8(args, name))
    program = compile_graph(import_onnx(source, options.batch), options, name, task)
    return _lower(args, program)


def _int8(args: argparse.Namespace, name: str) -> Int8Options | None:
    if not args.int8:
        return None
    return Int8Options(_task_data(args, name, "--int8")[0], qas=args.qas, update=args.int8_update)


def _search(args: argparse.Namespace, source: Any, name: str, task: str) -> Program:
    """--strategy sparse --memory-budget: the scheme chosen by contribution analysis, compiled."""
    if args.strategy != "sparse" or args.sparse:
        raise CompileError("--memory-budget chooses a sparse scheme: use it with --strategy sparse and without --sparse")
    budget = parse_bytes(args.memory_budget)
    options = CompileOptions(batch=args.batch, loss=args.loss, sgd=SGDConfig(args.lr, args.momentum, args.weight_decay))
    x, y = _task_data(args, name)
    choice, program = choose_sparse(import_onnx(source, args.batch), options, budget,
                                    TaskData.split(x, y, seed=args.seed), name, task, steps=args.search_steps,
                                    train=tuple(args.train))
    if args.int8:  # the scheme is chosen on the fp32 program, whose memory bounds the int8 one's
        options = dataclasses.replace(options, tuning=TuningSpec("sparse", train=tuple(args.train), sparse=choice.scheme),
                                      int8=_int8(args, name))
        program = compile_graph(import_onnx(source, args.batch), options, name, task)
        program = program.replace(report={**program.report, "sparse_search": choice.to_dict()})
    print(f"sparse scheme for {budget / 1024:,.1f} KiB: "
          f"{', '.join(f'{layer} {c}' for layer, c in choice.scheme)}; memory {choice.memory_bytes / 1024:,.1f} KiB; "
          f"expected gain {choice.expected_gain:.4f} held-out loss, {100 * choice.expected_accuracy_gain:+.1f} % "
          f"accuracy ({len(choice.candidates)} candidates, {choice.steps} steps each)", file=sys.stderr)
    return program


def _task_data(args: argparse.Namespace, name: str, flag: str = "--memory-budget") -> tuple[np.ndarray, np.ndarray | None]:
    if args.data:
        try:
            with np.load(args.data, allow_pickle=False) as archive:
                if "x" not in archive:
                    raise CompileError(f"{args.data}: no array 'x' (task samples)")
                return archive["x"].astype(np.float32), archive["y"] if "y" in archive else None
        except (OSError, ValueError) as exc:
            if isinstance(exc, CompileError):
                raise
            raise CompileError(f"{args.data}: not a readable .npz ({exc})") from None
    if name not in zoo.names():
        raise CompileError(f"{flag} on {name}: give the task's samples with --data FILE.npz")
    from compiler.zoo.task_data import task_data
    return task_data(name, seed=args.seed)


def _lower(args: argparse.Namespace, program: Program) -> Program:
    if args.target and args.target not in UNLOWERED_BOARDS:
        from compiler.targets import load_target, lower_to_target  # optional stage
        program = lower_to_target(program, load_target(args.target))
    return program


def run(args: argparse.Namespace) -> int:
    if args.build and not (args.target and args.output):
        raise CompileError("--build needs --target and -o DIR")
    program = build_program(args)
    for warning in program.report.get("warnings", []):
        print(f"edgefleet: warning: {warning}", file=sys.stderr)
    if args.list_layers:
        print(format_layers(program.report["layers"]))
        return 0
    if args.output:
        program.save(args.output)
        if args.build:
            from compiler.codegen import build_elf
            from compiler.codegen.build import board_for_target
            elf = build_elf(program, args.output, board=board_for_target(args.target))
            print(f"built {elf}", file=sys.stderr)
    if args.json:
        json.dump(program.report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_table(program.report))
        if args.output:
            print(f"\nwrote {args.output}/manifest.json and params.npz")
    return 0
