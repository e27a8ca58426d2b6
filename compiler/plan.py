"""Static memory plan: lifetimes → buffers (views and safe in-place ops share one) → offsets in one arena.

Persistent tensors (weights, trainables, optimizer state, constants) get a region of their own, laid out
once. Everything else lives in the arena; two buffers whose lifetimes intersect never overlap. The arena is
reported next to its lower bound, the most bytes simultaneously live at any step.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from compiler.ir import CompileError, Graph
from compiler.ops import get_op

ALIGN_BYTES = 16


def align(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES


@dataclass(frozen=True)
class Buffer:
    tensors: tuple[str, ...]  # the root first; the others are views of it or in-place results
    size_bytes: int           # aligned
    start: int                # first step that needs it (0 for graph inputs)
    end: int                  # last step that needs it (inclusive)


@dataclass(frozen=True)
class MemoryPlan:
    arena_offsets: dict[str, int]   # every arena tensor → byte offset
    param_offsets: dict[str, int]   # every persistent tensor → byte offset in the parameter region
    arena_bytes: int
    lower_bound_bytes: int
    params_bytes: int
    buffers: tuple[tuple[Buffer, int], ...]  # (buffer, offset)
    inplace_steps: int
    heuristic: str


def _union_find(names: Sequence[str]):
    parent = {n: n for n in names}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def join(child: str, root: str) -> None:
        parent[find(child)] = find(root)

    return find, join


def plan_memory(graph: Graph, keep: Sequence[str] = ()) -> MemoryPlan:
    """Plan ``graph`` (nodes in execution order). ``keep``: tensors that must survive to the end (outputs)."""
    persistent = [n for n, s in graph.tensors.items() if s.role.persistent]
    param_offsets, cursor = {}, 0
    for name in persistent:
        param_offsets[name] = cursor
        cursor += align(graph.tensors[name].nbytes)
    params_bytes = cursor

    used = set(graph.inputs) | {o for n in graph.nodes for o in n.outputs} | {i for n in graph.nodes for i in n.inputs}
    transient = [n for n in graph.tensors if n in used and not graph.tensors[n].role.persistent]
    find, join = _union_find(list(graph.tensors))
    last_step = len(graph.nodes) - 1
    start = {n: 0 for n in graph.inputs}
    end = {n: 0 for n in transient}
    for step, node in enumerate(graph.nodes):
        for out in node.outputs:
            start.setdefault(out, step)
        for name in node.inputs:
            if name in end:
                end[name] = max(end[name], step)
    for name in keep:
        end[name] = last_step
    for name in transient:
        end[name] = max(end[name], start.get(name, 0))

    # views always share their input's buffer (a persistent input makes the view persistent)
    aliased_params: dict[str, str] = {}
    for node in graph.nodes:
        if get_op(node.op).view:
            src, out = node.inputs[0], node.outputs[0]
            root = find(src)
            if graph.tensors[root].role.persistent:
                aliased_params[out] = root
            join(out, src)

    # safe in-place: an elementwise op may write over its first input if that buffer dies at this step
    inplace = 0
    members: dict[str, list[str]] = {}
    for name in transient:
        members.setdefault(find(name), []).append(name)
    for step, node in enumerate(graph.nodes):
        op = get_op(node.op)
        if not op.inplace or not node.outputs:
            continue
        src, out = node.inputs[0], node.outputs[0]
        src_spec, out_spec = graph.tensors[src], graph.tensors[out]
        if src_spec.role.persistent or src in aliased_params or out in aliased_params:
            continue
        if src_spec.nbytes != out_spec.nbytes or src_spec.dtype != out_spec.dtype:
            continue
        root_src, root_out = find(src), find(out)
        if root_src == root_out or max(end[m] for m in members[root_src]) != step:
            continue
        if len(members[root_out]) != 1:  # the output already roots other views: keep it simple
            continue
        join(out, src)
        members[root_src] += members.pop(root_out)
        inplace += 1

    buffers: list[Buffer] = []
    for root, names in members.items():
        if root in aliased_params or any(n in aliased_params for n in names):
            continue
        names = sorted(names, key=lambda n: (start.get(n, 0), n))
        size = max(graph.tensors[n].nbytes for n in names)
        buffers.append(Buffer(tuple(names), align(size), min(start.get(n, 0) for n in names),
                              max(end[n] for n in names)))
    lower = _lower_bound(buffers, last_step + 1)
    peak, label, placed = _best_placement(buffers, lower)
    arena_offsets = {n: off for b, off in placed for n in b.tensors}
    for view, root in aliased_params.items():
        param_offsets[view] = param_offsets[root]
    return MemoryPlan(arena_offsets, param_offsets, peak, lower, params_bytes,
                      tuple(sorted(placed, key=lambda p: p[1])), inplace, label)


HEURISTICS: dict[str, Callable[[Buffer], tuple]] = {
    "size": lambda b: (-b.size_bytes, b.start),
    "area": lambda b: (-b.size_bytes * (b.end - b.start + 1), b.start),
    "longest": lambda b: (-(b.end - b.start), -b.size_bytes),
    "start": lambda b: (b.start, -b.size_bytes),
    "end": lambda b: (-b.end, -b.size_bytes),
    "size-end": lambda b: (-b.size_bytes, -b.end),
}
SEARCH_TARGET = 1.02          # stop searching once the arena is within 2% of the lower bound
SEARCH_BUDGET = 400_000       # buffer-pair comparisons spent on the randomized search (bounds compile time)


def _best_placement(buffers: Sequence[Buffer], lower: int) -> tuple[int, str, list[tuple[Buffer, int]]]:
    """Greedy placement (best fit and first fit) over several orders; when none comes within SEARCH_TARGET of
    the lower bound, a seeded search perturbs the best order (moves one buffer earlier) while it helps."""
    best: tuple[int, str, list[tuple[Buffer, int]], list[Buffer]] | None = None
    orders = {label: sorted(buffers, key=key) for label, key in HEURISTICS.items()}
    orders["breadth"] = _breadth_order(buffers)
    for label, order in orders.items():
        for fit in ("best", "first"):
            placed = _place(order, fit)
            peak = max((off + b.size_bytes for b, off in placed), default=0)
            if best is None or peak < best[0]:
                best = (peak, f"{label}/{fit}", placed, order)
    peak, label, placed, order = best
    tries = SEARCH_BUDGET // max(1, len(order) ** 2)
    rng = random.Random(0)
    fit = label.rsplit("/", 1)[1]
    improved = False
    for _ in range(tries):
        if peak <= SEARCH_TARGET * lower or len(order) < 2:
            break
        i = rng.randrange(1, len(order))
        j = rng.randrange(0, i)
        candidate = order[:j] + [order[i]] + order[j:i] + order[i + 1:]
        trial = _place(candidate, fit)
        trial_peak = max(off + b.size_bytes for b, off in trial)
        if trial_peak < peak:
            peak, placed, order, improved = trial_peak, trial, candidate, True
    return peak, label + ("+search" if improved else ""), placed


def _breadth_order(buffers: Sequence[Buffer]) -> list[Buffer]:
    """Greedy by breadth (Pisarchyk & Lee, 2020): the steps from the most bytes live to the least; at each, the
    buffers live there and not yet listed, largest first. The busiest step's buffers are packed first."""
    steps = max((b.end for b in buffers), default=-1) + 1
    live = [[] for _ in range(steps)]
    total = [0] * steps
    for b in buffers:
        for t in range(b.start, b.end + 1):
            live[t].append(b)
            total[t] += b.size_bytes
    order: list[Buffer] = []
    seen: set[int] = set()
    for t in sorted(range(steps), key=lambda t: -total[t]):
        for b in sorted(live[t], key=lambda b: -b.size_bytes):
            if id(b) not in seen:
                seen.add(id(b))
                order.append(b)
    return order


