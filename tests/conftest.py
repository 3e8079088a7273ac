"""Test-session set-up: device tiers and Triton's CPU interpreter.

- ``gpu`` tests are skipped without CUDA and ``multigpu`` tests with fewer than two GPUs, with the reason.
- Without CUDA, Triton kernels run under its interpreter (``TRITON_INTERPRET=1``, set before anything
  imports Triton) with exact FP8 conversions (see tests/triton_fp8.py).
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
NUM_GPUS = torch.cuda.device_count() if HAS_CUDA else 0

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.triton_fp8 import install as _install_fp8_fix

    _install_fp8_fix()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible (run `make test-gpu` on a GPU machine)")
    skip_multi = pytest.mark.skip(reason=f"needs >= 2 CUDA GPUs; {NUM_GPUS} visible")
    for item in items:
        if "multigpu" in item.keywords and NUM_GPUS < 2:
            item.add_marker(skip_multi)
        elif "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
