"""Malformed group indices on a GPU: the compiled Triton kernels stay inside guarded operands and record the
first malformed group; ``fp8_grouped_gemm`` with an :class:`Fp8ErrorFlag` makes no host synchronisation
(it is captured into a CUDA graph) and ``check()`` raises afterwards. The CPU side is tests/fp8/test_groups.py
(same cases, Triton's interpreter); the CUTLASS kernel is in tests/fp8/test_cutlass_gpu.py."""

from __future__ import annotations

import pytest
import torch

from dualflow.fp8 import Fp8ErrorFlag, fp8_grouped_gemm, quantize_1x128, quantize_128x128
from dualflow.fp8.triton_support import triton_unavailable_reason
from tests.fp8.helpers import assert_agrees, magnitude, scaled_randn
from tests.fp8.test_groups import CONTIGUOUS_CASES, MASKED_CASES, contiguous_case, masked_case

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture
def kernels():
    reason = triton_unavailable_reason(CUDA)
    if reason is not None:
        pytest.skip(reason)
    from dualflow.fp8.kernels import gemm

    return gemm


def _agrees(got, want, a, sa, b, sb):
    # the tensor core accumulates each 128-wide K block in limited precision (helpers.assert_agrees)
    assert_agrees(got, want, magnitude(a, sa, 1, b, sb, 128))


@pytest.mark.parametrize("offsets", CONTIGUOUS_CASES, ids=lambda o: "_".join(map(str, o)))
def test_triton_contiguous_stays_in_bounds_and_records(kernels, offsets):
    contiguous_case(kernels, offsets, CUDA, _agrees)


@pytest.mark.parametrize("counts", MASKED_CASES, ids=lambda c: "_".join(map(str, c)))
def test_triton_masked_stays_in_bounds_and_records(kernels, counts):
    masked_case(kernels, counts, CUDA, _agrees)


def _operands(rows: int, groups: int, k: int = 512, n: int = 256):
    a, sa = quantize_1x128(scaled_randn(rows, k, 21).to(CUDA))
    w = torch.randn(groups, n, k, device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(22))
    parts = [quantize_128x128(w[g]) for g in range(groups)]
    return a, sa, torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


@pytest.mark.parametrize("backend", ["triton", "cutlass"])
def test_device_offsets_are_checked_without_a_host_synchronisation(kernels, backend):
    if backend == "cutlass":
        from dualflow.fp8 import cutlass

        if not cutlass.is_available():
            pytest.skip("the CUTLASS GEMMs need an sm90 GPU and a libdualflow_cuda built with them")
    a, sa, b, sb = _operands(384, 3)
    offsets = torch.tensor([0, 100, 100, 384], dtype=torch.int32, device=CUDA)
    flag = Fp8ErrorFlag(CUDA)

    def run():
        return fp8_grouped_gemm(a, sa, b, sb, group_offsets=offsets, backend=backend, errors=flag)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        want = run().clone()  # compiles and checks the well-formed offsets outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a host synchronisation inside would make the capture fail
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    flag.check()
    assert torch.equal(captured, want)  # the same kernels on the same data, replayed
    offsets.copy_(torch.tensor([0, 300, 200, 384], dtype=torch.int32))  # decreasing, read by the replay
    graph.replay()
    with pytest.raises(ValueError, match=r"group 1 has group_offsets\[1\] = 300, group_offsets\[2\] = 200 "
                                         r"\(decreasing\).*recorded on the device"):
        flag.check()
    flag.check()  # raised once, then cleared


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_without_a_flag_a_device_index_is_read_back_and_refused(kernels, backend):
    a, sa, b, sb = _operands(256, 2)
    bad = torch.tensor([0, 300, 256], device=CUDA)
    with pytest.raises(ValueError, match=r"group 0 has group_offsets\[0\] = 0, group_offsets\[1\] = 300"):
        fp8_grouped_gemm(a, sa, b, sb, group_offsets=bad, backend=backend)
    counts = torch.tensor([5, -2], device=CUDA)
    with pytest.raises(ValueError, match=r"masked_m\[1\] = -2"):
        fp8_grouped_gemm(a.view(2, 128, -1), sa.view(2, 128, -1), b, sb, masked_m=counts, backend=backend)
    flag = Fp8ErrorFlag(CUDA)  # the reference reads the index on the host anyway: it raises at once
    if backend == "reference":
        with pytest.raises(ValueError, match=r"group_offsets\[1\] = 300"):
            fp8_grouped_gemm(a, sa, b, sb, group_offsets=bad, backend=backend, errors=flag)
    else:
        fp8_grouped_gemm(a, sa, b, sb, group_offsets=bad, backend=backend, errors=flag)
        with pytest.raises(ValueError, match=r"group_offsets\[1\] = 300"):
            flag.check()
    # empty operands run no kernel: the flag gets the record from torch operations
    fp8_grouped_gemm(a[:0], sa[:0], b, sb, group_offsets=torch.tensor([0, 0, 4], device=CUDA), backend=backend,
                     errors=flag)
    with pytest.raises(ValueError, match=r"group 1 has group_offsets\[1\] = 0, group_offsets\[2\] = 4"):
        flag.check()


def test_host_offsets_with_device_operands(kernels):
    a, sa, b, sb = _operands(256, 2)
    host = torch.tensor([0, 56, 256], dtype=torch.int32)
    got = fp8_grouped_gemm(a, sa, b, sb, group_offsets=host, out_dtype=torch.float32, backend="triton")
    want = fp8_grouped_gemm(a, sa, b, sb, group_offsets=host.to(CUDA), out_dtype=torch.float32, backend="reference")
    for g, (lo, hi) in enumerate(((0, 56), (56, 256))):
        _agrees(got[lo:hi], want[lo:hi], a[lo:hi], sa[lo:hi], b[g], sb[g])
    with pytest.raises(ValueError, match=r"group_offsets\[2\] = 257"):
        fp8_grouped_gemm(a, sa, b, sb, group_offsets=torch.tensor([0, 56, 257]), backend="triton")


def test_empty_call_is_checked_without_a_host_synchronisation(kernels):
    # no kernel runs for empty operands: the torch recorder does the check, capturable like the kernels
    _, _, b, sb = _operands(128, 2)
    a = torch.empty(0, 512, dtype=torch.float8_e4m3fn, device=CUDA)
    sa = torch.empty(0, 4, device=CUDA)
    offsets = torch.tensor([0, 0, 0], dtype=torch.int32, device=CUDA)
    flag = Fp8ErrorFlag(CUDA)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fp8_grouped_gemm(a, sa, b, sb, group_offsets=offsets, backend="triton", errors=flag)
    graph.replay()
    flag.check()
    offsets.copy_(torch.tensor([0, 2, 1], dtype=torch.int32))
    graph.replay()
    with pytest.raises(ValueError, match=r"group 0 has group_offsets\[0\] = 0, group_offsets\[1\] = 2 \(beyond the "
                                         r"T = 0 rows of a\)"):
        flag.check()
