"""Block-scaled GEMMs with the reference backend, and the backend registry (selection, errors, CUTLASS hook)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from dualflow.fp8 import (
    BackendUnavailable,
    available_backends,
    dequantize,
    fp8_gemm,
    fp8_grouped_gemm,
    quantize_1x128,
    quantize_128x128,
    resolve_backend,
)
from dualflow.fp8 import gemm as gemm_mod
from tests.fp8.helpers import gemm_error, scaled_randn


@pytest.fixture(autouse=True)
def _fresh_backend_availability():
    # availability is cached per process; these tests swap the CUTLASS module in and out
    gemm_mod._why_not_cached.cache_clear()
    yield
    gemm_mod._why_not_cached.cache_clear()

REF = "reference"


def _operands(m, n, k, seed=0, b_rowwise=False, data=torch.randn):
    g = torch.Generator().manual_seed(seed)
    x = data(m, k, generator=g) if data is torch.randn else data(m, k, seed)
    w = data(n, k, generator=g) if data is torch.randn else data(n, k, seed + 1)
    a, sa = quantize_1x128(x)
    b, sb = (quantize_1x128 if b_rowwise else quantize_128x128)(w)
    return x, w, a, sa, b, sb


@pytest.mark.parametrize("b_rowwise", [False, True])
@pytest.mark.parametrize(("m", "n", "k"), [(256, 384, 512), (130, 200, 300), (64, 2112 // 8, 896), (1, 16, 128)])
def test_accuracy_against_the_unquantized_gemm(m, n, k, b_rowwise):
    x, w, a, sa, b, sb = _operands(m, n, k, b_rowwise=b_rowwise)
    out = fp8_gemm(a, sa, b, sb, torch.float32 if b_rowwise else torch.bfloat16, backend=REF)
    assert out.dtype == (torch.float32 if b_rowwise else torch.bfloat16) and out.shape == (m, n)
    assert gemm_error(out, x.double() @ w.double().T) < 1e-3


@pytest.mark.parametrize("b_rowwise", [False, True])
def test_scales_apply_to_their_own_blocks(b_rowwise):
    # magnitudes jump by decades between blocks: a scale read from a neighbouring block cannot pass
    _x, _w, a, sa, b, sb = _operands(200, 260, 520, seed=3, b_rowwise=b_rowwise, data=scaled_randn)
    out = fp8_gemm(a, sa, b, sb, torch.float32, backend=REF)
    exact = dequantize(a, sa, 1).double() @ dequantize(b, sb, 1 if b_rowwise else 128).double().T
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


def test_accumulate_into_adds_in_fp32_and_returns_the_buffer():
    _x, _w, a, sa, b, sb = _operands(128, 256, 384, b_rowwise=True)
    acc = torch.randn(128, 256)
    before = acc.clone()
    out = fp8_gemm(a, sa, b, sb, accumulate_into=acc, backend=REF)
    assert out is acc
    torch.testing.assert_close(acc, before + fp8_gemm(a, sa, b, sb, torch.float32, backend=REF))
    with pytest.raises(ValueError, match="accumulate_into must be float32"):
        fp8_gemm(a, sa, b, sb, accumulate_into=torch.zeros(128, 256, dtype=torch.bfloat16), backend=REF)


def test_b_layout_is_read_from_the_scales_or_stated():
    _x, w, a, sa, b, sb_block = _operands(64, 256, 256)
    _, sb_row = quantize_1x128(w)
    auto_block = fp8_gemm(a, sa, b, sb_block, torch.float32, backend=REF)
    # the same reference operations on the same operands, only the layout read differently: the same bits
    assert torch.equal(auto_block, fp8_gemm(a, sa, b, sb_block, torch.float32, backend=REF, b_block="128x128"))
    with pytest.raises(ValueError, match=r"b_scales must be float32 of shape \(256, 2\)"):
        fp8_gemm(a, sa, b, sb_block, backend=REF, b_block="1x128")
    with pytest.raises(ValueError, match="b_scales must be float32 of shape"):
        fp8_gemm(a, sa, b, sb_row[:5], backend=REF)
    # N == 1: the only shape where the two layouts coincide, and then they are the same numbers
    w1 = w[:1]
    b1, s_block = quantize_128x128(w1)
    _, s_row = quantize_1x128(w1)
    assert torch.equal(s_block, s_row)
    assert torch.equal(fp8_gemm(a, sa, b1, s_block, backend=REF, b_block="128x128"),
                       fp8_gemm(a, sa, b1, s_row, backend=REF, b_block="1x128"))


def test_operand_validation():
    x, _w, a, sa, b, sb = _operands(64, 128, 256)
    with pytest.raises(TypeError, match=r"must be a 2-D torch\.float8_e4m3fn"):
        fp8_gemm(x, sa, b, sb, backend=REF)
    with pytest.raises(ValueError, match="same K"):
        fp8_gemm(a, sa, b[:, :128], sb[:, :1], backend=REF)
    with pytest.raises(ValueError, match=r"a_scales must be float32 of shape \(64, 2\)"):
        fp8_gemm(a, sa.t(), b, sb, backend=REF)
    with pytest.raises(TypeError, match="out_dtype"):
        fp8_gemm(a, sa, b, sb, torch.int32, backend=REF)


def test_empty_dimensions():
    _, _, a, sa, b, sb = _operands(0, 128, 256)
    assert fp8_gemm(a, sa, b, sb, backend=REF).shape == (0, 128)


def _grouped_operands(sizes, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = scaled_randn(sum(sizes), k, seed)
    w = torch.randn(len(sizes), n, k, generator=g)
    a, sa = quantize_1x128(x)
    parts = [quantize_128x128(w[e]) for e in range(len(sizes))]
    b, sb = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    return x, w, a, sa, b, sb, offsets


def test_grouped_contiguous_is_one_gemm_per_group():
    sizes = [100, 0, 256, 37]
    x, w, a, sa, b, sb, offsets = _grouped_operands(sizes, 192, 300)
    out = fp8_grouped_gemm(a, sa, b, sb, group_offsets=offsets, out_dtype=torch.float32, backend=REF)
    for e, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        want = fp8_gemm(a[lo:hi], sa[lo:hi], b[e], sb[e], torch.float32, backend=REF)
        # bitwise: the grouped reference runs exactly this dense reference on these rows (same shapes)
        assert torch.equal(out[lo:hi], want)
        if hi > lo:
            assert gemm_error(out[lo:hi], x[lo:hi].double() @ w[e].double().T) < 1e-3


def test_grouped_masked_is_one_gemm_per_group_on_the_valid_rows():
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([70, 0, 128], dtype=torch.int32)
    x = torch.randn(3, 128, 256, generator=g)
    qa = [quantize_1x128(x[e]) for e in range(3)]
    a, sa = torch.stack([q for q, _ in qa]), torch.stack([s for _, s in qa])
    _, _, _, _, b, sb, _ = _grouped_operands([1, 1, 1], 160, 256)
    out = fp8_grouped_gemm(a, sa, b, sb, masked_m=counts, backend=REF)
    assert out.shape == (3, 128, 160)
    for e, c in enumerate(counts.tolist()):  # bitwise: the same dense reference on the same rows
        assert torch.equal(out[e, :c], fp8_gemm(a[e, :c], sa[e, :c], b[e], sb[e], backend=REF))


def test_grouped_validation():
    _x, _w, a, sa, b, sb, offsets = _grouped_operands([64, 64], 128, 256)
    with pytest.raises(ValueError, match="exactly one of group_offsets"):
        fp8_grouped_gemm(a, sa, b, sb, backend=REF)
    with pytest.raises(ValueError, match=r"group_offsets must be int32/int64 of shape \(3,\)"):
        fp8_grouped_gemm(a, sa, b, sb, group_offsets=offsets[:2], backend=REF)
    with pytest.raises(ValueError, match="128x128 blocks of each b"):
        fp8_grouped_gemm(a, sa, b, sb[:, :, :1], group_offsets=offsets, backend=REF)
    with pytest.raises(ValueError, match="masked layout"):
        fp8_grouped_gemm(a.view(1, 128, 256), sa.view(1, 128, 2), b, sb, masked_m=torch.tensor([1, 1]), backend=REF)


# ------------------------------------------------------------------------------------------------------------
# backend selection
# ------------------------------------------------------------------------------------------------------------
def test_auto_is_the_reference_on_cpu_and_the_environment_overrides_it(monkeypatch):
    monkeypatch.delenv("DUALFLOW_FP8_BACKEND", raising=False)
    assert resolve_backend("auto", "cpu") == "reference"
    monkeypatch.setenv("DUALFLOW_FP8_BACKEND", "triton")  # conftest runs Triton's interpreter on the CPU
    assert resolve_backend("auto", "cpu") == "triton"
    monkeypatch.setenv("DUALFLOW_FP8_BACKEND", "cutlass,torch,reference")  # a list skips what cannot run
    assert resolve_backend("auto", "cpu") == "reference"
    monkeypatch.setenv("DUALFLOW_FP8_BACKEND", "torch")
    with pytest.raises(BackendUnavailable, match="DUALFLOW_FP8_BACKEND"):
        resolve_backend("auto", "cpu")
    monkeypatch.setenv("DUALFLOW_FP8_BACKEND", "fastest")
    with pytest.raises(ValueError, match="unknown FP8 GEMM backend"):
        resolve_backend("auto", "cpu")


def test_torch_backend_reports_why_it_cannot_run_on_cpu():
    reasons = available_backends("cpu")
    assert reasons["reference"] is None
    assert "sm90" in reasons["torch"] and "cuBLASLt >= 12.9" in reasons["torch"]
    _, _, a, sa, b, sb = _operands(64, 128, 256)
    with pytest.raises(BackendUnavailable, match="row-wise scales"):
        fp8_gemm(a, sa, b, sb, backend="torch")
    assert "no contiguous GEMM" in available_backends("cpu", "contiguous")["torch"]



@pytest.mark.parametrize("rows, cols", [(1, 3), (1, 1), (3, 1), (5, 2), (128, 56)])
def test_torch_backend_scales_are_exactly_m_major(rows, cols):
    # torch compares the strides literally: a one-row tensor must come out with strides (1, 1), and a
    # view into wider storage (scales with padded columns) must be copied, not passed on
    from dualflow.fp8.torch_scaled import _m_major

    wide = torch.randn(rows, cols + 1)[:, :cols]
    for s in (torch.randn(rows, cols), wide):
        got = _m_major(s)
        assert got.stride() == (1, rows) and torch.equal(got, s)

def test_cutlass_absent_raises_clearly_and_lists_skip_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "dualflow.fp8.cutlass", None)  # what an installation without it sees
    _, _, a, sa, b, sb = _operands(64, 128, 256)
    with pytest.raises(BackendUnavailable, match=r"dualflow\.fp8\.cutlass is not part of this installation"):
        fp8_gemm(a, sa, b, sb, backend="cutlass")
    assert fp8_gemm(a, sa, b, sb, backend="cutlass,reference").shape == (64, 128)


def _fake_cutlass(calls: list, available: bool = True) -> types.ModuleType:
    """A stand-in with the contract's signatures, computing with the reference, recording its calls."""
    mod = types.ModuleType("dualflow.fp8.cutlass")
    ref = gemm_mod._REGISTRY["reference"]
    mod.is_available = lambda: available

    def gemm_fwd(a, a_scales, b, b_scales, out_dtype):
        calls.append(("gemm_fwd", out_dtype))
        return ref.dense(a, a_scales, b, b_scales, out_dtype, None, False)

    def gemm_wgrad(a, a_scales, b, b_scales, out, accumulate):
        calls.append(("gemm_wgrad", out is not None, accumulate))
        if out is None:
            return ref.dense(a, a_scales, b, b_scales, torch.float32, None, True)
        return ref.dense(a, a_scales, b, b_scales, torch.float32, out if accumulate else out.zero_(), True)

    def grouped_gemm_contiguous(a, a_scales, b, b_scales, group_offsets, out_dtype, errors=None):
        calls.append(("grouped_gemm_contiguous", out_dtype))
        return ref.contiguous(a, a_scales, b, b_scales, group_offsets, out_dtype, errors)

    mod.gemm_fwd, mod.gemm_wgrad, mod.grouped_gemm_contiguous = gemm_fwd, gemm_wgrad, grouped_gemm_contiguous
    return mod


