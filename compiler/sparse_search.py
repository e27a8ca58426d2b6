"""Choose a sparse-update scheme for a memory budget, as the Tiny Training Engine does: contribution analysis,
then the best combination under the budget.

1. Candidates: for every Conv/Gemm/MatMul layer, ``bias`` (if it has one) and the bias plus the first
   1/8, 1/4, 1/2 or all output channels of its weight. Each candidate alone is compiled; its memory is the
   program's ``total_bytes`` (parameters + arena, the measure the fleet's budgets use). A candidate that alone
   exceeds the budget is dropped before any training; if none fits, a one-line error names the smallest
   budget that does.
2. Contribution analysis: each remaining candidate alone is fine-tuned for a few SGD steps on the task's
   training split from the same starting weights; its gain is the drop of the held-out loss (the accuracy
   change is reported beside it: on short runs and small validation sets, accuracy moves in coarse steps,
   the loss does not).
3. Combination: one choice per layer, maximising the summed gain (TTE assumes gains add up) under the budget,
   with each candidate's memory taken as its increase over the forward-only floor. That sum over-estimates
   (the activations a low layer keeps are shared with the layers above it), so the exact multiple-choice
   knapsack (dynamic programming over 256-byte units) is solved, the result compiled and measured exactly, and
   then improved greedily: the candidate with the best gain per extra byte is added while the compiled
   program still fits. If the estimate was ever low, the smallest-gain layers are dropped until it fits. The
   chosen scheme's memory is always a compiled, measured figure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from compiler.ir import CompileError, Graph
from compiler.program import Program
from compiler.tuning import SPARSE_RATIOS, TuningSpec, sparse_layers

if TYPE_CHECKING:  # pragma: no cover
    from compiler.pipeline import CompileOptions

DEFAULT_CHOICES = ("bias", "1/8", "1/4", "1/2", "all")
DEFAULT_STEPS = 20
UNIT_BYTES = 256  # knapsack resolution


@dataclass(frozen=True)
class TaskData:
    """Training and held-out samples for the contribution analysis (labels None for reconstruction)."""
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_val: np.ndarray
    y_val: np.ndarray | None

    @classmethod
    def split(cls, x: np.ndarray, y: np.ndarray | None, val_fraction: float = 0.25, seed: int = 0) -> "TaskData":
        if len(x) < 2:
            raise CompileError(f"task data: need at least 2 samples, got {len(x)}")
        order = np.random.default_rng(seed).permutation(len(x))
        n_val = max(1, int(len(x) * val_fraction))
        val, train = order[:n_val], order[n_val:]
        return cls(x[train], None if y is None else y[train], x[val], None if y is None else y[val])


@dataclass(frozen=True)
class Candidate:
    layer: str
    choice: str
    memory_bytes: int            # the compiled program with this candidate alone
    gain: float = 0.0            # held-out loss before minus after the short fine-tuning run
    accuracy_gain: float = 0.0   # held-out accuracy change (classification; 0 otherwise)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "choice": self.choice, "memory_bytes": self.memory_bytes,
                "gain": self.gain, "accuracy_gain": self.accuracy_gain}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Candidate":
        return cls(str(d["layer"]), str(d["choice"]), int(d["memory_bytes"]), float(d["gain"]),
                   float(d["accuracy_gain"]))


@dataclass(frozen=True)
class SparseChoice:
    """The search's result: the scheme (layer, choice) in graph order, its compiled memory and expected gain."""
    scheme: tuple[tuple[str, str], ...]
    memory_bytes: int
    budget_bytes: int
    expected_gain: float                  # sum of the chosen candidates' gains
    expected_accuracy_gain: float
    steps: int                            # SGD steps of each contribution run
    candidates: tuple[Candidate, ...] = field(default=())

    @property
    def tuning(self) -> TuningSpec:
        return TuningSpec("sparse", sparse=self.scheme)

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": [list(p) for p in self.scheme], "memory_bytes": self.memory_bytes,
                "budget_bytes": self.budget_bytes, "expected_gain": self.expected_gain,
                "expected_accuracy_gain": self.expected_accuracy_gain, "steps": self.steps,
                "candidates": [c.to_dict() for c in self.candidates]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SparseChoice":
        return cls(tuple((str(a), str(b)) for a, b in d["scheme"]), int(d["memory_bytes"]), int(d["budget_bytes"]),
                   float(d["expected_gain"]), float(d["expected_accuracy_gain"]), int(d["steps"]),
                   tuple(Candidate.from_dict(c) for c in d.get("candidates", ())))


