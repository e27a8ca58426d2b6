"""Every C kernel (forward ops and backward ops alike) against its op's numpy forward, called through the
codegen template table as generated code calls it. Iterates the registry: an op without cases fails."""
from __future__ import annotations

import numpy as np
import pytest

from compiler.codegen.templates import TEMPLATES
from compiler.ops import REGISTRY
from tests.codegen.harness import assert_close, call_kernel, expected_outputs
from tests.codegen.kernel_cases import CASES

SEED = 0


def _params():
    for name in sorted(REGISTRY):
        for i, c in enumerate(CASES.get(name, ())):
            yield pytest.param(name, c, id=f"{name}-{c.id or i}")


def test_every_registered_op_has_a_template_and_cases():
    no_template = sorted(set(REGISTRY) - set(TEMPLATES))
    no_cases = sorted(name for name in REGISTRY if not CASES.get(name))
    assert not no_template, f"ops without a C kernel template: {no_template}"
    assert not no_cases, f"ops without kernel test cases: {no_cases}"
    assert not sorted(set(TEMPLATES) - set(REGISTRY)), "templates for ops that are not registered"


def test_view_ops_have_no_kernel_and_others_do():
    for name, op in REGISTRY.items():
        assert TEMPLATES[name].view == op.view, name


@pytest.mark.parametrize("op_name, case", _params())
def test_kernel_matches_numpy_forward(kernel_lib, op_name, case):
    rng = np.random.default_rng(SEED)
    inputs = [make(rng) for make in case.inputs]
    want = expected_outputs(op_name, inputs, case.attrs)
    op = REGISTRY[op_name]
    if op.view:  # no code: the output is the input's bytes under another shape
        assert want[0].tobytes() == np.ascontiguousarray(inputs[0]).tobytes()
        return
    specs = [] if op.updates else [(w.shape, w.dtype) for w in want]
    got = call_kernel(kernel_lib, op_name, inputs, case.attrs, specs)
    assert len(got) == len(want)
    for j, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, f"{op_name} output {j}")


def _aliasable(name, case) -> bool:
    """The plan aliases output and input 0 only when their sizes and dtypes agree (broadcasting cases don't)."""
    inputs = [make(np.random.default_rng(SEED)) for make in case.inputs]
    (shape, dtype), = REGISTRY[name].output_specs([a.shape for a in inputs], [str(a.dtype) for a in inputs],
                                                  REGISTRY[name].resolve_attrs(dict(case.attrs)))[:1]
    return inputs[0].shape == shape and str(inputs[0].dtype) == dtype


def _inplace_params():
    for name in sorted(REGISTRY):
        if REGISTRY[name].inplace:
            for i, c in enumerate(CASES[name]):
                if _aliasable(name, c):
                    yield pytest.param(name, c, id=f"{name}-{c.id or i}")


@pytest.mark.parametrize("op_name, case", _inplace_params())
def test_inplace_kernel_may_overwrite_input_0(kernel_lib, op_name, case):
    """The memory plan lets an in-place op write its output over input 0 when the sizes agree."""
    rng = np.random.default_rng(SEED)
    inputs = [make(rng) for make in case.inputs]
    want = expected_outputs(op_name, inputs, case.attrs)[0]
    assert inputs[0].nbytes == want.nbytes and inputs[0].dtype == want.dtype
    got = call_kernel(kernel_lib, op_name, inputs, case.attrs, [(want.shape, want.dtype)], alias=True)[0]
    assert_close(got, want, f"{op_name} in place")
