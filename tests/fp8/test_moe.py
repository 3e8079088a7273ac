"""FP8 SwiGLU experts (fp8_grouped_mlp) and their fused kernels, against plain-torch references."""

from __future__ import annotations

import pytest
import torch

from dualflow.fp8 import BackendUnavailable, Fp8Recipe, dequantize, fp8_grouped_mlp
from dualflow.fp8.gemm import AUTO_CUDA
from dualflow.fp8.moe import (
    grouped_mlp_reference,
    grouped_wgrad,
    swiglu_backward_quantize,
    swiglu_quantize,
    wgrad_backend,
)
from dualflow.fp8.quant import quantize_128x1

REFERENCE = Fp8Recipe(backend="reference", quant_backend="reference")
TRITON = Fp8Recipe(backend="triton", quant_backend="triton")  # the Triton interpreter on the CPU


def _offsets(counts, align=128):
    ends = torch.tensor([-(-c // align) * align for c in counts]).cumsum(0)
    return torch.cat([torch.zeros(1, dtype=torch.int64), ends]).to(torch.int32)


def _rows(offsets, counts, total, dim, seed):
    """Rows of each expert block filled with data, the blocks' padding and the tail zero."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(total, dim)
    for g, c in enumerate(counts):
        lo = int(offsets[g])
        x[lo:lo + c] = torch.randn(c, dim, generator=gen) * (1 + 10 * g)  # experts of different magnitudes
    return x


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _agree_within_fp8_rounding(a, b):
    """Two quantizations of nearly the same FP32 values (exp() may differ by an ulp between devices):
    equal scales to FP32 rounding, and FP8 codes at most one step apart, rarely."""
    (qa, sa), (qb, sb) = a, b
    torch.testing.assert_close(sa, sb, rtol=1e-6, atol=0)
    diff = (qa.float() - qb.float()).abs()
    step = torch.maximum(qa.float().abs(), qb.float().abs()) / 8 + 2**-9  # one E4M3 step at that magnitude
    assert bool((diff <= step).all())
    assert (diff > 0).float().mean() < 1e-3


@pytest.mark.parametrize("counts", [[130, 0, 300], [1, 1, 1], [0, 0, 256], [500]],
                         ids=["ragged", "tiny", "one", "single"])
@pytest.mark.parametrize("recipe", [REFERENCE, TRITON], ids=["reference", "triton"])
def test_fp8_grouped_mlp_against_float64(counts, recipe):
    dim, hidden = 128, 128
    offsets = _offsets(counts)
    total = int(offsets[-1]) + 37  # a tail after the last block: never read
    x = _rows(offsets, counts, total, dim, seed=1)
    torch.manual_seed(2)
    w13 = torch.randn(len(counts), 2 * hidden, dim) * 0.05
    w2 = torch.randn(len(counts), dim, hidden) * 0.05
    xx, a, b = (t.clone().requires_grad_(True) for t in (x, w13, w2))
    y = fp8_grouped_mlp(xx, a, b, offsets, recipe)
    g = _rows(offsets, counts, total, dim, seed=3)
    y.backward(g)
    xr, ar, br = (t.double().requires_grad_(True) for t in (x, w13, w2))
    yr = grouped_mlp_reference(xr, ar, br, offsets)
    yr.backward(g.double())
    end = int(offsets[-1])
    # two FP8 GEMMs in a row with 1x128 / 128x128 scaling: a few percent on Gaussian data
    assert _rel(y[:end], yr[:end]) < 0.1
    assert _rel(xx.grad[:end], xr.grad[:end]) < 0.1
    assert _rel(a.grad, ar.grad) < 0.1 and _rel(b.grad, br.grad) < 0.1
    for g_ in range(len(counts)):
        if counts[g_] == 0:  # an expert without tokens gets an exactly zero gradient
            assert torch.all(a.grad[g_] == 0) and torch.all(b.grad[g_] == 0)


def test_triton_and_reference_fp8_experts_agree():
    counts = [200, 60]
    offsets = _offsets(counts)
    x = _rows(offsets, counts, int(offsets[-1]), 256, seed=4)
    torch.manual_seed(5)
    w13, w2 = torch.randn(2, 256, 256) * 0.05, torch.randn(2, 256, 128) * 0.05
    outs = []
    for recipe in (REFERENCE, TRITON):
        xx, a, b = (t.clone().requires_grad_(True) for t in (x, w13, w2))
        y = fp8_grouped_mlp(xx, a, b, offsets, recipe)
        y.backward(torch.ones_like(y))
        outs.append((y, xx.grad, a.grad, b.grad))
    for got, ref in zip(*outs):  # same FP8 inputs, FP32 accumulation in another order
        assert _rel(got, ref) < 2e-2


@pytest.mark.parametrize("rows, hidden", [(300, 128), (128, 256), (77, 384)])
def test_fused_swiglu_quantization_matches_reference(rows, hidden):
    h = torch.randn(rows, 2 * hidden) * 4
    h[3, :5] = 60.0  # large gates: silu(g) ~ g
    h[5, :5] = -60.0  # and very negative: silu(g) ~ 0
    fused = swiglu_quantize(h, TRITON, fused=True)
    plain = swiglu_quantize(h, REFERENCE, fused=False)
    for a, b in zip(fused, plain):
        _agree_within_fp8_rounding(a, b)
    da = torch.randn(rows, hidden)
    fused = swiglu_backward_quantize(h, da, TRITON, fused=True)
    plain = swiglu_backward_quantize(h, da, REFERENCE, fused=False)
    for a, b in zip(fused, plain):
        _agree_within_fp8_rounding(a, b)


def test_swiglu_quantization_is_silu_times_up():
    h = torch.randn(130, 256)
    (q, s), (qt, st) = swiglu_quantize(h, REFERENCE, fused=False)
    gate, up = h.double().chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    assert _rel(dequantize(q, s, 1), expected) < 0.05
    assert _rel(dequantize(qt, st, 1).T, expected) < 0.05


def test_fused_kernels_skip_rows_after_the_end():
    h = torch.randn(384, 256)
    end = torch.tensor([128], dtype=torch.int32)
    (q, s), (qt, st) = swiglu_quantize(h, TRITON, fused=True, end=end)
    (rq, rs), (rqt, rst) = swiglu_quantize(h[:128], REFERENCE, fused=False)
    _agree_within_fp8_rounding((q[:128], s[:128]), (rq, rs))
    _agree_within_fp8_rounding((qt[:, :128], st[:, :1]), (rqt, rst))


@pytest.mark.parametrize("counts", [[128, 0, 384], [0, 0], [256]])
def test_grouped_wgrad_kernel_matches_the_per_expert_loop(counts):
    offsets = _offsets(counts)
    total = int(offsets[-1]) + 128
    dy = _rows(offsets, counts, total, 256, seed=6)
    x = _rows(offsets, counts, total, 128, seed=7)
    a, b = quantize_128x1(dy), quantize_128x1(x)
    got = grouped_wgrad(a, b, offsets, TRITON, fused=True)
    ref = grouped_wgrad(a, b, offsets, REFERENCE, fused=False)
    assert got.shape == ref.shape == (len(counts), 256, 128)
    # Both are FP32 sums of the same n scaled FP8 products per expert, in another order (the interpreter's
    # and the CPU BLAS's blocking differ between machines). Each sum is within gamma_(n+3) = (n+3) u of the
    # exact one relative to the sum of the terms' magnitudes (n additions, a few roundings per term for the
    # scales; u = 2^-24), so the two differ by at most twice that.
    da, db = dequantize(*a, 1).double(), dequantize(*b, 1).double()
    for g in range(len(counts)):
        lo, hi = int(offsets[g]), int(offsets[g + 1])
        terms = da[:, lo:hi].abs() @ db[:, lo:hi].abs().T
        bound = 2 * (hi - lo + 3) * 2.0**-24 * terms
        excess = (got[g].double() - ref[g].double()).abs() - bound
        assert not bool((excess > 0).any()), f"expert {g}: {int((excess > 0).sum())} outputs off the FP32 bound"
    for g, c in enumerate(counts):
        if c == 0:
            assert torch.all(got[g] == 0)


def test_grouped_wgrad_kernel_follows_the_recipe(monkeypatch):
    import dualflow.fp8.moe as moe

    offsets = _offsets([128, 256])
    a = quantize_128x1(_rows(offsets, [128, 256], int(offsets[-1]), 64, seed=8))
    want = grouped_wgrad(a, a, offsets, REFERENCE, fused=False)

    def recipe(**kw):
        return Fp8Recipe(quant_backend="triton", **kw)

    # on the CPU CUTLASS cannot run (it runs in tests/fp8/test_cutlass_gpu.py): "auto" falls to the Triton
    # kernel (under the interpreter) whatever the order; asking for CUTLASS by name is refused with why
    for spec in ("cutlass,torch", "auto", AUTO_CUDA):
        assert wgrad_backend(recipe(backend=spec), "cpu") == "triton"
        torch.testing.assert_close(grouped_wgrad(a, a, offsets, recipe(backend=spec), fused=True), want,
                                   rtol=1e-5, atol=1e-4)
    with pytest.raises(BackendUnavailable, match=r"wgrad_backend='cutlass' cannot run on cpu: .*CUDA"):
        grouped_wgrad(a, a, offsets, recipe(wgrad_backend="cutlass"), fused=True)
    # where CUTLASS can run, "auto" takes whichever of cutlass and triton the GEMM order names first
    # (cutlass when it names neither); a name always wins
    real = moe.available_backends
    monkeypatch.setattr(moe, "available_backends", lambda device, op: {**real(device, op), "cutlass": None})
    cases = {("cutlass,torch", "auto"): "cutlass", (AUTO_CUDA, "auto"): "cutlass", ("triton,cutlass", "auto"): "triton",
             ("torch,triton", "auto"): "triton", ("torch", "auto"): "cutlass",
             (AUTO_CUDA, "cutlass"): "cutlass", (AUTO_CUDA, "triton"): "triton", ("cutlass", "triton"): "triton"}
    for (spec, wgrad), kernel in cases.items():
        assert wgrad_backend(recipe(backend=spec, wgrad_backend=wgrad), "cpu") == kernel, (spec, wgrad)
    with pytest.raises(BackendUnavailable, match="CUTLASS GEMMs run on CUDA tensors"):  # the kernel was called
        grouped_wgrad(a, a, offsets, recipe(wgrad_backend="cutlass"), fused=True)
    for env, kernel in (("cutlass,triton", "cutlass"), ("triton,cutlass", "triton")):
        monkeypatch.setenv("DUALFLOW_FP8_BACKEND", env)  # "auto" follows the process-wide order
        assert wgrad_backend(recipe(), "cpu") == kernel
    with pytest.raises(ValueError, match=r"wgrad_backend must be one of \('auto', 'cutlass', 'triton'\), got 'torch'"):
        recipe(wgrad_backend="torch")
    with pytest.raises(ValueError, match="backend must be 'triton', 'cutlass' or 'reference', got 'auto'"):
        torch.ops.dualflow.grouped_wgrad(*a, *a, offsets, "auto")


def test_reference_wgrad_refuses_unaligned_blocks():
    a = quantize_128x1(torch.randn(256, 64))
    with pytest.raises(ValueError, match="multiples of 128"):
        grouped_wgrad(a, a, torch.tensor([0, 100, 256]), REFERENCE, fused=False)


def test_bad_shapes_are_refused_with_the_shapes():
    x = torch.randn(128, 64)
    with pytest.raises(ValueError, match="w2"):
        fp8_grouped_mlp(x, torch.randn(2, 64, 64), torch.randn(2, 64, 16), torch.tensor([0, 0, 128]))
    with pytest.raises(ValueError, match="offsets"):
        fp8_grouped_mlp(x, torch.randn(2, 64, 64), torch.randn(2, 64, 32), torch.tensor([0, 128]))


@pytest.mark.gpu
def test_fp8_grouped_mlp_on_gpu_against_bf16():
    counts = [1000, 0, 77, 2048]
    offsets = _offsets(counts).cuda()
    x = _rows(offsets.cpu(), counts, int(offsets[-1]) + 100, 512, seed=8).cuda().bfloat16()
    torch.manual_seed(9)
    w13 = (torch.randn(4, 1024, 512) * 0.05).cuda()
    w2 = (torch.randn(4, 512, 512) * 0.05).cuda()
    xx, a, b = (t.clone().requires_grad_(True) for t in (x, w13, w2))
    y = fp8_grouped_mlp(xx, a, b, offsets)
    y.backward(torch.ones_like(y))
    xr, ar, br = (t.double().requires_grad_(True) for t in (x, w13, w2))
    yr = grouped_mlp_reference(xr, ar, br, offsets)
    yr.backward(torch.ones_like(yr))
    end = int(offsets[-1])
    # the input gradient passes three quantizations (dy, dh, the weights) and BF16 outputs: 10-15% on
    # Gaussian data (0.1005 measured on an H200), the forward and weight gradients two
    assert _rel(y[:end], yr[:end]) < 0.1 and _rel(xx.grad[:end], xr.grad[:end]) < 0.15
    assert _rel(a.grad, ar.grad) < 0.1 and _rel(b.grad, br.grad) < 0.1
