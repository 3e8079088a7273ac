"""Fixtures shared by the FP8 tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def cuda_quant_kernels():
    """Skips, with the reason, where the CUDA library's quantization kernels cannot run (no CUDA device, the
    library not built, a device before sm_89): the tests of those kernels use it."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from dualflow.fp8 import cuda_quant

    reason = cuda_quant.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
