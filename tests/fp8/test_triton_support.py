"""The Triton backends' gate (sm_89+) on the CPU: the compute capability comes from
``triton_support.device_capability``, which these tests replace to play GPUs of several generations; the
real query is exercised by tests/fp8/test_gpu.py."""

from __future__ import annotations

import sys

import pytest
import torch

from dualflow.fp8 import BackendUnavailable, available_backends, cuda_quant, resolve_backend, triton_support
from dualflow.fp8 import gemm as gemm_mod
from dualflow.fp8.quant import resolve_quant_backend
from dualflow.fp8.triton_support import triton_unavailable_reason

CUDA = torch.device("cuda", 0)
pytest.importorskip("triton")


@pytest.fixture
def gpu_of(monkeypatch):
    """``gpu_of((8, 0))``: every capability query answers sm80 (availability caches are cleared around)."""
    def play(capability):
        gemm_mod._why_not_cached.cache_clear()
        monkeypatch.setattr(triton_support, "device_capability", lambda device: capability)

    yield play
    gemm_mod._why_not_cached.cache_clear()


@pytest.mark.parametrize(("capability", "usable"), [((7, 0), False), ((7, 5), False), ((8, 0), False),
                                                    ((8, 6), False), ((8, 9), True), ((9, 0), True),
                                                    ((10, 0), True), ((12, 0), True)])
def test_capability_threshold(capability, usable):
    reason = triton_unavailable_reason(CUDA, capability=capability)
    assert (reason is None) == usable
    if not usable:
        major, minor = capability
        assert "compute capability 8.9 or newer" in reason and f"has {major}.{minor} (sm{major}{minor})" in reason


def test_cpu_needs_the_interpreter(monkeypatch):
    assert triton_unavailable_reason("cpu") is None  # conftest runs Triton's interpreter on the CPU
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "need CUDA tensors (got cpu; TRITON_INTERPRET=1" in triton_unavailable_reason("cpu")
    monkeypatch.setitem(sys.modules, "triton", None)  # what an installation without Triton sees
    assert triton_unavailable_reason(CUDA, capability=(9, 0)) == "triton is not installed (pip install triton)"


def test_quantizers_fall_through_on_an_older_gpu(gpu_of, monkeypatch):
    gpu_of((8, 0))
    assert resolve_quant_backend("auto", CUDA) == "reference"
    with pytest.raises(RuntimeError, match=r"quantization backend 'triton' cannot run here: .* has 8\.0 \(sm80\)"):
        resolve_quant_backend("triton", CUDA)
    gpu_of((8, 9))
    with monkeypatch.context() as m:  # auto prefers the CUDA library's activation quantizer where it is built
        m.setattr(cuda_quant, "_library_problem", lambda: None)
        assert resolve_quant_backend("auto", CUDA) == "cuda"
        m.setattr(cuda_quant, "_library_problem", lambda: "libdualflow_cuda is not available")
        assert resolve_quant_backend("auto", CUDA) == "triton"
    assert resolve_quant_backend("triton", CUDA) == "triton"
    assert resolve_quant_backend("auto", "cpu") == "reference"  # auto picks Triton for CUDA tensors only
    assert resolve_quant_backend("triton", "cpu") == "triton"


def test_gemms_fall_through_on_an_older_gpu(gpu_of):
    for op in ("dense", "contiguous", "masked"):
        gpu_of((8, 6))
        assert resolve_backend("triton,reference", CUDA, op) == "reference"
        with pytest.raises(BackendUnavailable, match=r"triton: the Triton FP8 kernels need compute capability 8\.9 "
                                                     r".* has 8\.6 \(sm86\)"):
            resolve_backend("triton", CUDA, op)
        gpu_of((9, 0))
        assert resolve_backend("triton,reference", CUDA, op) == "triton"
    gpu_of((7, 5))
    assert "sm75" in available_backends(CUDA, "masked")["triton"]
