"""The cycle model: plain functions of a Target and sizes (docs/target.md has the equations).

    dma        latency + ceil(bytes / bandwidth) per transfer
    RedMulE    setup + ceil(M/rows) * ceil(N/(columns*(depth+1))) * (ceil(K*rows*cols*(depth+1)/fp32_rate) + depth)
    cores GEMM fork + ceil(M*N*K / (cores * macs_per_core))
    cores      fork + ceil(elements / cores) * cycles_per_element
    pipeline   double buffering: tile i computes while tile i+1 loads and tile i-1 stores (or, with the
               target option double_buffering = false, everything in sequence)
    overhead   options.step_overhead_cycles per executed step (tiling.cost_step)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from compiler.targets.spec import Link, RedMulE, Target


def _ceil(x: float) -> int:
    return math.ceil(round(x, 6))  # 100 / 0.8 is 125.00000000000001 in binary floating point


def dma_cycles(link: Link, nbytes: float, transfers: int = 1) -> int:
    """``transfers`` DMA jobs moving ``nbytes`` in all over ``link``."""
    if nbytes <= 0 or transfers <= 0:
        return 0
    return transfers * link.latency_cycles + _ceil(nbytes / link.bandwidth_bytes_per_cycle)


def redmule_passes(rm: RedMulE, m: int, n: int) -> int:
    """Array passes for an M x N output: each pass computes a rows x (columns*(depth+1)) tile of Z."""
    return math.ceil(m / rm.rows) * math.ceil(n / rm.tile_columns)


def redmule_job_cycles(rm: RedMulE, m: int, n: int, k: int) -> int:
    """One RedMulE job Z[M,N] (+)= X[M,K] W[K,N] from L1: setup, then one pass per output tile; a pass takes
    K * (tile size / FP32 MACs per cycle) cycles plus the pipeline fill. Partial tiles cost a full pass."""
    per_pass = _ceil(k * rm.rows * rm.tile_columns / rm.fp32_macs_per_cycle) + rm.pipeline_depth
    return rm.job_setup_cycles + redmule_passes(rm, m, n) * per_pass


def cluster_gemm_cycles(target: Target, m: int, n: int, k: int) -> int:
    """The fallback GEMM kernel on all cores for one tile."""
    return target.fork_cycles + _ceil(m * n * k / (target.cores * target.core_gemm_macs_per_cycle))


def cluster_elementwise_cycles(target: Target, op: str, kind: str, elements: int, tiles: int = 1) -> int:
    """``elements`` of work split into ``tiles`` equal tiles (the last one shorter), each one parallel region."""
    if elements <= 0:
        return 0
    cpe = target.element_cycles(op, kind)
    per_tile = math.ceil(elements / tiles)
    full, rest = divmod(elements, per_tile)
    cycles = full * (target.fork_cycles + _ceil(math.ceil(per_tile / target.cores) * cpe))
    if rest:
        cycles += target.fork_cycles + _ceil(math.ceil(rest / target.cores) * cpe)
    return cycles


def split(total: int, tile: int) -> list[tuple[int, int]]:
    """(size, count) of the tiles covering ``total`` with tiles of ``tile``: full ones, then the remainder."""
    full, rest = divmod(total, tile)
    sizes = [(tile, full)] if full else []
    return sizes + [(rest, 1)] if rest else sizes


@dataclass(frozen=True)
class Flow:
    """What one step moves and computes, as totals over its tiles (cycles). ``*_once`` transfers happen
    before the first tile (inputs kept resident in L1) or after the last (resident results)."""
    tiles: int
    compute: float
    l2_l1: float = 0.0      # cluster DMA in, spread evenly over the tiles
    l1_l2: float = 0.0      # cluster DMA out
    l3_l2: float = 0.0      # L3 -> L2 for L3-resident inputs (runs ahead of the cluster DMA)
    l2_l3: float = 0.0      # L2 -> L3 for L3-resident outputs
    in_once: float = 0.0    # cluster DMA + L3 chain for resident inputs, before the first tile
    out_once: float = 0.0   # after the last tile


def pipeline_cycles(flow: Flow, overlap: bool = True) -> int:
    """``overlap`` False (single buffering): every transfer and every tile's compute in sequence.

    Double buffering: tile i computes while tile i+1 loads and tile i-1 stores. The cluster DMA carries
    both directions of the L2<->L1 traffic; the L3 link (HyperBus, half duplex) runs ahead as another stage.

        T = 1:  in + c + out
        T > 1:  in + max(c, in) + (T-2) max(c, in + out) + max(c, out) + out
    with in = max(L2->L1, L3->L2) per tile in steady state, and the first load / last store paying the
    whole L3 -> L2 -> L1 chain (and the resident transfers)."""
    if not overlap:
        return _ceil(flow.in_once + flow.l3_l2 + flow.l2_l1 + flow.compute + flow.l1_l2 + flow.l2_l3 + flow.out_once)
    t = flow.tiles
    c, i, o = flow.compute / t, flow.l2_l1 / t, flow.l1_l2 / t
    li, lo = flow.l3_l2 / t, flow.l2_l3 / t
    first = flow.in_once + li + i
    last = o + lo + flow.out_once
    if t == 1:
        return _ceil(first + c + last)
    steady = max(c, i + o, li + lo)
    return _ceil(first + max(c, i, li) + (t - 2) * steady + max(c, o, lo) + last)


def candidates(d: int) -> list[int]:
    """Tile sizes tried along a dimension of ``d``: independent of the target's L1, so more L1 only adds
    feasible tilings (tiling.py, fused.py)."""
    sizes = {d, 1} | {math.ceil(d / 2 ** i) for i in range(1, 9)}
    sizes |= {a * 2 ** i for a in (8, 12, 16) for i in range(12) if a * 2 ** i < d}
    return sorted(s for s in sizes if 1 <= s <= d)


@dataclass(frozen=True)
class StepCost:
    name: str
    op: str
    kind: str
    unit: str                         # "redmule" | "cluster" | "none"
    cycles: int
    compute_cycles: int = 0
    setup_cycles: int = 0             # RedMulE job setups, or the cluster's fork/barrier overheads
    dma_cycles: int = 0               # busy cycles summed over the links
    tiles: int = 0
    tile: tuple[int, ...] = ()        # (Mt, Nt, Kt) for GEMMs, (elements,) otherwise
    l1_bytes: int = 0                 # tile footprint, double buffers included
    bytes_by_link: Mapping[str, int] = field(default_factory=dict)
    macs: int = 0                     # useful multiply-accumulates (GEMM-like steps)
    alternatives: Mapping[str, int] = field(default_factory=dict)  # unit -> cycles with the same tiles
