import ctypes
import shutil

import pytest

from compiler.codegen import build_kernel_library


@pytest.fixture(scope="session")
def kernel_lib(tmp_path_factory) -> ctypes.CDLL:
    if shutil.which("gcc") is None:
        pytest.skip("host gcc is not installed")
    return ctypes.CDLL(str(build_kernel_library(tmp_path_factory.mktemp("kernels"))))
