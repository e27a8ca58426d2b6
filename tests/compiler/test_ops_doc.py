"""docs/ops.md is generated from the registry (compiler/catalog.py) and must be current."""
from pathlib import Path

from compiler.ops import REGISTRY
from compiler.catalog import public_ops, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "ops.md"


def test_ops_doc_is_up_to_date():
    assert DOC.read_text() == render(), "regenerate: python3 -m compiler.catalog > docs/ops.md"


def test_ops_doc_leaves_out_internal_ops():
    listed = {op.name for op in public_ops()}
    assert {"Clip", "HardSwish", "Gather", "Conv"} <= listed
    assert not listed & {"SGD", "LoraLinear", "ReluGrad", "GatherGrad", "SoftmaxCrossEntropy", "MSELoss"}
    assert all(name in listed for name, op in REGISTRY.items() if not (op.backward_only or op.internal))