def _lower_bound(buffers: Sequence[Buffer], steps: int) -> int:
    delta = [0] * (steps + 2)
    for b in buffers:
        delta[b.start] += b.size_bytes
        delta[b.end + 1] -= b.size_bytes
    live = peak = 0
    for d in delta:
        live += d
        peak = max(peak, live)
    return peak


def _place(order: Sequence[Buffer], fit: str = "best") -> list[tuple[Buffer, int]]:
    """Greedy: each buffer takes, among the gaps left by buffers live at the same time, the smallest that holds
    it (``fit="best"``) or the lowest (``"first"``); else goes on top."""
    placed: list[tuple[Buffer, int]] = []
    for buf in order:
        busy = sorted((off, off + b.size_bytes) for b, off in placed if b.start <= buf.end and buf.start <= b.end)
        best_off, best_gap, cursor = None, None, 0
        for lo, hi in busy:
            gap = lo - cursor
            if gap >= buf.size_bytes and (best_gap is None or gap < best_gap):
                best_off, best_gap = cursor, gap
                if fit == "first":
                    break
            cursor = max(cursor, hi)
        placed.append((buf, best_off if best_off is not None else cursor))
    return placed


def check_plan(graph: Graph, plan: MemoryPlan) -> None:
    """Raise if two arena tensors with intersecting lifetimes overlap without being the same buffer."""
    for (a, off_a), (b, off_b) in _pairs(plan.buffers):
        if a.start <= b.end and b.start <= a.end and off_a < off_b + b.size_bytes and off_b < off_a + a.size_bytes:
            raise CompileError(f"memory plan overlap: {a.tensors[0]!r} and {b.tensors[0]!r}")


def _pairs(items):
    for i, x in enumerate(items):
        for y in items[i + 1:]:
            yield x, y
