"""Fixtures of the comm tests."""

from __future__ import annotations

import os
import shutil

import pytest

from dualflow import _cuda


@pytest.fixture(scope="module")
def lib():
    """The CUDA library's ctypes handle; a failure where nvcc is present but nothing was built, else a skip."""
    from dualflow.comm import kernels

    if _cuda.library_path() is None:
        if os.environ.get("DUALFLOW_CUDA", "AUTO").upper() != "OFF" and shutil.which("nvcc"):
            pytest.fail("nvcc is present but libdualflow_cuda was not built (run `make build`)")
        pytest.skip("libdualflow_cuda not built")
    return kernels._lib()
