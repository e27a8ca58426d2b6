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
SEARCH_TARGET = 1.03   # search only while the best greedy arena is above this multiple of the lower bound
SEARCH_TRIES = 500     # randomized order perturbations at most (each one greedy placement)


def _best_placement(buffers: Sequence[Buffer], lower: int) -> tuple[int, str, list[tuple[Buffer, int]]]:
    """Greedy placement (best fit and first fit) over several orders. When none comes within SEARCH_TARGET of
    the lower bound, a seeded local search moves one buffer earlier in the best order (a buffer on top of the
    arena half the time), keeping moves that do not grow the arena, until it is within the target."""
    conflicts = _conflicts(buffers)
    orders = {label: sorted(range(len(buffers)), key=lambda i: key(buffers[i])) for label, key in HEURISTICS.items()}
    orders.update(_live_orders(buffers))
    best: tuple[int, str, list[int], str] | None = None
    for fit in ("best", "first"):
        for label, order in orders.items():
            peak = _peak(buffers, _place(buffers, order, conflicts, fit))
            if best is None or peak < best[0]:
                best = (peak, f"{label}/{fit}", order, fit)
            if best[0] <= lower:  # the lower bound is reached: nothing can do better
                break
        if best[0] <= lower:
            break
    peak, label, order, fit = best
    rng = random.Random(0)
    searched = False
    for _ in range(SEARCH_TRIES if len(buffers) > 1 else 0):
        if peak <= SEARCH_TARGET * lower:
            break
        offsets = _place(buffers, order, conflicts, fit)
        top = [k for k, b in enumerate(buffers) if offsets[k] + b.size_bytes == peak]
        moved = rng.choice(top) if rng.random() < 0.5 else rng.randrange(len(buffers))
        at = order.index(moved)
        if at == 0:
            continue
        to = rng.randrange(at)
        candidate = order[:to] + [moved] + order[to:at] + order[at + 1:]
        trial = _peak(buffers, _place(buffers, candidate, conflicts, fit))
        if trial <= peak:
            searched = searched or trial < peak
            peak, order = trial, candidate
    offsets = _place(buffers, order, conflicts, fit)
    return peak, label + ("+search" if searched else ""), [(b, offsets[k]) for k, b in enumerate(buffers)]


def _conflicts(buffers: Sequence[Buffer]) -> list[list[int]]:
    """For each buffer, the buffers whose lifetimes intersect its own (they may not share bytes)."""
    by_start = sorted(range(len(buffers)), key=lambda k: buffers[k].start)
    out: list[list[int]] = [[] for _ in buffers]
    for n, i in enumerate(by_start):
        for j in by_start[n + 1:]:
            if buffers[j].start > buffers[i].end:
                break
            out[i].append(j)
            out[j].append(i)
    return out


def _peak(buffers: Sequence[Buffer], offsets: Sequence[int]) -> int:
    return max((off + b.size_bytes for b, off in zip(buffers, offsets)), default=0)


def _live_orders(buffers: Sequence[Buffer]) -> dict[str, list[int]]:
    """Orders led by how busy a buffer's lifetime is: "breadth" (Pisarchyk & Lee, 2020: the steps from the most
    bytes live to the least, at each the buffers live there and not yet listed, largest first), "peak" (the
    buffers live at the busiest step first, then the rest, each by end descending) and "busiest" (by the most
    bytes live during the buffer's lifetime, then by start)."""
    steps = max((b.end for b in buffers), default=-1) + 1
    live: list[list[int]] = [[] for _ in range(steps)]
    total = [0] * steps
    for k, b in enumerate(buffers):
        for t in range(b.start, b.end + 1):
            live[t].append(k)
            total[t] += b.size_bytes
    breadth: list[int] = []
    seen: set[int] = set()
    for t in sorted(range(steps), key=lambda t: -total[t]):
        for k in sorted(live[t], key=lambda k: -buffers[k].size_bytes):
            if k not in seen:
                seen.add(k)
                breadth.append(k)
    peak = max(range(steps), key=lambda t: total[t]) if steps else 0
    busiest = [max(total[b.start:b.end + 1]) for b in buffers]
    return {"breadth": breadth,
            "peak": sorted(range(len(buffers)), key=lambda k: (not buffers[k].start <= peak <= buffers[k].end,
                                                               -buffers[k].end, -buffers[k].size_bytes)),
            "busiest": sorted(range(len(buffers)), key=lambda k: (-busiest[k], buffers[k].start))}


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


def _place(buffers: Sequence[Buffer], order: Sequence[int], conflicts: Sequence[Sequence[int]],
           fit: str = "best") -> list[int]:
    """Offsets, placing buffers in ``order``: each takes, among the gaps left by the already placed buffers live
    at the same time, the smallest that holds it (``fit="best"``) or the lowest (``"first"``); else goes on top."""
    offsets: list[int | None] = [None] * len(buffers)
    for k in order:
        size = buffers[k].size_bytes
        busy = sorted((offsets[j], offsets[j] + buffers[j].size_bytes) for j in conflicts[k] if offsets[j] is not None)
        best_off, best_gap, cursor = None, None, 0
        for lo, hi in busy:
            gap = lo - cursor
            if gap >= size and (best_gap is None or gap < best_gap):
                best_off, best_gap = cursor, gap
                if fit == "first":
                    break
            cursor = max(cursor, hi)
        offsets[k] = best_off if best_off is not None else cursor
    return offsets


def check_plan(graph: Graph, plan: MemoryPlan) -> None:
    """Raise if two arena tensors with intersecting lifetimes overlap without being the same buffer."""
    for (a, off_a), (b, off_b) in _pairs(plan.buffers):
        if a.start <= b.end and b.start <= a.end and off_a < off_b + b.size_bytes and off_b < off_a + a.size_bytes:
            raise CompileError(f"memory plan overlap: {a.tensors[0]!r} and {b.tensors[0]!r}")


def _pairs(items):
    for i, x in enumerate(items):
        for y in items[i + 1:]:
            yield x, y
