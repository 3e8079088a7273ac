"""The CUDA library's activation quantizer (``backend="cuda"``: 1x128, 128x1, both) on a real GPU, bit for bit
against the CPU reference, and the inputs it leaves to Triton. Skipped without CUDA or without the built library."""

from __future__ import annotations

import pytest
import torch

from dualflow.fp8 import cuda_quant, quantize_1x128, quantize_1x128_and_128x1
from dualflow.fp8.quant import run_quantizer
from tests.fp8.helpers import KINDS, adversarial, assert_same_fp8, assert_same_scales

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_quant_kernels")]
CUDA = torch.device("cuda")


LAYOUTS = {"fused": (True, True), "1x128": (True, False), "128x1": (False, True)}


def _fused(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor | None, ...]:
    return cuda_quant.quantize(x, rowwise=True, colwise=True, pow2_scales=pow2)


def _assert_matches_reference(x: torch.Tensor, pow2: bool, m_major: bool = False, layout: str = "fused") -> None:
    rowwise, colwise = LAYOUTS[layout]
    (wq, ws), (wqt, wst) = quantize_1x128_and_128x1(x.cpu(), pow2_scales=pow2, backend="reference")
    q, s, qt, st = cuda_quant.quantize(x, rowwise=rowwise, colwise=colwise, pow2_scales=pow2, m_major=m_major)
    assert (q is None, s is None) == (not rowwise,) * 2 and (qt is None, st is None) == (not colwise,) * 2
    if rowwise:
        if m_major:
            assert s.stride() == (1, s.shape[0])
        assert_same_fp8(q.cpu(), wq)
        assert_same_scales(s.cpu(), ws)
    if colwise:
        if m_major:
            assert st.stride() == (1, st.shape[0])
        assert_same_fp8(qt.cpu(), wqt)
        assert_same_scales(st.cpu(), wst)


# 1000x1300: ragged tiles on both sides; 2048x1408: whole row tiles, ragged columns; 576x1344 and
# 4x4: less than a tile of rows; 16384x2048: a training step's activation. A layout alone runs the same
# template without the other pass: the first two shapes cover its edges.
SHAPES = [(1000, 1300), (2048, 1408), (576, 1344), (4, 4), (16384, 2048)]
CASES = [(layout, shape) for layout in LAYOUTS for shape in (SHAPES if layout == "fused" else SHAPES[:2])]


@pytest.mark.parametrize(("layout", "shape"), CASES, ids=lambda c: c if isinstance(c, str) else "x".join(map(str, c)))
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_kernel_matches_the_cpu_reference_bit_for_bit(layout, shape, pow2, kind, dtype):
    x = adversarial(*shape, kind, dtype=torch.float32, seed=5)
    if dtype == torch.float16:  # keep the data inside FP16's range (its Inf would make every scale NaN)
        x = torch.where(x.isfinite(), x.clamp(-6e4, 6e4), x)
    _assert_matches_reference(x.to(dtype).to(CUDA), pow2, layout=layout)


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_m_major_scales_and_a_strided_input(pow2, layout):
    wide = torch.randn(1000, 1404, device=CUDA, dtype=torch.bfloat16) * 3
    _assert_matches_reference(wide[:, 4:1304], pow2, m_major=True, layout=layout)  # row stride 1404, 8-byte aligned


def test_empty_input():
    q, s, qt, st = _fused(torch.empty(0, 256, device=CUDA, dtype=torch.bfloat16))
    assert q.shape == (0, 256) and s.shape == (0, 2) and qt.shape == (256, 0) and st.shape == (256, 0)


@pytest.mark.parametrize(("shape", "dtype", "layout"), [
    ((1001, 1300), torch.bfloat16, "fused"),  # rows not a multiple of 4
    ((1000, 1302), torch.bfloat16, "fused"),  # columns not a multiple of 4
    ((1000, 1300), torch.float32, "fused"),  # 32-bit input
    ((1001, 1300), torch.bfloat16, "1x128"),  # one layout alone, rows not a multiple of 4
], ids=str)
def test_inputs_the_kernel_does_not_cover_go_to_triton(shape, dtype, layout):
    x = adversarial(*shape, "normal", dtype=dtype, seed=6).to(CUDA)
    fused = layout == "fused"
    assert cuda_quant.why_not(x, True, fused, False) is not None
    got = run_quantizer(x, True, fused, False, False, "cuda")
    want = run_quantizer(x.cpu(), True, fused, False, False, "reference")  # what Triton's kernels give
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            (assert_same_scales if g.dtype == torch.float32 else assert_same_fp8)(g.cpu(), w)
    if not fused:  # the public entry point takes the backend too
        q, _ = quantize_1x128(x, backend="cuda")
        assert_same_fp8(q.cpu(), want[0])


def test_misaligned_input_is_refused_with_a_reason():
    base = torch.randn(64 * 1300 + 2, device=CUDA, dtype=torch.bfloat16)
    x = base[2:].view(64, 1300)  # 4-byte, not 8-byte, aligned
    assert "aligned" in cuda_quant.why_not(x, True, True, False)
    with pytest.raises(ValueError, match="aligned"):
        _fused(x)


def test_runs_under_cuda_graph_capture():
    x = torch.randn(4096, 2048, device=CUDA, dtype=torch.bfloat16)
    static = x.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _fused(static)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = _fused(static)
    static.copy_(x * 7)
    graph.replay()
    torch.cuda.synchronize()
    want = _fused(x * 7)
    for g, w in zip(out, want):
        (assert_same_scales if g.dtype == torch.float32 else assert_same_fp8)(g, w)
