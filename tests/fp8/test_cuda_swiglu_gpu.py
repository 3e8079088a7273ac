"""The CUDA library's SwiGLU and SwiGLU-backward kernels fused with both FP8 layouts (``csrc/swiglu.cu``) on a
real GPU, against the plain-torch reference of dualflow/fp8/moe.py run on the same GPU.

Bit for bit: the kernel does the reference's FP32 operations in the reference's order (IEEE division, the
accurate expf, no contraction into FMAs; torch's CUDA kernels use the same device functions), rounds to
the input's dtype as ``.to()`` does, then quantizes with the tile code whose bits equal the reference
quantizer's (tests/fp8/test_cuda_quant_gpu.py). Skipped without CUDA or without the built library."""

from __future__ import annotations

import pytest
import torch

from dualflow.fp8 import cuda_quant
from dualflow.fp8.moe import run_swiglu_backward_quantize, run_swiglu_quantize
from tests.fp8.helpers import adversarial, assert_same_fp8, assert_same_scales

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_quant_kernels")]
CUDA = torch.device("cuda")


def _same(got, want, rows: int | None = None) -> None:
    """(q, s, qt, st) equal; with ``rows``, only the first ``rows`` rows of the result (the rest undefined)."""
    q, s, qt, st = got
    wq, ws, wqt, wst = want
    if rows is not None:
        q, s, wq, ws = q[:rows], s[:rows], wq[:rows], ws[:rows]
        qt, wqt, st, wst = qt[:, :rows], wqt[:, :rows], st[:, : -(-rows // 128)], wst[:, : -(-rows // 128)]
    assert_same_fp8(q, wq)
    assert_same_scales(s, ws)
    assert_same_fp8(qt, wqt)
    assert_same_scales(st, wst)


def _gate_up(rows: int, hidden: int, kind: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    h = adversarial(rows, 2 * hidden, kind, seed=seed)
    if kind == "normal":  # gates far out on both sides: silu(g) ~ g, and exp(-g) overflowing to inf
        h[1, :7] = torch.tensor([60.0, -60.0, 100.0, -100.0, 200.0, -200.0, 0.0])
    if dtype == torch.float16:  # inside FP16's range (its Inf would make every scale of a row NaN)
        h = torch.where(h.isfinite(), h.clamp(-6e4, 6e4), h)
    return h.to(dtype).to(CUDA)


# 256x1408: whole tiles (V2-Lite's expert width); 1000x200 and 260x72: ragged rows and columns (forward
# only: the backward needs hidden % 128 == 0); 4x128: less than a tile; 260x384: ragged rows, backward
SHAPES = [(256, 1408), (1000, 200), (260, 72), (4, 128), (260, 384)]
KINDS = ["normal", "zero_tiles", "huge_tiny", "nonfinite", "near_448"]
CASES = [(shape, kind) for shape in SHAPES for kind in KINDS] + [((16384, 1408), "normal")]  # + a step's rows


@pytest.mark.parametrize(("shape", "kind"), CASES, ids=lambda c: c if isinstance(c, str) else "x".join(map(str, c)))
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_forward_and_backward_match_the_reference_bit_for_bit(shape, kind, pow2, dtype):
    rows, hidden = shape
    h = _gate_up(rows, hidden, kind, dtype, seed=11)
    want = run_swiglu_quantize(h, pow2, False, "reference", None)
    _same(cuda_quant.swiglu_quantize(h, None, None, pow2), want)
    if hidden % 128 == 0:
        da = _gate_up(rows, hidden // 2, kind, dtype, seed=12)  # [rows, hidden]
        want = run_swiglu_backward_quantize(h, da, pow2, False, "reference", None)
        _same(cuda_quant.swiglu_quantize(h, da, None, pow2), want)


def test_strided_operands_and_the_end_of_the_rows():
    rows, hidden = 512, 256
    wide = torch.randn(rows, 2 * hidden + 8, device=CUDA, dtype=torch.bfloat16) * 3
    h = wide[:, 4:4 + 2 * hidden]  # row stride 2H + 8, 8-byte aligned
    da = (torch.randn(rows, hidden + 4, device=CUDA, dtype=torch.bfloat16))[:, :hidden]
    for end_dtype in (torch.int32, torch.int64):
        end = torch.tensor([200], dtype=end_dtype, device=CUDA)  # tiles from row 256 on are skipped
        _same(cuda_quant.swiglu_quantize(h, None, end, False), run_swiglu_quantize(h, False, False, "reference", None),
              rows=200)
        _same(cuda_quant.swiglu_quantize(h, da, end, False),
              run_swiglu_backward_quantize(h, da, False, False, "reference", None), rows=200)
    # an end past the rows computes every row
    end = torch.tensor([10_000], dtype=torch.int64, device=CUDA)
    _same(cuda_quant.swiglu_quantize(h, da, end, True),
          run_swiglu_backward_quantize(h, da, True, False, "reference", None))


def test_the_cuda_backend_dispatches_to_the_kernel_and_others_fall_back():
    h = torch.randn(384, 512, device=CUDA, dtype=torch.bfloat16) * 2
    da = torch.randn(384, 256, device=CUDA, dtype=torch.bfloat16)
    _same(run_swiglu_quantize(h, False, True, "cuda", None), cuda_quant.swiglu_quantize(h, None, None, False))
    _same(run_swiglu_backward_quantize(h, da, False, True, "cuda", None),
          cuda_quant.swiglu_quantize(h, da, None, False))
    # rows not a multiple of 4: not the kernel's; the Triton kernels take it under the same backend
    odd = h[:381]
    assert "multiples of 4" in cuda_quant.swiglu_why_not(odd)
    got = run_swiglu_quantize(odd, False, True, "cuda", None)
    want = run_swiglu_quantize(odd, False, False, "reference", None)
    assert got[0].shape == want[0].shape and got[2].shape == want[2].shape
    assert "hidden a multiple of 128" in cuda_quant.swiglu_why_not(h[:, :192], da[:, :96])
    with pytest.raises(ValueError, match="da must be"):
        cuda_quant.swiglu_quantize(h, da.float(), None, False)
    with pytest.raises(ValueError, match="end must be one int32/int64"):
        cuda_quant.swiglu_quantize(h, None, torch.tensor([1.0], device=CUDA), False)


def test_runs_under_cuda_graph_capture():
    h = torch.randn(4096, 2816, device=CUDA, dtype=torch.bfloat16) * 2
    da = torch.randn(4096, 1408, device=CUDA, dtype=torch.bfloat16)
    end = torch.tensor([4096], dtype=torch.int32, device=CUDA)
    sh, sda = h.clone(), da.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        cuda_quant.swiglu_quantize(sh, sda, end, False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fwd = cuda_quant.swiglu_quantize(sh, None, end, False)
        bwd = cuda_quant.swiglu_quantize(sh, sda, end, False)
    sh.copy_(h * 3)
    sda.copy_(da * 0.5)
    end.fill_(2048)
    graph.replay()
    torch.cuda.synchronize()
    _same(fwd, run_swiglu_quantize(h * 3, False, False, "reference", None), rows=2048)
    _same(bwd, run_swiglu_backward_quantize(h * 3, da * 0.5, False, False, "reference", None), rows=2048)
