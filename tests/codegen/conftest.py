import ctypes
import shutil

import pytest

from compiler.codegen import build_hal_library, build_kernel_library
from tests.codegen.hal_harness import HAL_DEFINES, load_hal


@pytest.fixture(scope="session")
def kernel_lib(tmp_path_factory) -> ctypes.CDLL:
    if shutil.which("gcc") is None:
        pytest.skip("host gcc is not installed")
    return ctypes.CDLL(str(build_kernel_library(tmp_path_factory.mktemp("kernels"))))


@pytest.fixture(scope="session")
def hal(tmp_path_factory) -> ctypes.CDLL:
    """The generic HAL and the HAL kernels (tests/codegen/hal_harness.py)."""
    if shutil.which("gcc") is None:
        pytest.skip("host gcc is not installed")
    return load_hal(build_hal_library(tmp_path_factory.mktemp("hal"), defines=HAL_DEFINES))
