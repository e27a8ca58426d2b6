"""Tiling and unit choice for one step: tiles that fit the usable L1 twice over (double buffering), the bytes
each DMA link carries, and the cycles on RedMulE and on the cores.

Tile choice is lexicographic: fewest DMA bytes first (so a larger L1, which only adds feasible tiles, never
moves more bytes), then fewest cycles on the better unit. The unit is the faster one for that tiling.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from compiler.ir import CompileError
from compiler.ops import get_op
from compiler.program import Step, TensorInfo
from compiler.targets.cost import (Flow, StepCost, candidates, cluster_elementwise_cycles, cluster_gemm_cycles,
                                   dma_cycles, pipeline_cycles, redmule_job_cycles, split)
from compiler.targets.fused import cost_fused
from compiler.targets.fused_conv import cost_lora_conv
from compiler.targets.spec import Target
from compiler.targets.views import GemmView, Operand, gemm_view

WORD_BYTES = 4           # FP32 training numerics
RESIDENT_FRACTION = 16   # a small broadcast operand (<= 1/16 of the tile space) stays in L1 for the whole step


def cost_step(step: Step, tensors: Mapping[str, TensorInfo], levels: Mapping[str, str], target: Target,
              cache: dict | None = None, only_unit: str | None = None) -> StepCost:
    """``cache``: shared by the steps of one program on one target; GEMMs of equal shape and placement (the
    layers of a transformer) are tiled once. ``only_unit``: cost a GEMM or fused step on that unit only (what
    calibration measured), not the cheaper one. Every executed step pays ``options.step_overhead_cycles``."""
    cost = _cost_step(step, tensors, levels, target, cache, only_unit)
    extra = target.options.step_overhead_cycles
    if not extra or cost.unit == "none":
        return cost
    return dataclasses.replace(cost, cycles=cost.cycles + extra, setup_cycles=cost.setup_cycles + extra,
                               alternatives={u: c + extra for u, c in cost.alternatives.items()})


def _cost_step(step: Step, tensors: Mapping[str, TensorInfo], levels: Mapping[str, str], target: Target,
               cache: dict | None, only_unit: str | None) -> StepCost:
    op = get_op(step.op)
    if op.cost == "none":
        return StepCost(step.name, step.op, op.kind, "none", 0)
    if op.cost == "fused":
        return cost_fused(step, tensors, levels, target, only_unit)
    if op.cost == "composite":  # its parts pay no step overhead of their own: the step pays it once
        return cost_lora_conv(step, tensors, levels, lambda s, t, lv: _cost_step(s, t, lv, target, cache, only_unit))
    if op.cost == "int8":
        return _best_streaming(step, op.kind, tensors, levels, target, _int8_compute(step, tensors, target))
    if op.cost == "gemm":
        view = gemm_view(step, tensors, levels)
        if cache is None or only_unit is not None:
            return _best_gemm(step, view, target, only_unit)
        key = _anonymous(view)
        if key not in cache:
            cache[key] = _best_gemm(step, view, target)
        return dataclasses.replace(cache[key], name=step.name, op=step.op)
    return _best_streaming(step, op.kind, tensors, levels, target)


def _anonymous(view: GemmView) -> GemmView:
    def strip(o: Operand | None) -> Operand | None:
        return None if o is None else dataclasses.replace(o, name="")
    return dataclasses.replace(view, a=strip(view.a), b=strip(view.b), z=strip(view.z), c=strip(view.c))


# ---- GEMMs ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _GemmTiling:
    mt: int
    nt: int
    kt: int
    group: int            # instances per tile when a whole instance fits (1 otherwise)
    order: str            # "a": A row-panel kept while B tiles stream; "b": the reverse; "k": K is tiled
    traffic: Mapping[str, float]   # operand ("a", "b", "c", "z") -> bytes moved over L2<->L1
    loads: Mapping[str, int]       # operand -> DMA transfers
    tiles: int
    footprint: int

    @property
    def bytes(self) -> float:
        return sum(self.traffic.values())


def _tiling(view: GemmView, mt: int, nt: int, space: int) -> _GemmTiling | None:
    """Tiles of mt x nt outputs with the deepest K slice that fits ``space`` twice over; None if none does."""
    fixed = mt * nt + ({"n": nt, "m": mt, "full": mt * nt}.get(view.c_axis, 0) if view.c else 0)
    kt = min(view.k, (space // (2 * WORD_BYTES) - fixed) // (mt + nt))
    if kt < 1:
        return None
    n_m, n_n, n_k = -(-view.m // mt), -(-view.n // nt), -(-view.k // kt)
    reread = {"a": 1.0, "b": 1.0, "z": 1.0}  # im2col operands: halo and per-tap re-reads
    if view.spatial:
        reread[view.spatial.operand] = view.spatial.factor({"m": mt, "n": nt, "k": kt})
    a, b = view.a.nbytes * reread["a"], view.b.nbytes * reread["b"]
    if n_k == 1:
        order = "a" if a + b * n_m <= a * n_n + b else "b"
    else:
        order = "k"
    if order == "a":
        traffic = {"a": a, "b": b * n_m}
        loads = {"a": n_m, "b": n_m * n_n}
    elif order == "b":
        traffic = {"a": a * n_n, "b": b}
        loads = {"a": n_m * n_n, "b": n_n}
    else:
        traffic = {"a": a * n_n, "b": b * n_m}
        loads = {"a": n_m * n_n * n_k, "b": n_m * n_n * n_k}
    traffic["z"] = view.z.nbytes * reread["z"]
    loads["z"] = n_m * n_n
    if view.c:
        traffic["c"] = view.c.nbytes * {"n": n_m, "m": n_n}.get(view.c_axis, 1)
        loads["c"] = n_m * n_n
    footprint = 2 * WORD_BYTES * (mt * kt + kt * nt + fixed)
    group, tiles = 1, view.instances * n_m * n_n * n_k
    if tiles == view.instances and view.instances > 1:  # whole instances fit: several per tile (3-D DMA)
        group = max(1, min(view.instances, space // footprint))
        tiles = -(-view.instances // group)
        loads = {key: tiles for key in loads}
        footprint *= group
    else:
        loads = {key: v * view.instances for key, v in loads.items()}
    return _GemmTiling(mt, nt, kt, group, order, traffic, loads, tiles, footprint)


def _gemm_flow(view: GemmView, t: _GemmTiling, target: Target, unit: str) -> tuple[Flow, int, int]:
    """(flow, compute cycles, setup cycles) of tiling ``t`` on ``unit``."""
    links = target.links
    operands: dict[str, Operand] = {"a": view.a, "b": view.b, "z": view.z}
    if view.c:
        operands["c"] = view.c
    ins = [key for key in operands if key != "z"]
    l2_l1 = dma_cycles(links["L2->L1"], sum(t.traffic[k] for k in ins), sum(t.loads[k] for k in ins))
    l1_l2 = dma_cycles(links["L1->L2"], t.traffic["z"], t.loads["z"])
    far = [k for k in ins if operands[k].level == "L3"]
    l3_l2 = dma_cycles(links["L3->L2"], sum(t.traffic[k] for k in far), sum(t.loads[k] for k in far))
    l2_l3 = dma_cycles(links["L2->L3"], t.traffic["z"], t.loads["z"]) if view.z.level == "L3" else 0

    jobs = compute = 0
    for ms, cm in split(view.m, t.mt):
        for ns, cn in split(view.n, t.nt):
            for ks, ck in split(view.k, t.kt):
                count = cm * cn * ck * view.instances
                jobs += count
                if unit == "redmule":
                    compute += count * redmule_job_cycles(target.redmule, ms, ns, ks)
                else:
                    compute += count * cluster_gemm_cycles(target, ms, ns, ks)
    setup = jobs * (target.redmule.job_setup_cycles if unit == "redmule" else target.fork_cycles)
    refetch = {"a": t.traffic["a"] / max(view.a.nbytes, 1), "b": t.traffic["b"] / max(view.b.nbytes, 1), "z": 1.0}
    layout = sum(op.layout_elements * refetch[key] for key, op in operands.items()
                 if key != "c" and (unit == "redmule" or not op.layout_for_redmule_only))
    if layout:
        compute += target.fork_cycles + math.ceil(layout / target.cores) * target.cycles_per_element["data"]
    return Flow(t.tiles, compute, l2_l1, l1_l2, l3_l2, l2_l3), compute, setup


def _best_gemm(step: Step, view: GemmView, target: Target, only_unit: str | None = None) -> StepCost:
    space = target.l1_tile_bytes
    tilings = [t for mt in candidates(view.m) for nt in candidates(view.n)
               if (t := _tiling(view, mt, nt, space)) is not None]
    least = min(t.bytes for t in tilings)
    units = target.units_for(step.op)
    units = tuple(u for u in units if only_unit in (None, u)) or units
    best = None
    for t in tilings:
        if t.bytes > least * (1 + 1e-9):
            continue
        for unit in units:
            flow, compute, setup = _gemm_flow(view, t, target, unit)
            cycles = pipeline_cycles(flow, target.options.double_buffering)
            key = (cycles, unit != "redmule", -t.mt * t.nt)
            if best is None or key < best[0]:
                best = (key, t, unit, flow, compute, setup)
    _, t, unit, flow, compute, setup = best
    alternatives = {u: pipeline_cycles(_gemm_flow(view, t, target, u)[0], target.options.double_buffering)
                    for u in units}
    traffic_in = sum(v for k, v in t.traffic.items() if k != "z")
    far_in = sum(v for k, v in t.traffic.items() if k != "z" and getattr(view, k).level == "L3")
    links = {"L2->L1": math.ceil(traffic_in), "L1->L2": math.ceil(t.traffic["z"]),
             "L3->L2": math.ceil(far_in), "L2->L3": math.ceil(t.traffic["z"]) if view.z.level == "L3" else 0}
    return StepCost(step.name, step.op, get_op(step.op).kind, unit, alternatives[unit], int(compute), int(setup),
                    int(flow.l2_l1 + flow.l1_l2 + flow.l3_l2 + flow.l2_l3), t.tiles, (t.mt, t.nt, t.kt),
                    t.footprint, links, view.macs, alternatives)


# ---- everything else: streamed through L1 on the cores ----------------------------------------------------
def _int8_compute(step: Step, tensors: Mapping[str, TensorInfo], target: Target) -> Callable[[int], int]:
    """An int8 layer (QConv, QLinear) on the cores, per tiling: a parallel region per tile, the int8 MACs at
    ``cluster.int8_macs_per_cycle_per_core`` (4-way int8 dot products), and the requantization of every output
    at the target's elementwise cost. Its operands stream through L1 like any streamed step (each byte once)."""
    if not target.int8_macs_per_cycle:
        raise CompileError(f"target {target.name!r} has no cluster.int8_macs_per_cycle_per_core for the int8 layer "
                           f"{step.name!r}")
    outputs = math.prod(tensors[step.outputs[0]].shape)
    macs = outputs * math.prod(tensors[step.inputs[1]].shape[1:])  # QConv: C/g·kh·kw per output; QLinear: K
    requant = math.ceil(outputs / target.cores) * target.element_cycles(step.op, "elementwise")

    def compute(tiles: int) -> int:
        return tiles * target.fork_cycles + math.ceil(macs / (target.cores * target.int8_macs_per_cycle)) + \
            math.ceil(requant)
    return compute


