"""The op registry: every module in this package is imported, and each Op subclass registers itself."""
import importlib
import pkgutil

from compiler.ops.base import REGISTRY, Op, Shape, get_op


def load_all() -> dict[str, Op]:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY


load_all()

__all__ = ["REGISTRY", "Op", "Shape", "get_op", "load_all"]