def test_cutlass_backend_calls_the_contract_functions(monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "dualflow.fp8.cutlass", _fake_cutlass(calls))
    entry = gemm_mod._REGISTRY["cutlass"]
    assert gemm_mod._cutlass_reason(torch.device("cpu")) == "the CUTLASS GEMMs need CUDA tensors (got cpu)"
    _, _, a, sa, b, sb = _operands(64, 128, 256)
    want = fp8_gemm(a, sa, b, sb, backend=REF)
    assert torch.equal(entry.dense(a, sa, b, sb, torch.bfloat16, None, False), want)
    _, _, a, sa, bw, sbw = _operands(64, 128, 256, b_rowwise=True)
    acc = torch.ones(64, 128)
    entry.dense(a, sa, bw, sbw, torch.float32, acc, True)
    torch.testing.assert_close(acc, 1 + fp8_gemm(a, sa, bw, sbw, torch.float32, backend=REF))
    assert entry.dense(a, sa, bw, sbw, torch.bfloat16, None, True).dtype == torch.bfloat16
    _x, _w, ga, gsa, gb, gsb, offsets = _grouped_operands([128, 256], 128, 256)
    assert torch.equal(entry.contiguous(ga, gsa, gb, gsb, offsets, torch.bfloat16),
                       fp8_grouped_gemm(ga, gsa, gb, gsb, group_offsets=offsets, backend=REF))
    assert [c[0] for c in calls] == ["gemm_fwd", "gemm_wgrad", "gemm_wgrad", "grouped_gemm_contiguous"]
    assert calls[1] == ("gemm_wgrad", True, True)
    monkeypatch.setitem(sys.modules, "dualflow.fp8.cutlass", _fake_cutlass(calls, available=False))
    assert "is_available() is False" in gemm_mod._cutlass_reason(torch.device("cuda"))