def _best_streaming(step: Step, kind: str, tensors: Mapping[str, TensorInfo], levels: Mapping[str, str],
                    target: Target, compute_for: Callable[[int], int] | None = None) -> StepCost:
    op = get_op(step.op)
    ins = [tensors[n] for n in step.inputs if n]
    outs = [tensors[n] for n in step.outputs] + [_updated(op, tensors[step.inputs[i]], step.attrs, i) for i in op.updates
                                                   if i < len(step.inputs) and step.inputs[i]]
    elements = max([_elements(t) for t in ins + outs] + [0])
    if elements == 0:
        return StepCost(step.name, step.op, kind, "none", 0)
    work = max(elements, step.flops) if kind == "pool" else elements
    space = target.l1_tile_bytes
    largest = max(t.nbytes for t in ins + outs)
    resident = [t for t in ins + outs if t.nbytes < largest and t.nbytes * RESIDENT_FRACTION <= space]
    if 2 * sum(t.nbytes for t in resident) > space:
        resident = []
    res_names = {id(t) for t in resident}
    s_in = [t for t in ins if id(t) not in res_names]
    s_out = [t for t in outs if id(t) not in res_names]
    r_in = [t for t in ins if id(t) in res_names]
    r_out = [t for t in outs if id(t) in res_names]
    streamed = sum(t.nbytes for t in s_in + s_out)
    avail = space - sum(t.nbytes for t in resident)
    first = max(1, math.ceil(2 * streamed / avail))
    links = target.links

    def group(tensors_: list[TensorInfo], far: bool) -> tuple[int, int]:
        chosen = [t for t in tensors_ if not far or levels.get(t.name, "L2") == "L3"]
        return sum(t.nbytes for t in chosen), len(chosen)

    def moved(link: str, sized: tuple[int, int], transfers: int) -> int:
        return dma_cycles(links[link], sized[0], transfers * sized[1])

    s_in_all, s_in_far, s_out_all, s_out_far = group(s_in, False), group(s_in, True), group(s_out, False), \
        group(s_out, True)
    once_in = moved("L3->L2", group(r_in, True), 1) + moved("L2->L1", group(r_in, False), 1)
    once_out = moved("L1->L2", group(r_out, False), 1) + moved("L2->L3", group(r_out, True), 1)

    def flow_for(tiles: int) -> Flow:
        compute = compute_for(tiles) if compute_for else cluster_elementwise_cycles(target, step.op, kind, work, tiles)
        return Flow(tiles, compute, moved("L2->L1", s_in_all, tiles), moved("L1->L2", s_out_all, tiles),
                    moved("L3->L2", s_in_far, tiles), moved("L2->L3", s_out_far, tiles), once_in, once_out)

    flow = flow_for(first)   # the fewest tiles that fit twice over: what the firmware does (hal/ef_hal_stream.c)
    tiles = flow.tiles
    far_in = sum(t.nbytes for t in ins if levels.get(t.name, "L2") == "L3")
    far_out = sum(t.nbytes for t in outs if levels.get(t.name, "L2") == "L3")
    by_link = {"L2->L1": sum(t.nbytes for t in ins), "L1->L2": sum(t.nbytes for t in outs),
               "L3->L2": far_in, "L2->L3": far_out}
    dma = flow.l2_l1 + flow.l1_l2 + flow.l3_l2 + flow.l2_l3 + flow.in_once + flow.out_once
    footprint = 2 * math.ceil(streamed / tiles) + sum(t.nbytes for t in resident)
    cycles = pipeline_cycles(flow, target.options.double_buffering)
    return StepCost(step.name, step.op, kind, "cluster", cycles, int(flow.compute), tiles * target.fork_cycles,
                    int(dma), tiles, (math.ceil(elements / tiles),), footprint, by_link, 0, {"cluster": cycles})


def _updated(op, info: TensorInfo, attrs: Mapping[str, Any], index: int) -> TensorInfo:
    """The part of in-place updated input ``index`` the step reads and writes (a sparse update's channels)."""
    shape = op.update_shape(info.shape, index, **attrs)
    return info if shape == tuple(info.shape) else dataclasses.replace(info, shape=shape)


def _elements(t: TensorInfo) -> int:
    return math.prod(t.shape) if t.shape else 1
