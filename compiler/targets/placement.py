"""Placement: each persistent tensor and the arena go to L2 when they fit, the rest goes down to L3.

L2 has ``l2_bytes - l2_reserved_bytes`` for the program. When the parameter region plus the arena (one
region shared by the training and evaluation phases: they never run at once) does not fit, tensors are
demoted to L3 in this order, largest first within a class:

    1. frozen weights     read-only: one direction of traffic, read in the forward and backward passes
    2. optimizer state    touched once per step, by the SGD update only
    3. trainable params   read forward and backward, read and written by the update
    4. the arena          activations and gradients are written and read back within every step, so the
                          arena goes after the weights, and only in part: a window of arena offsets as large
                          as what is left of L2 stays there. The window is placed where the tensors lying
                          wholly inside it carry the most traffic (bytes x steps touching them, training
                          phase); every other arena tensor, including those straddling an edge, lives in L3
    5. constants, hyperparameters: scalars and small vectors read by many steps; they leave L2 only when
                          the whole arena already has.

After demotion, demoted tensors that fit in what is left of L2 are promoted back (last demoted first).
If L3 cannot hold what was demoted, placement fails naming the tensor that overflowed and the shortfall.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from compiler.ir import CompileError, Role
from compiler.plan import ALIGN_BYTES, align
from compiler.program import Program
from compiler.targets.spec import Target

DEMOTION_RANK = {Role.FROZEN.value: 0, Role.OPT_STATE.value: 1, Role.TRAINABLE.value: 2,
                 Role.CONSTANT.value: 4, Role.HYPER.value: 4}
ARENA_RANK = 3
PHASES = ("train", "evaluate")


@dataclass(frozen=True)
class Placement:
    levels: Mapping[str, str]                   # tensor -> "L2" | "L3" (arena tensors: the training phase's)
    phase_levels: Mapping[str, Mapping[str, str]]  # phase -> tensor -> level, for the cost model
    arena_bytes: int                            # the arena region (max over the phases)
    arena_l2_bytes: int                         # size of the arena window kept in L2
    arena_window: tuple[int, int]               # [start, end) of arena offsets mapped to L2
    bytes_by_level: Mapping[str, int]           # program bytes resident in L2 and L3
    demoted: tuple[str, ...]                    # persistent tensors in L3, in demotion order


def _roots(program: Program) -> tuple[dict[str, int], dict[str, str]]:
    """Persistent tensors (name -> aligned size) and views of them (view -> root, by shared offset)."""
    sizes = {n: align(program.tensors[n].nbytes) for n in program.param_offsets if program.tensors[n].persistent}
    at_offset = {program.param_offsets[n]: n for n in sizes if sizes[n] > 0}
    views = {n: at_offset[off] for n, off in program.param_offsets.items()
             if n not in sizes and off in at_offset}
    return sizes, views


def place(program: Program, target: Target) -> Placement:
    """With the target option default_level = "L3" nothing is kept in L2: every tensor and the whole arena
    live in L3 (the reference framework's setup)."""
    sizes, views = _roots(program)
    budget = target.l2_budget_bytes if target.options.default_level == "L2" else 0
    arena = max(program.train.arena_bytes, program.evaluate.arena_bytes)
    order = sorted(sizes, key=lambda n: (DEMOTION_RANK[program.tensors[n].role], -sizes[n], n))
    in_l2 = set(sizes)
    demoted: list[str] = []
    params_l2, cut = sum(sizes.values()), arena

    def over() -> int:
        return params_l2 + cut - budget

    def split(cut_: int) -> int:
        return max(0, cut_ - over()) // ALIGN_BYTES * ALIGN_BYTES

    for name in order:
        if over() <= 0:
            break
        if DEMOTION_RANK[program.tensors[name].role] > ARENA_RANK and cut:  # the arena's turn
            cut = split(cut)
            if over() <= 0:
                break
        in_l2.discard(name)
        demoted.append(name)
        params_l2 -= sizes[name]
    if over() > 0 and cut:  # no constants left to stop at: the arena gives way
        cut = split(cut)
    if cut == arena:
        for name in reversed(list(demoted)):  # promote back what fits in what is left
            if over() + sizes[name] <= 0:
                in_l2.add(name)
                demoted.remove(name)
                params_l2 += sizes[name]

    levels = {n: ("L2" if n in in_l2 else "L3") for n in sizes}
    levels.update({v: levels[r] for v, r in views.items()})
    start = 0 if cut == arena else _window(program, cut)
    window = (start, start + cut)
    phase_levels: dict[str, dict[str, str]] = {}
    far: list[tuple[int, int]] = []
    for phase_name in PHASES:
        phase = getattr(program, phase_name)
        own = dict(levels)
        for n, off in phase.arena_offsets.items():
            end = off + program.tensors[n].nbytes
            inside = window[0] <= off and end <= window[1]
            own[n] = "L2" if inside else "L3"
            if not inside:
                far.append((off, end))
        phase_levels[phase_name] = own
    for phase_name in reversed(PHASES):  # the training phase's level wins for tensors in both
        for n in getattr(program, phase_name).arena_offsets:
            levels[n] = phase_levels[phase_name][n]

    arena_l3 = max(e for _, e in far) - min(o for o, _ in far) if far else 0  # one block, same offsets
    l3_bytes = sum(sizes[n] for n in demoted) + arena_l3
    _check_l3(program, target, demoted, sizes, arena_l3, l3_bytes, phase_levels["train"])
    l2_bytes = sum(sizes[n] for n in in_l2) + cut
    return Placement(levels, phase_levels, arena, cut, window, {"L2": l2_bytes, "L3": l3_bytes}, tuple(demoted))


def _window(program: Program, size: int) -> int:
    """The start of the ``size``-byte window of arena offsets whose wholly-contained tensors carry the most
    training-phase traffic (bytes x number of steps reading or writing them)."""
    phase = program.train
    touches: dict[str, int] = {}
    for step in phase.steps:
        for name in (*step.inputs, *step.outputs):
            touches[name] = touches.get(name, 0) + 1
    names = list(phase.arena_offsets)
    if not names or size <= 0:
        return 0
    offs = np.array([phase.arena_offsets[n] for n in names], dtype=np.int64)
    ends = offs + np.array([program.tensors[n].nbytes for n in names], dtype=np.int64)
    weight = (ends - offs) * np.array([touches.get(n, 0) for n in names], dtype=np.int64)
    arena = max(phase.arena_bytes, program.evaluate.arena_bytes)
    starts = np.unique(np.clip(np.concatenate([offs, ends - size, [0]]), 0, max(0, arena - size)))
    inside = (offs[None, :] >= starts[:, None]) & (ends[None, :] <= starts[:, None] + size)
    return int(starts[int(np.argmax(inside @ weight))])


def _check_l3(program: Program, target: Target, demoted: list[str], sizes: Mapping[str, int], arena_l3: int,
              l3_bytes: int, train_levels: Mapping[str, str]) -> None:
    budget = target.l3_budget_bytes
    if l3_bytes <= budget:
        return
    short = l3_bytes - budget
    items = [(n, sizes[n]) for n in demoted if DEMOTION_RANK[program.tensors[n].role] < ARENA_RANK]
    if arena_l3:
        in_l3 = [n for n in program.train.arena_offsets if train_levels.get(n) == "L3"]
        largest = max(in_l3 or list(program.train.arena_offsets), key=lambda n: program.tensors[n].nbytes)
        items.append((largest, arena_l3))
    items += [(n, sizes[n]) for n in demoted if DEMOTION_RANK[program.tensors[n].role] > ARENA_RANK]
    placed = 0
    for name, size in items:
        placed += size
        if placed > budget:
            raise CompileError(f"program does not fit {target.name}: tensor {name!r} "
                               f"({program.tensors[name].nbytes:,} B) short by {short:,} B in L3")
