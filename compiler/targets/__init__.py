"""Targets: a TOML description of an SoC (``load_target``) and the lowering of a Program onto it
(``lower_to_target``: placement per memory level, L1 tiling, RedMulE or cores per step, cycles).

    >>> from compiler.targets import load_target, lower_to_target
    >>> lowered = lower_to_target(program, load_target("siracusa"))
    >>> lowered.report["perf"]["cycles_per_step"]
"""
from compiler.targets.cost import dma_cycles, redmule_job_cycles
from compiler.targets.lower import cost_program, lower_to_target
from compiler.targets.spec import Link, RedMulE, Target, TargetError, load_target, names

__all__ = ["Link", "RedMulE", "Target", "TargetError", "cost_program", "dma_cycles", "load_target",
           "lower_to_target", "names", "redmule_job_cycles"]
