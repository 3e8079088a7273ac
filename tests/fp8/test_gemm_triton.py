"""The Triton GEMM kernels against the reference backend (CPU: Triton's interpreter, small shapes)."""

from __future__ import annotations

import pytest
import torch

from dualflow.fp8 import fp8_gemm, fp8_grouped_gemm, quantize_1x128, quantize_128x128
from tests.fp8.helpers import gemm_error, scaled_randn

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN * 0 in numpy


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to FP32 summation-order rounding (with 1 ulp of the output format for 16-bit outputs)."""
    ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[got.dtype]
    scale = want.float().abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp + 1e-6, atol=1e-6 * scale)


def _quantized(rows, cols, seed, quantizer=quantize_1x128):
    x = scaled_randn(rows, cols, seed)
    return x, *quantizer(x)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), [(130, 200, 300), (64, 256, 512), (16, 128, 128), (200, 16, 256)])
def test_dense_forward_layout(m, n, k, out_dtype):
    _x, a, sa = _quantized(m, k, 0)
    _w, b, sb = _quantized(n, k, 1, quantize_128x128)
    got = fp8_gemm(a, sa, b, sb, out_dtype, backend="triton")
    want = fp8_gemm(a, sa, b, sb, out_dtype, backend="reference")
    assert got.dtype == out_dtype and got.shape == (m, n)
    _close(got, want)


@pytest.mark.parametrize(("m", "n", "k"), [(128, 256, 384), (100, 130, 200)])
def test_dense_weight_gradient_layout_with_accumulation(m, n, k):
    x, a, sa = _quantized(m, k, 2)
    w, b, sb = _quantized(n, k, 3)
    got = fp8_gemm(a, sa, b, sb, torch.float32, backend="triton")
    _close(got, fp8_gemm(a, sa, b, sb, torch.float32, backend="reference"))
    assert gemm_error(got, x.double() @ w.double().T) < 1e-3
    start = torch.randn(m, n) * got.abs().mean()
    acc = start.clone()
    assert fp8_gemm(a, sa, b, sb, accumulate_into=acc, backend="triton") is acc
    _close(acc, fp8_gemm(a, sa, b, sb, accumulate_into=start.clone(), backend="reference"))


def test_strided_operands():
    base = scaled_randn(160, 640, 4)
    a, sa = quantize_1x128(base)
    _w, b, sb = _quantized(128, 256, 5, quantize_128x128)
    a_view, sa_view = a[::2, 128:384], sa[::2, 1:3]  # row stride 2x, scales likewise
    _close(fp8_gemm(a_view, sa_view, b, sb, torch.float32, backend="triton"),
           fp8_gemm(a_view, sa_view, b, sb, torch.float32, backend="reference"))


def test_non_finite_tiles_reach_the_same_outputs():
    x = torch.randn(128, 256)
    x[3, 200] = float("nan")
    x[70, 10] = float("inf")
    a, sa = quantize_1x128(x)
    _w, b, sb = _quantized(128, 256, 6, quantize_128x128)
    got = fp8_gemm(a, sa, b, sb, torch.float32, backend="triton")
    want = fp8_gemm(a, sa, b, sb, torch.float32, backend="reference")
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert not torch.isfinite(got[[3, 70]]).any() and torch.isfinite(got[:3]).all()
    finite = torch.isfinite(want)
    _close(got[finite], want[finite])


def _experts(num, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num, n, k, generator=g)
    parts = [quantize_128x128(w[e]) for e in range(num)]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


@pytest.mark.parametrize("sizes", [[128, 256, 0, 128], [100, 0, 37, 200], [0, 0, 5]])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_grouped_contiguous(sizes, index_dtype):
    _x, a, sa = _quantized(sum(sizes), 256, 7)
    b, sb = _experts(len(sizes), 144, 256, 8)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=index_dtype)
    got = fp8_grouped_gemm(a, sa, b, sb, group_offsets=offsets, out_dtype=torch.float32, backend="triton")
    want = fp8_grouped_gemm(a, sa, b, sb, group_offsets=offsets, out_dtype=torch.float32, backend="reference")
    _close(got, want)


def test_grouped_masked():
    counts = torch.tensor([64, 0, 130, 1], dtype=torch.int32)
    x = scaled_randn(4 * 192, 384, 9).view(4, 192, 384)
    parts = [quantize_1x128(x[e]) for e in range(4)]
    a, sa = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    b, sb = _experts(4, 128, 384, 10)
    got = fp8_grouped_gemm(a, sa, b, sb, masked_m=counts, backend="triton")
    want = fp8_grouped_gemm(a, sa, b, sb, masked_m=counts, backend="reference")
    for e, c in enumerate(counts.tolist()):
        _close(got[e, :c], want[e, :c])