def memory_bytes(program: Program) -> int:
    return int(program.report["memory"]["total_bytes"])


Compile = Callable[[TuningSpec], Program]


def search_sparse(graph: Graph, compile_fn: Compile, budget_bytes: int, data: TaskData,
                  steps: int = DEFAULT_STEPS, choices: Sequence[str] = DEFAULT_CHOICES,
                  what: str = "model") -> SparseChoice:
    """The best sparse scheme for ``budget_bytes``. ``graph``: the imported model (for its layers);
    ``compile_fn``: tuning → Program with everything else fixed (batch, loss, optimizer)."""
    for c in choices:
        if c != "bias" and c not in SPARSE_RATIOS:
            raise CompileError(f"sparse search: unknown choice {c!r}; use bias, {', '.join(SPARSE_RATIOS)}")
    layers = sparse_layers(graph)
    if not layers:
        raise CompileError(f"sparse search: {what} has no Conv/Gemm/MatMul layer")
    compile_fn = _memoized(compile_fn)
    options = {layer: [c for c in _ordered(choices) if c != "bias" or bias is not None]
               for layer, (_, bias) in layers.items()}
    # a layer's choices grow in memory (bias ⊂ 1/8 ⊂ … ⊂ all): its smallest decides whether any of them can fit
    programs = {(layer, opts[0]): compile_fn(TuningSpec("sparse", sparse=((layer, opts[0]),)))
                for layer, opts in options.items() if opts}
    smallest = min(programs, key=lambda k: memory_bytes(programs[k]))
    need = memory_bytes(programs[smallest])
    if need > budget_bytes:
        raise CompileError(f"memory budget {_kib(budget_bytes)} fits no sparse scheme of {what}: the smallest "
                           f"({smallest[0]} {smallest[1]}) needs {_kib(need)}; use --memory-budget "
                           f"{math.ceil(need / 1024)}KiB or more, or a smaller --batch")
    fitting: dict[tuple[str, str], Program] = {}
    for layer, opts in options.items():
        for choice in opts:
            program = compile_fn(TuningSpec("sparse", sparse=((layer, choice),)))
            if memory_bytes(program) > budget_bytes:
                break
            fitting[(layer, choice)] = program
    candidates = _contributions(fitting, data, steps)
    scheme = _combine(candidates, compile_fn, budget_bytes, list(layers))
    program = compile_fn(TuningSpec("sparse", sparse=scheme))
    chosen = {(layer, c) for layer, c in scheme}
    picked = [c for c in candidates if (c.layer, c.choice) in chosen]
    return SparseChoice(scheme, memory_bytes(program), budget_bytes, sum(c.gain for c in picked),
                        sum(c.accuracy_gain for c in picked), steps, tuple(candidates))


def choose_sparse(graph: Graph, options: "CompileOptions", budget_bytes: int, data: TaskData, name: str = "model",
                  task_hint: str = "auto", steps: int = DEFAULT_STEPS,
                  train: tuple[str, ...] = ()) -> tuple[SparseChoice, Program]:
    """The scheme for ``budget_bytes`` and its compiled program (batch, loss, optimizer from ``options``, whose
    tuning is replaced; ``train``: patterns trained whole beside the scheme): the one call a caller with a budget
    needs (the CLI, a fleet's device groups)."""
    import dataclasses

    from compiler.pipeline import compile_graph

    def compile_fn(spec: TuningSpec) -> Program:
        tuning = TuningSpec("sparse", train=tuple(train), sparse=spec.sparse)
        return compile_graph(graph, dataclasses.replace(options, tuning=tuning), name, task_hint)

    compile_fn = _memoized(compile_fn)
    choice = search_sparse(graph, compile_fn, budget_bytes, data, steps=steps, what=name)
    program = compile_fn(choice.tuning)
    return choice, program.replace(report={**program.report, "sparse_search": choice.to_dict()})


def _ordered(choices: Sequence[str]) -> list[str]:
    return sorted(set(choices), key=lambda c: -1.0 if c == "bias" else SPARSE_RATIOS[c])


def _memoized(compile_fn: Compile) -> Compile:
    cache: dict[tuple[tuple[str, str], ...], Program] = {}

    def compiled(spec: TuningSpec) -> Program:
        if spec.sparse not in cache:
            cache[spec.sparse] = compile_fn(spec)
        return cache[spec.sparse]
    return compiled


