"""The target description: a TOML file read with tomllib into a frozen ``Target``.

A built-in target is a TOML file in this package (``siracusa.toml``, ``siracusa-small-l2.toml``); a user's
own target is any path to a TOML file with the same keys. ``SCHEMA`` below is the whole format: one row per
key (dotted path, type, bound, required). Every problem is a one-line ``TargetError`` naming the key.
"""
from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from compiler.ir import CompileError
from compiler.ops import REGISTRY

CORE_KINDS = ("elementwise", "reduction", "pool", "norm", "data", "loss", "optimizer")
LINKS = {"L3->L2": "l3_to_l2", "L2->L3": "l2_to_l3", "L2->L1": "l2_to_l1", "L1->L2": "l1_to_l2"}


class TargetError(CompileError):
    """A target file that cannot be used; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Link:
    """One DMA direction between two memory levels."""
    bandwidth_bytes_per_cycle: float
    latency_cycles: int  # fixed cost per transfer: programming the DMA plus the first beat's round trip


@dataclass(frozen=True)
class RedMulE:
    rows: int                    # rows of Z computed in parallel (ARRAY_WIDTH in the RTL)
    columns: int                 # compute elements per row (ARRAY_HEIGHT in the RTL)
    pipeline_depth: int          # pipeline registers per CE (PIPE_REGS); each CE interleaves depth+1 outputs
    fp32_macs_per_cycle: float   # peak multiply-accumulates per cycle in the FP32 mode used for training
    job_setup_cycles: int        # per job: programming the registers, trigger, completion event

    @property
    def tile_columns(self) -> int:
        """Columns of Z covered by one pass of the array: columns x (pipeline_depth + 1)."""
        return self.columns * (self.pipeline_depth + 1)


@dataclass(frozen=True)
class TargetOptions:
    """How the program is scheduled on the target ([options] of the target file; defaults: edgefleet's own)."""
    default_level: str = "L2"               # "L3": every tensor (parameters and arena) lives in L3
    double_buffering: bool = True           # False: a tile's DMA in, compute and DMA out do not overlap
    redmule_ops: tuple[str, ...] | None = None   # ops allowed on RedMulE (None: every GEMM-like op)
    step_overhead_cycles: int = 0           # per executed step: kernel dispatch, tiling loop control, barriers
    l1_tile_bytes: int = 0                  # L1 bytes for tiles; 0: memory.l1_bytes x memory.l1_tile_fraction


@dataclass(frozen=True)
class Target:
    name: str
    clock_mhz: float
    cores: int
    l1_bytes: int
    l2_bytes: int
    l3_bytes: int
    l1_tile_fraction: float
    l2_reserved_bytes: int
    l3_reserved_bytes: int
    links: Mapping[str, Link]                       # "L3->L2", "L2->L3", "L2->L1", "L1->L2"
    redmule: RedMulE | None                         # None: no GEMM accelerator, everything on the cores
    core_gemm_macs_per_cycle: float                 # per core, fallback GEMM kernel on the cluster
    fork_cycles: int                                # per parallel region on the cluster (fork + barrier)
    cycles_per_element: Mapping[str, float]         # per op kind, per core
    op_cycles_per_element: Mapping[str, float] = field(default_factory=dict)  # per op name, overrides the kind
    source: str = ""
    options: "TargetOptions" = field(default_factory=lambda: TargetOptions())
    int8_macs_per_cycle: float = 0.0                # per core, int8 layers (4-way int8 dot products); 0: not given

    @property
    def l1_tile_bytes(self) -> int:
        """The L1 bytes tiles may use (double buffers included): options.l1_tile_bytes, else the fraction."""
        if self.options.l1_tile_bytes:
            return min(self.options.l1_tile_bytes, self.l1_bytes)
        return int(self.l1_bytes * self.l1_tile_fraction)

    def units_for(self, op: str) -> tuple[str, ...]:
        """The units a GEMM-like op may run on: RedMulE (when the target has one and its op set admits the op)
        and the cores."""
        allowed = self.options.redmule_ops
        if self.redmule is not None and (allowed is None or op in allowed):
            return ("redmule", "cluster")
        return ("cluster",)

    @property
    def l2_budget_bytes(self) -> int:
        return self.l2_bytes - self.l2_reserved_bytes

    @property
    def l3_budget_bytes(self) -> int:
        return self.l3_bytes - self.l3_reserved_bytes

    def element_cycles(self, op: str, kind: str) -> float:
        return self.op_cycles_per_element.get(op, self.cycles_per_element[kind])


# ---- the format ------------------------------------------------------------------------------------------
_POS_INT = ("int", "> 0")
_NAT_INT = ("int", ">= 0")
_POS_NUM = ("number", "> 0")
SCHEMA: dict[str, tuple[str, str, bool]] = {
    "name": ("str", "", False),
    "clock_mhz": (*_POS_NUM, True),
    "cores": (*_POS_INT, True),
    "memory.l1_bytes": (*_POS_INT, True),
    "memory.l2_bytes": (*_POS_INT, True),
    "memory.l3_bytes": (*_POS_INT, True),
    "memory.l1_tile_fraction": ("number", "in (0, 1]", True),
    "memory.l2_reserved_bytes": (*_NAT_INT, False),
    "memory.l3_reserved_bytes": (*_NAT_INT, False),
    **{f"dma.{key}.{field_}": (*kind, True) for key in LINKS.values()
       for field_, kind in (("bandwidth_bytes_per_cycle", _POS_NUM), ("latency_cycles", _NAT_INT))},
    "redmule.rows": (*_POS_INT, True),
    "redmule.columns": (*_POS_INT, True),
    "redmule.pipeline_depth": (*_NAT_INT, True),
    "redmule.fp32_macs_per_cycle": (*_POS_NUM, True),
    "redmule.job_setup_cycles": (*_NAT_INT, True),
    "cluster.gemm_macs_per_cycle_per_core": (*_POS_NUM, True),
    "cluster.fork_cycles": (*_NAT_INT, True),
    "cluster.int8_macs_per_cycle_per_core": (*_POS_NUM, False),
    **{f"cluster.cycles_per_element.{kind}": (*_POS_NUM, True) for kind in CORE_KINDS},
    "options.default_level": ("level", "", False),
    "options.double_buffering": ("bool", "", False),
    "options.redmule_ops": ("ops", "", False),
    "options.step_overhead_cycles": (*_NAT_INT, False),
    "options.l1_tile_bytes": (*_POS_INT, False),
}
OPTIONAL_TABLES = ("redmule",)           # a target without the table has no RedMulE
OP_OVERRIDES = "cluster.op_cycles_per_element"


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _check(where: str, key: str, value: Any, kind: str, bound: str) -> None:
    def fail(expect: str) -> None:
        raise TargetError(f"{where}: key '{key}' must be {expect}, got {value!r}")

    if kind == "str":
        if not isinstance(value, str) or not value:
            fail("a non-empty string")
        return
    if kind == "level":
        if value not in ("L2", "L3"):
            fail('"L2" or "L3"')
        return
    if kind == "bool":
        if not isinstance(value, bool):
            fail("true or false")
        return
    if kind == "ops":
        if not isinstance(value, list) or not all(isinstance(v, str) and v in REGISTRY for v in value):
            fail("a list of op names")
        return
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = is_int or (isinstance(value, float) and math.isfinite(value))
    if kind == "int" and not is_int:
        fail(f"an integer {bound}")
    if kind == "number" and not is_num:
        fail(f"a number {bound}")
    ok = {"> 0": value > 0, ">= 0": value >= 0, "in (0, 1]": 0 < value <= 1}[bound]
    if not ok:
        fail(f"a{'n integer' if kind == 'int' else ' number'} {bound}")


def parse_target(data: Mapping[str, Any], where: str, default_name: str) -> Target:
    """A Target from the parsed TOML ``data``; ``where`` names the file in error messages."""
    flat = _flatten(data)
    has_redmule = "redmule" in data
    overrides = {k[len(OP_OVERRIDES) + 1:]: v for k, v in flat.items() if k.startswith(OP_OVERRIDES + ".")}
    for key in flat:
        if key not in SCHEMA and not key.startswith(OP_OVERRIDES + "."):
            raise TargetError(f"{where}: unknown key '{key}'")
    for key, (kind, bound, required) in SCHEMA.items():
        optional_table = key.split(".")[0] in OPTIONAL_TABLES and not has_redmule
        if key not in flat:
            if required and not optional_table:
                raise TargetError(f"{where}: missing key '{key}'")
            continue
        _check(where, key, flat[key], kind, bound)
    for op, value in overrides.items():
        key = f"{OP_OVERRIDES}.{op}"
        if op not in REGISTRY:
            raise TargetError(f"{where}: key '{key}' names no op (known: {', '.join(sorted(REGISTRY))})")
        _check(where, key, value, "number", "> 0")
    for level in ("l2", "l3"):
        if flat.get(f"memory.{level}_reserved_bytes", 0) >= flat[f"memory.{level}_bytes"]:
            raise TargetError(f"{where}: key 'memory.{level}_reserved_bytes' must be smaller than "
                              f"memory.{level}_bytes")
    links = {name: Link(float(flat[f"dma.{key}.bandwidth_bytes_per_cycle"]), int(flat[f"dma.{key}.latency_cycles"]))
             for name, key in LINKS.items()}
    redmule = None
    if has_redmule:
        redmule = RedMulE(flat["redmule.rows"], flat["redmule.columns"], flat["redmule.pipeline_depth"],
                          float(flat["redmule.fp32_macs_per_cycle"]), flat["redmule.job_setup_cycles"])
    return Target(
        name=flat.get("name", default_name), clock_mhz=float(flat["clock_mhz"]), cores=flat["cores"],
        l1_bytes=flat["memory.l1_bytes"], l2_bytes=flat["memory.l2_bytes"], l3_bytes=flat["memory.l3_bytes"],
        l1_tile_fraction=float(flat["memory.l1_tile_fraction"]),
        l2_reserved_bytes=flat.get("memory.l2_reserved_bytes", 0),
        l3_reserved_bytes=flat.get("memory.l3_reserved_bytes", 0),
        links=MappingProxyType(links), redmule=redmule,
        core_gemm_macs_per_cycle=float(flat["cluster.gemm_macs_per_cycle_per_core"]),
        fork_cycles=flat["cluster.fork_cycles"],
        int8_macs_per_cycle=float(flat.get("cluster.int8_macs_per_cycle_per_core", 0.0)),
        cycles_per_element=MappingProxyType({k: float(flat[f"cluster.cycles_per_element.{k}"]) for k in CORE_KINDS}),
        op_cycles_per_element=MappingProxyType({k: float(v) for k, v in overrides.items()}),
        source=where, options=TargetOptions(
            default_level=flat.get("options.default_level", "L2"),
            double_buffering=flat.get("options.double_buffering", True),
            redmule_ops=tuple(flat["options.redmule_ops"]) if "options.redmule_ops" in flat else None,
            step_overhead_cycles=flat.get("options.step_overhead_cycles", 0),
            l1_tile_bytes=flat.get("options.l1_tile_bytes", 0)))


def names() -> list[str]:
    """The built-in targets."""
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir() if p.name.endswith(".toml"))


def load_target(name_or_path: str | os.PathLike) -> Target:
    """A built-in target by name (``siracusa``) or a user's TOML file by path."""
    text = os.fspath(name_or_path)
    if text in names():
        resource = resources.files(__package__) / f"{text}.toml"
        where, raw, stem = f"{text}.toml", resource.read_bytes(), text
    else:
        path = Path(text)
        if not path.is_file():
            raise TargetError(f"unknown target {text!r}: not a file and not a built-in target "
                              f"({', '.join(names())})")
        where, raw, stem = str(path), path.read_bytes(), path.stem
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TargetError(f"{where}: invalid TOML ({exc})") from None
    return parse_target(data, where, stem)
