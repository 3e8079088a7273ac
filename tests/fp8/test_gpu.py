"""The FP8 engine on a real GPU: Triton kernels (compiled, not interpreted), torch's block-scaled matmul,
and the FP8 layers on CUDA. Skipped without CUDA; run with ``make test-gpu``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dualflow.fp8 import (
    BackendUnavailable,
    Fp8GroupedLinear,
    Fp8Linear,
    Fp8Recipe,
    available_backends,
    fp8_gemm,
    fp8_grouped_gemm,
    quantize_1x128,
    quantize_1x128_and_128x1,
    quantize_128x1,
    quantize_128x128,
)
from tests.fp8.helpers import (
    KINDS,
    adversarial,
    assert_agrees,
    assert_same_fp8,
    assert_same_scales,
    gemm_error,
    magnitude,
    sqnr_db,
)
from tests.fp8.test_nn import _SavedBytes

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
QUANTIZERS = [quantize_1x128, quantize_128x128, quantize_128x1, quantize_1x128_and_128x1]


def _pairs(out):
    return out if isinstance(out[0], tuple) else (out,)


# 1000x1300: ragged edges; 2048x1408: sizes Triton's launch hints as divisible by 16, which change the
# compiled stores (the transposing launch wrote wrong bytes with them, NOTES_gpu row 18); 576x1344: hinted
# and ragged (V2-Lite's wkv_a has 576 rows)
@pytest.mark.parametrize("shape", [(1000, 1300), (2048, 1408), (576, 1344)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fn", QUANTIZERS, ids=lambda f: f.__name__)
def test_triton_quantizers_match_the_cpu_reference_bit_for_bit(fn, kind, pow2, shape):
    for dtype in (torch.float32, torch.bfloat16):
        x = adversarial(*shape, kind, dtype=dtype, seed=3)
        want = _pairs(fn(x, pow2_scales=pow2, backend="reference"))
        got = _pairs(fn(x.to(CUDA), pow2_scales=pow2, backend="triton"))
        on_gpu = _pairs(fn(x.to(CUDA), pow2_scales=pow2, backend="reference"))
        for (q, s), (qw, sw), (qg, sg) in zip(got, want, on_gpu):
            assert_same_scales(s.cpu(), sw)
            assert_same_fp8(q.cpu(), qw)
            assert_same_scales(sg.cpu(), sw)  # the reference is device-independent too
            assert_same_fp8(qg.cpu(), qw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("rows", "cols", "groups"),
                         [(1000, 1300, 1), (2048, 1408, 1), (576, 1344, 1), (3 * 256, 1300, 3), (64 * 128, 2048, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_128x128_with_its_transpose_matches_the_cpu_reference_bit_for_bit(rows, cols, groups, kind, dtype):
    from dualflow.fp8 import quantize_128x128_transposed

    w = adversarial(rows, cols, kind, dtype=dtype, seed=4)
    want = quantize_128x128_transposed(w, groups=groups, backend="reference")
    got = quantize_128x128_transposed(w.to(CUDA), groups=groups, backend="triton")
    for g, r in zip(got, want):
        (assert_same_scales if g.dtype == torch.float32 else assert_same_fp8)(g.cpu(), r)


def test_auto_picks_the_cuda_library_else_triton_for_cuda_tensors():
    x = torch.randn(256, 512, device=CUDA)
    from dualflow.fp8 import cuda_quant
    from dualflow.fp8.quant import _resolve

    assert _resolve("auto", x) == ("cuda" if cuda_quant.unavailable_reason(CUDA) is None else "triton")
    assert available_backends(CUDA)["triton"] is None


def _operands(m, n, k, rowwise=False, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    x = torch.randn(m, k, device=CUDA, generator=g, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=CUDA, generator=g, dtype=torch.bfloat16)
    return x, w, *quantize_1x128(x), *(quantize_1x128 if rowwise else quantize_128x128)(w)


def _close(got, want, a, sa, b, sb, b_rows):
    # Triton's FP8 dot accumulates each 128-wide K block on the tensor core (about 14 bits) before
    # the kernel promotes it to FP32: compare as every tensor-core backend is compared (helpers.py)
    assert_agrees(got, want, magnitude(a, sa, 1, b, sb, b_rows))


@pytest.mark.parametrize(("m", "n", "k"), [(4096, 2112, 7168), (64, 7168, 2048), (300, 1000, 1000)])
def test_triton_gemm_forward_layout(m, n, k):
    x, w, a, sa, b, sb = _operands(m, n, k)
    got = fp8_gemm(a, sa, b, sb, torch.float32, backend="triton")
    _close(got, fp8_gemm(a, sa, b, sb, torch.float32, backend="reference"), a, sa, b, sb, 128)
    assert gemm_error(fp8_gemm(a, sa, b, sb, backend="triton"), x.double() @ w.double().T) < 1e-3


@pytest.mark.parametrize(("m", "n", "k"), [(2112, 7168, 4096), (256, 384, 1000)])
def test_triton_gemm_weight_gradient_layout(m, n, k):
    x, w, a, sa, b, sb = _operands(m, n, k, rowwise=True)
    got = fp8_gemm(a, sa, b, sb, torch.float32, backend="triton")
    _close(got, fp8_gemm(a, sa, b, sb, torch.float32, backend="reference"), a, sa, b, sb, 1)
    assert gemm_error(got, x.double() @ w.double().T) < 1e-3
    acc = torch.randn(m, n, device=CUDA)
    want = fp8_gemm(a, sa, b, sb, accumulate_into=acc.clone(), backend="reference")
    _close(fp8_gemm(a, sa, b, sb, accumulate_into=acc, backend="triton"), want, a, sa, b, sb, 1)


@pytest.mark.parametrize("sizes", [[1024, 0, 2048, 512], [1000, 3, 0, 77]])
def test_triton_grouped_gemms(sizes):
    k, n = 2048, 1536
    g = torch.Generator(device=CUDA).manual_seed(1)
    x = torch.randn(sum(sizes), k, device=CUDA, generator=g)
    w = torch.randn(len(sizes), n, k, device=CUDA, generator=g)
    a, sa = quantize_1x128(x)
    parts = [quantize_128x128(w[e]) for e in range(len(sizes))]
    b, sb = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], device=CUDA, dtype=torch.int32)
    got = fp8_grouped_gemm(a, sa, b, sb, group_offsets=offsets, out_dtype=torch.float32, backend="triton")
    want = fp8_grouped_gemm(a, sa, b, sb, group_offsets=offsets, out_dtype=torch.float32, backend="reference")
    for e, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        _close(got[lo:hi], want[lo:hi], a[lo:hi], sa[lo:hi], b[e], sb[e], 128)
    m_max = max(sizes)
    padded = torch.zeros(len(sizes), m_max, k, device=CUDA)
    for e, (lo, s) in enumerate(zip(offsets[:-1].tolist(), sizes)):
        padded[e, :s] = x[lo:lo + s]
    parts = [quantize_1x128(padded[e]) for e in range(len(sizes))]
    pa, psa = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    counts = torch.tensor(sizes, device=CUDA, dtype=torch.int32)
    got = fp8_grouped_gemm(pa, psa, b, sb, masked_m=counts, out_dtype=torch.float32, backend="triton")
    want = fp8_grouped_gemm(pa, psa, b, sb, masked_m=counts, out_dtype=torch.float32, backend="reference")
    for e, s in enumerate(sizes):
        _close(got[e, :s], want[e, :s], pa[e, :s], psa[e, :s], b[e], sb[e], 128)


def test_torch_block_scaled_backend():
    major, _ = torch.cuda.get_device_capability()
    if major != 9:
        pytest.skip(f"torch's block-scaled matmul is sm90-only; this GPU is sm{major}x")
    for rowwise, out_dtype in ((False, torch.bfloat16), (True, torch.float32)):
        for m, n, k in ((256, 512, 384), (4096, 2112, 7168)):  # K/128 = 3 exercises the padded scale rows
            x, w, a, sa, b, sb = _operands(m, n, k, rowwise=rowwise)
            got = fp8_gemm(a, sa, b, sb, out_dtype, backend="torch")
            want = fp8_gemm(a, sa, b, sb, out_dtype, backend="reference")
            assert got.dtype == out_dtype
            assert gemm_error(got, want) < 1e-5, (rowwise, m, n, k)
            assert gemm_error(got, x.double() @ w.double().T) < 1e-3



@pytest.mark.parametrize("rowwise", [False, True])
def test_torch_backend_runs_any_row_count(rowwise):
    """Expert GEMMs see any row count: every one runs in torch's matmul (rows padded to a multiple of 4)
    and agrees with the reference; a shape cuBLASLt still refused would reach the next backend of the
    list instead of ending the step with a CUDA error."""
    major, _ = torch.cuda.get_device_capability()
    if major != 9:
        pytest.skip(f"torch's block-scaled matmul is sm90-only; this GPU is sm{major}x")
    refused = []
    for m in (1, 3, 37, 100, 129):
        for k in (128, 256, 384):
            for n in (128, 256, 272):
                _, _, a, sa, b, sb = _operands(m, n, k, rowwise=rowwise)
                want = fp8_gemm(a, sa, b, sb, torch.float32, backend="reference")
                try:
                    got = fp8_gemm(a, sa, b, sb, torch.float32, backend="torch")
                except BackendUnavailable:
                    refused.append((m, k, n))
                    got = fp8_gemm(a, sa, b, sb, torch.float32, backend="torch,triton")
                    _close(got, want, a, sa, b, sb, 1 if rowwise else 128)
                    continue
                assert gemm_error(got, want) < 1e-5, (m, k, n)
    # cuBLASLt itself refuses M % 4 != 0; the backend pads those rows, so nothing reaches the fallback
    assert not refused, f"the torch backend handed (M, K, N) = {refused} on"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fp8_linear_on_cuda(dtype):
    """BF16 weights, and FP32 master weights under autocast as the trainer runs them (their quantization
    compiles differently: the transposed copy was once wrong for FP32 weights alone, NOTES_gpu row 18)."""
    torch.manual_seed(0)
    ref = nn.Linear(2048, 1536, device=CUDA, dtype=dtype)
    fp8 = Fp8Linear(2048, 1536, device=CUDA, dtype=dtype)
    fp8.load_state_dict(ref.state_dict())
    x = torch.randn(4, 512, 2048, device=CUDA, dtype=dtype)
    dy = torch.randn(4, 512, 1536, device=CUDA, dtype=torch.bfloat16)
    results = []
    for module in (ref, fp8):
        xi = x.clone().requires_grad_()
        counter = _SavedBytes(module)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), \
                torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype != torch.bfloat16):
            y = module(xi)
        results.append((counter.total, y, *torch.autograd.grad(y, [xi, module.weight, module.bias], dy)))
    if dtype == torch.bfloat16:  # under autocast the BF16 layer saves casts of FP32 tensors: another budget
        assert results[1][0] <= 0.55 * results[0][0]
    for name, want, got in zip(["output", "input grad", "weight grad", "bias grad"], results[0][1:], results[1][1:]):
        assert sqnr_db(want, got) >= 25, f"{name}: {sqnr_db(want, got):.1f} dB"


@pytest.mark.parametrize("fused", [False, True])
def test_fp8_weight_cache_follows_cuda_optimizers(fused):
    fp8 = Fp8Linear(512, 512, device=CUDA)
    opt = torch.optim.AdamW(fp8.parameters(), lr=1e-3, fused=fused, foreach=None if fused else True)
    x = torch.randn(256, 512, device=CUDA)
    for step in range(2):
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                fp8(x).float().square().mean().backward()
        assert fp8.fp8_cache.builds == step + 1
        opt.step()
        opt.zero_grad()
    fresh = Fp8Linear(512, 512, device=CUDA)
    fresh.load_state_dict(fp8.state_dict())
    assert torch.equal(fp8(x), fresh(x))  # the same kernels on the same weights and input: the same bits


def test_fp8_grouped_linear_on_cuda():
    torch.manual_seed(0)
    layer = Fp8GroupedLinear(8, 1024, 512, device=CUDA, dtype=torch.bfloat16, recipe=Fp8Recipe())
    sizes = [512, 0, 384, 128, 1000, 3, 256, 128]
    x = torch.randn(sum(sizes), 1024, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x, sizes)
    ref = torch.cat([xs @ layer.weight[e].T for e, xs in enumerate(torch.split(x, sizes))])
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.weight], dy)
    want = torch.autograd.grad(ref, [x, layer.weight], dy)
    assert sqnr_db(ref, y) >= 25
    for w, g in zip(want, got):
        assert sqnr_db(w, g) >= 25


def test_triton_gate_follows_the_compute_capability(monkeypatch):
    """The real capability query decides (sm_89+), and a GPU reporting an older one gets the reference
    quantizers and the next GEMM backend of a list instead of a Triton compile error."""
    from dualflow.fp8 import gemm as gemm_mod
    from dualflow.fp8 import triton_support

    capability = torch.cuda.get_device_capability()
    assert triton_support.device_capability(CUDA) == capability
    assert (triton_support.triton_unavailable_reason(CUDA) is None) == (capability >= (8, 9))
    x, _w, a, sa, b, sb = _operands(256, 384, 512)
    want_q = quantize_1x128(x, backend="reference")
    want = fp8_gemm(a, sa, b, sb, backend="reference")
    monkeypatch.setattr(triton_support, "device_capability", lambda device: (8, 0))
    gemm_mod._why_not_cached.cache_clear()
    try:
        q, s = quantize_1x128(x)  # auto: the reference on this "sm80"
        assert_same_fp8(q, want_q[0])
        assert_same_scales(s, want_q[1])
        with pytest.raises(RuntimeError, match=r"has 8\.0 \(sm80\)"):
            quantize_1x128(x, backend="triton")
        # the same reference GEMM on the same operands and device as `want`: bitwise equal
        assert torch.equal(fp8_gemm(a, sa, b, sb, backend="triton,reference"), want)
        with pytest.raises(BackendUnavailable, match=r"triton: .* has 8\.0 \(sm80\)"):
            fp8_gemm(a, sa, b, sb, backend="triton")
        assert "sm80" in available_backends(CUDA, "contiguous")["triton"]
    finally:
        gemm_mod._why_not_cached.cache_clear()