def _contributions(programs: Mapping[tuple[str, str], Program], data: TaskData, steps: int) -> list[Candidate]:
    from device_runtime import NumpyDevice  # the executor runs the short fine-tuning runs
    base: tuple[float, float] | None = None
    out = []
    for (layer, choice), program in programs.items():
        device = NumpyDevice(program)
        if base is None:
            base = _score(device, program, data)
        device.train(data.x_train, data.y_train, steps)
        loss, accuracy = _score(device, program, data)
        out.append(Candidate(layer, choice, memory_bytes(program), round(base[0] - loss, 6),
                             round(accuracy - base[1], 6)))
    return out


def _score(device: Any, program: Program, data: TaskData) -> tuple[float, float]:
    result = device.evaluate(data.x_val, data.y_val)
    if program.task != "classification" or data.y_val is None:
        return float(result.loss), 0.0
    return float(result.loss), float(np.mean(np.argmax(result.outputs, axis=-1) == data.y_val))


def _combine(candidates: list[Candidate], compile_fn: Compile, budget: int,
             order: list[str]) -> tuple[tuple[str, str], ...]:
    floor = min(c.memory_bytes for c in candidates)
    useful = [c for c in candidates if c.gain > 0]
    if not useful:  # nothing helps on this data: train the single best (least harmful) candidate that fits
        best = max(candidates, key=lambda c: (c.gain, -c.memory_bytes))
        return ((best.layer, best.choice),)
    picked = _knapsack(useful, budget - floor, floor)

    def measure(scheme: dict[str, Candidate]) -> int:
        ordered = tuple((layer, scheme[layer].choice) for layer in order if layer in scheme)
        return memory_bytes(compile_fn(TuningSpec("sparse", sparse=ordered)))

    used = measure(picked)
    while used > budget and len(picked) > 1:  # the estimate was low: drop the least useful layer
        worst = min(picked.values(), key=lambda c: c.gain / max(c.memory_bytes - floor, 1))
        del picked[worst.layer]
        used = measure(picked)
    # fill: the best gain per extra byte first, kept when the compiled program still fits
    for c in sorted(useful, key=lambda c: -c.gain / max(c.memory_bytes - floor, 1)):
        current = picked.get(c.layer)
        if current is not None and current.gain >= c.gain:
            continue
        trial = {**picked, c.layer: c}
        size = measure(trial)
        if size <= budget:
            picked, used = trial, size
    return tuple((layer, picked[layer].choice) for layer in order if layer in picked)


def _knapsack(cands: list[Candidate], room: int, floor: int) -> dict[str, Candidate]:
    """One candidate (or none) per layer, maximising summed gain with summed extra memory <= room."""
    units = max(0, room // UNIT_BYTES)
    by_layer: dict[str, list[Candidate]] = {}
    for c in cands:
        by_layer.setdefault(c.layer, []).append(c)
    best = np.zeros(units + 1)
    choice: list[np.ndarray] = []
    for layer, options in by_layer.items():
        new, pick = best.copy(), np.full(units + 1, -1)
        for i, c in enumerate(options):
            w = math.ceil((c.memory_bytes - floor) / UNIT_BYTES)
            if w > units:
                continue
            shifted = np.full(units + 1, -np.inf)
            shifted[w:] = best[:units + 1 - w] + c.gain
            better = shifted > new
            new[better], pick[better] = shifted[better], i
        best = new
        choice.append(pick)
    picked: dict[str, Candidate] = {}
    u = int(np.argmax(best))
    for (layer, options), pick in zip(reversed(list(by_layer.items())), reversed(choice)):
        i = int(pick[u])
        if i >= 0:
            picked[layer] = options[i]
            u -= math.ceil((options[i].memory_bytes - floor) / UNIT_BYTES)
    return picked


def parse_bytes(text: str) -> int:
    """'256KiB', '0.5MiB', '262144' → bytes (KiB/MiB are 1024-based; KB/MB accepted as the same)."""
    units = {"": 1, "b": 1, "kib": 1024, "kb": 1024, "k": 1024, "mib": 1024 ** 2, "mb": 1024 ** 2, "m": 1024 ** 2}
    s = str(text).strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise CompileError(f"memory budget {text!r}: expected a size such as 256KiB, 0.5MiB or 262144")
    return int(value * units[unit])


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"
