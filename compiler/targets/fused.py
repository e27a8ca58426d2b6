"""Tiling and cycles of the fused LoRA steps (LoraLinear, LoraLinearGrad): the row-panel kernels of
compiler/codegen/hal/ef_hal_lora.c, charged the way tiling.py charges a GEMM.

Per device, the rows are walked in panels of ``mt`` rows, and every panel's activations cross the DMA once:

    LoraLinear       x panel in; S = scale·x·A; per column tile of y: Z = x·W' (+ alpha, C), Z = S·B + Z, Z out
    LoraLinearGrad   dY and x panels in; dS = scale·dY·Bᵀ; per column tile of dX: Z = dY·W'ᵀ, Z = dS·Aᵀ + Z,
                     Z out; dA += xᵀ·dS; dB += (scale·x·A)ᵀ·dY (accumulators in L1, out once per device)

A, B (and their transposes) stay in L1 for the device; W' stays in L1 for the whole step when it fits, else
it is streamed in column tiles once per panel. Streamed buffers are double-buffered. The configuration is
chosen as for a GEMM: fewest DMA bytes first (so more L1 never moves more bytes), then fewest cycles. When not
even a one-row panel fits, the kernel falls back to the cores reading L2 directly; that is charged as every
operand crossing the L2->L1 link once per row it is used for, with no overlap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from compiler.ops import get_op, ops_where
from compiler.ops.linear import lora_dims
from compiler.program import Step, TensorInfo
from compiler.targets.cost import (Flow, StepCost, candidates, cluster_elementwise_cycles, cluster_gemm_cycles,
                                   dma_cycles, pipeline_cycles, redmule_job_cycles, split)
from compiler.targets.spec import Target

WORD = 4
FUSED_OPS = ops_where(lambda op: op.cost == "fused")  # LoraLinear, LoraLinearGrad


@dataclass(frozen=True)
class _Shape:
    m: int          # rows per device
    n: int          # output features of the layer
    k: int          # input features
    r: int
    devices: int
    trans_b: bool


@dataclass(frozen=True)
class _Config:
    mt: int                  # rows per panel
    ct: int                  # column tile of the output (y: over N; dX: over K)
    resident_w: bool
    tiles: int               # pipeline stages: (panel, column tile) pairs over all devices
    footprint: int           # L1 bytes
    traffic: Mapping[str, float]  # operand ("x", "dy", "w", "c", "ab") -> bytes moved L2 -> L1
    streamed_in: float       # bytes per step, L2 -> L1, spread over the panels
    once_in: float           # bytes loaded once (A, B, resident W)
    out: float               # streamed out (y or dX)
    once_out: float          # written once (dA, dB)
    transfers_in: int
    transfers_out: int


def _shape(step: Step, tensors: Mapping[str, TensorInfo]) -> _Shape:
    names = step.inputs if step.op == "LoraLinear" else step.inputs[1:]
    x, w, a, b = (tensors[n].shape for n in names[:4])
    m, n, k, r, d = lora_dims(x, w, a, b, int(step.attrs.get("transB", 0)))
    return _Shape(m // d, n, k, r, d, bool(step.attrs.get("transB", 0)))


def _adapter_floats(s: _Shape, forward: bool, grads: str) -> int:
    """Adapter floats one device loads: A and B forward; backward B (for dS), A for Aᵀ (dX) and again for S (dB)."""
    if forward:
        return s.k * s.r + s.r * s.n
    return (("x" in grads or "a" in grads) * s.r * s.n + ("x" in grads) * s.k * s.r + ("b" in grads) * s.k * s.r)


def _configs(step: Step, s: _Shape, grads: str, c_bytes: tuple[int, str], space: int) -> list[_Config]:
    forward = step.op == "LoraLinear"
    cols = s.n if forward else s.k          # output columns tiled (y over N, dX over K)
    depth = s.k if forward else s.n         # the frozen product's depth
    need_x_out = forward or "x" in grads
    found = []
    for mt in candidates(s.m):
        panels = s.devices * -(-s.m // mt)
        # resident parts: A, B (+ transposes in the backward), the rank-r panels, the accumulators
        fixed = s.k * s.r + s.r * s.n + mt * s.r
        if forward:
            act = 2 * mt * s.k
        else:
            fixed += s.r * s.n + ("x" in grads) * s.r * s.k
            fixed += ("a" in grads) * (s.k * s.r + s.k * mt) + ("b" in grads) * (s.r * s.n + 2 * s.r * mt)
            act = 2 * mt * s.n + 2 * mt * s.k
        stage = (s.trans_b if forward else not s.trans_b)  # W' (or W'ᵀ) moved as stored, transposed by cores
        options = [(res, ct) for res in (True, False) for ct in candidates(cols)] if need_x_out else [(True, cols)]
        for resident, ct in options:
            if not need_x_out:
                w_floats, z_floats = 0, 0
            elif resident:
                w_floats, z_floats = depth * cols * (1 + stage), 2 * mt * ct
            else:
                w_floats, z_floats = 2 * depth * ct * (1 + stage), 2 * mt * ct
            footprint = WORD * (fixed + act + w_floats + z_floats)
            if footprint > space:
                continue
            col_tiles = -(-cols // ct) if need_x_out else 0
            w_bytes = WORD * depth * cols if need_x_out else 0
            rows = s.devices * s.m
            c_total, c_axis = c_bytes
            traffic = {"x": WORD * rows * s.k, "dy": 0 if forward else WORD * rows * s.n,
                       "w": w_bytes * (1 if resident else panels),
                       "c": c_total * (panels if c_axis == "n" else 1),
                       "ab": WORD * s.devices * _adapter_floats(s, forward, grads)}
            once_in = traffic["ab"]  # a resident W still arrives tile by tile with the first panel's columns
            out = WORD * rows * cols if need_x_out else 0
            once_out = 0 if forward else WORD * s.devices * (("a" in grads) * s.k * s.r + ("b" in grads) * s.r * s.n)
            t_in = panels * ((1 if forward else 2) + (0 if resident else col_tiles) + (1 if c_total else 0))
            t_in += col_tiles if resident else 0
            found.append(_Config(mt, ct, resident, panels * max(col_tiles, 1), footprint, traffic,
                                 sum(traffic.values()) - once_in, once_in, out, once_out, t_in, panels * col_tiles))
    return found


def _compute(step: Step, s: _Shape, grads: str, cfg: _Config, target: Target, unit: str,
             epilogue: bool) -> tuple[float, int]:
    """(compute cycles, setup cycles) of the whole step on ``unit``."""
    jobs = {"wide": 0, "narrow": 0}

    def job(m: int, n: int, k: int, narrow: bool = False) -> int:
        """One product with an m x n output. The narrow ones, r columns wide (S, dS, dA), always run on the
        cores, where a narrow output wastes nothing (RedMulE's array is many columns wide)."""
        jobs["narrow" if narrow else "wide"] += 1
        if unit == "redmule" and not narrow:
            return redmule_job_cycles(target.redmule, m, n, k)
        return cluster_gemm_cycles(target, m, n, k)

    def cores(elements: int) -> int:
        return cluster_elementwise_cycles(target, "Mul", "elementwise", elements) if elements else 0

    def layout(elements: int) -> int:  # transposes for RedMulE's dense operands; the core kernels read strided
        if unit != "redmule" or not elements:
            return 0
        return target.fork_cycles + math.ceil(math.ceil(elements / target.cores) *
                                              target.cycles_per_element["data"])

    forward = step.op == "LoraLinear"
    cols = s.n if forward else s.k
    depth = s.k if forward else s.n
    total = 0
    stage = s.trans_b if forward else not s.trans_b
    w_layout = layout(depth * cols) if stage else 0
    total += s.devices * (0 if forward else layout(s.r * s.k))  # Aᵀ per device (dS·Aᵀ on RedMulE)
    total += w_layout if cfg.resident_w else 0
    for rows, count in split(s.m, cfg.mt):
        before = dict(jobs)
        per = 0
        per += job(rows, s.r, s.k if forward else s.n, narrow=True) + cores(rows * s.r)        # S, or dS
        if forward or "x" in grads:
            for width, n_cols in split(cols, cfg.ct):
                per += n_cols * (job(rows, width, depth) + job(rows, width, s.r))
                if not cfg.resident_w and stage:
                    per += n_cols * layout(depth * width)
            per += cores(rows * cols) if epilogue else 0
        if not forward and "a" in grads:
            per += job(s.k, s.r, rows, narrow=True)
        if not forward and "b" in grads:
            per += job(rows, s.r, s.k, narrow=True) + cores(rows * s.r) + layout(s.r * rows) + job(s.r, s.n, rows)
        total += per * count * s.devices
        for key in jobs:  # this panel size's jobs, for every panel of that size
            jobs[key] = before[key] + (jobs[key] - before[key]) * count * s.devices
    setup = jobs["wide"] * (target.redmule.job_setup_cycles if unit == "redmule" else target.fork_cycles) + \
        jobs["narrow"] * target.fork_cycles
    return total, int(setup)


def cost_fused(step: Step, tensors: Mapping[str, TensorInfo], levels: Mapping[str, str], target: Target,
               only_unit: str | None = None):
    """``only_unit``: cost the step on that unit only (calibration compares with what ran), not the cheaper."""
    s = _shape(step, tensors)
    forward = step.op == "LoraLinear"
    grads = "" if forward else step.attrs["grads"]
    c = step.inputs[4] if forward and len(step.inputs) > 4 and step.inputs[4] else None
    c_bytes = (0, "")
    if c:
        c_shape = tensors[c].shape
        c_size = math.prod(c_shape) if c_shape else 1
        c_bytes = (WORD * c_size, "full" if c_size == s.m * s.devices * s.n else "n")
    epilogue = (step.attrs.get("alpha", 1.0) != 1.0) or c is not None
    names = dict(zip(("x", "w", "a", "b", "c") if forward else ("dy", "x", "w", "a", "b"), step.inputs))
    far = {key for key, n in names.items() if n and levels.get(n, "L2") == "L3"}
    far |= {"ab"} if far & {"a", "b"} else set()
    far_out = sum(tensors[n].nbytes for n in step.outputs if levels.get(n, "L2") == "L3")
    macs = step.flops // 2
    units = target.units_for(step.op)
    units = tuple(u for u in units if only_unit in (None, u)) or units
    configs = _configs(step, s, grads, c_bytes, target.l1_tile_bytes)
    if not configs:
        far_in = sum(tensors[names[key]].nbytes for key in far if key in names)
        return _fallback(step, s, tensors, target, far_in, far_out, macs)
    links = target.links
    least = min(cf.streamed_in + cf.once_in + cf.out + cf.once_out for cf in configs)
    best = None
    for cf in configs:
        if cf.streamed_in + cf.once_in + cf.out + cf.once_out > least * (1 + 1e-9):
            continue
        far_in = sum(v for key, v in cf.traffic.items() if key in far)
        for unit in units:
            compute, setup = _compute(step, s, grads, cf, target, unit, epilogue)
            flow = Flow(cf.tiles, compute,
                        dma_cycles(links["L2->L1"], cf.streamed_in, cf.transfers_in),
                        dma_cycles(links["L1->L2"], cf.out, cf.transfers_out),
                        dma_cycles(links["L3->L2"], far_in, cf.transfers_in),
                        dma_cycles(links["L2->L3"], far_out),
                        dma_cycles(links["L2->L1"], cf.once_in, 2 * s.devices + cf.resident_w),
                        dma_cycles(links["L1->L2"], cf.once_out, (2 if cf.once_out else 0) * s.devices))
            cycles = pipeline_cycles(flow, target.options.double_buffering)
            key = (cycles, unit != "redmule", -cf.mt)
            if best is None or key < best[0]:
                best = (key, cf, unit, flow, compute, setup, far_in)
    (cycles, _, _), cf, unit, flow, compute, setup, far_in = best
    dma = flow.l2_l1 + flow.l1_l2 + flow.l3_l2 + flow.l2_l3 + flow.in_once + flow.out_once
    by_link = {"L2->L1": math.ceil(cf.streamed_in + cf.once_in), "L1->L2": math.ceil(cf.out + cf.once_out),
               "L3->L2": far_in, "L2->L3": far_out}
    return StepCost(step.name, step.op, get_op(step.op).kind, unit, int(cycles), int(compute), int(setup), int(dma),
                    cf.tiles, (cf.mt, cf.ct, s.r), cf.footprint, by_link, macs, {unit: int(cycles)})


def _fallback(step: Step, s: _Shape, tensors: Mapping[str, TensorInfo], target: Target, far_in: int,
              far_out: int, macs: int):
    """No panel fits L1: the core kernel reads L2 directly, W once per row, no overlap."""
    forward = step.op == "LoraLinear"
    rows = s.devices * s.m
    w = WORD * s.k * s.n
    ins = sum(tensors[n].nbytes for n in step.inputs if n) + w * (rows - 1)
    outs = sum(tensors[n].nbytes for n in step.outputs)
    compute = cluster_gemm_cycles(target, rows, s.n + 2 * s.r, s.k) if forward else \
        cluster_gemm_cycles(target, rows, s.k + 3 * s.r, s.n + s.r)
    dma = dma_cycles(target.links["L2->L1"], ins, rows) + dma_cycles(target.links["L1->L2"], outs, rows)
    dma += dma_cycles(target.links["L3->L2"], far_in) + dma_cycles(target.links["L2->L3"], far_out)
    by_link = {"L2->L1": ins, "L1->L2": outs, "L3->L2": far_in, "L2->L3": far_out}
    return StepCost(step.name, step.op, get_op(step.op).kind, "cluster", int(compute + dma), int(compute),
                    target.fork_cycles, int(dma), rows, (1, 1, s.r), 0, by_link, macs, {"cluster": int(compute + dma)})
