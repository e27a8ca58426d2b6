"""The op registry: every module in this package is imported, and each Op subclass registers itself."""
import importlib
import pkgutil

from typing import Callable

from compiler.ops.base import REGISTRY, Op, Shape, get_op


def load_all() -> dict[str, Op]:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY


def ops_where(predicate: Callable[[Op], bool]) -> tuple[str, ...]:
    """Names of the registered ops an op group is made of (groups are derived, never re-listed by name)."""
    return tuple(name for name, op in REGISTRY.items() if predicate(op))


load_all()

UPDATE_OPS = ops_where(lambda op: bool(op.updates))  # nodes that write parameters in place: never pruned

__all__ = ["REGISTRY", "UPDATE_OPS", "Op", "Shape", "get_op", "load_all", "ops_where"]
