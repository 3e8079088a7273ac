"""The reference quantizers: the math of the recipe, layouts, padding, power-of-two scales, non-finite input.

Comparisons are bit for bit, which holds on any machine: the recipe is made of exact operations (max,
powers of two) and correctly rounded ones (one division, one multiplication, the E4M3 cast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualflow.fp8 import (
    dequantize,
    quantize_1x128,
    quantize_1x128_and_128x1,
    quantize_128x1,
    quantize_128x128,
)
from dualflow.fp8.quant import AMAX_FLOOR
from tests.fp8.helpers import KINDS, adversarial, assert_same_fp8, assert_same_scales

REF = dict(backend="reference")


def _tile_by_tile(x: torch.Tensor, tile_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe written out one tile at a time with numpy FP32 arithmetic (independent of the reference)."""
    xf = x.float().numpy()
    rows, cols = xf.shape
    rb, cb = -(-rows // tile_rows), -(-cols // 128)
    scales = np.zeros((rb, cb), dtype=np.float32)
    y = np.zeros_like(xf)
    for i in range(rb):
        for j in range(cb):
            tile = xf[i * tile_rows:(i + 1) * tile_rows, j * 128:(j + 1) * 128]
            amax = np.float32(np.max(np.abs(tile))) if not np.isnan(tile).any() else np.float32("nan")
            scale = np.float32(amax if np.isnan(amax) else max(amax, np.float32(AMAX_FLOOR))) / np.float32(448.0)
            scales[i, j] = scale
            with np.errstate(invalid="ignore"):  # inf * 0 in a tile whose scale is inf
                y[i * tile_rows:(i + 1) * tile_rows, j * 128:(j + 1) * 128] = tile * (np.float32(1.0) / scale)
    y = np.where(np.isnan(y), y, np.clip(y, -448, 448))
    return torch.from_numpy(y).to(torch.float8_e4m3fn), torch.from_numpy(scales)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(130, 300), (256, 256), (1, 7)])
def test_reference_equals_the_recipe_tile_by_tile(kind, shape):
    x = adversarial(*shape, kind)
    for fn, tile_rows in ((quantize_1x128, 1), (quantize_128x128, 128)):
        q, s = fn(x, **REF)
        q_want, s_want = _tile_by_tile(x, tile_rows)
        assert_same_scales(s, s_want)
        assert_same_fp8(q, q_want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layouts_shapes_and_dtypes(dtype):
    x = torch.randn(300, 200).to(dtype)
    q, s = quantize_1x128(x, **REF)
    assert q.shape == (300, 200) and s.shape == (300, 2)
    w, ws = quantize_128x128(x, **REF)
    assert w.shape == (300, 200) and ws.shape == (3, 2)
    qt, st = quantize_128x1(x, **REF)
    assert qt.shape == (200, 300) and st.shape == (200, 3)
    for t in (q, w, qt):
        assert t.dtype == torch.float8_e4m3fn and t.is_contiguous()
    for t in (s, ws, st):
        assert t.dtype == torch.float32 and t.is_contiguous()


def test_128x1_is_1x128_of_the_transpose_and_fused_equals_separate():
    x = adversarial(200, 300, "normal", seed=1)
    qt, st = quantize_128x1(x, **REF)
    q2, s2 = quantize_1x128(x.t().contiguous(), **REF)
    assert_same_fp8(qt, q2)
    assert_same_scales(st, s2)
    (q, s), (qt3, st3) = quantize_1x128_and_128x1(x, **REF)
    q1, s1 = quantize_1x128(x, **REF)
    assert_same_fp8(q, q1)
    assert_same_scales(s, s1)
    assert_same_fp8(qt3, qt)
    assert_same_scales(st3, st)


def test_ragged_edges_are_zero_padded():
    x = torch.randn(130, 200) * 5
    padded = torch.zeros(256, 256)
    padded[:130, :200] = x
    for fn in (quantize_1x128, quantize_128x128, quantize_128x1):
        q, s = fn(x, **REF)
        qp, sp = fn(padded, **REF)
        assert_same_fp8(q, qp[:q.shape[0], :q.shape[1]])
        assert_same_scales(s, sp[:s.shape[0], :s.shape[1]])


def test_round_trip_error_is_half_an_e4m3_step():
    x = torch.randn(256, 384) * torch.logspace(-3, 3, 384)
    for fn, tile_rows in ((quantize_1x128, 1), (quantize_128x128, 128)):
        q, s = fn(x, **REF)
        back = dequantize(q, s, tile_rows)
        scale = s.repeat_interleave(tile_rows, 0)[:256].repeat_interleave(128, 1)
        # normal E4M3 numbers carry 3 mantissa bits (relative step 2^-3); subnormals a fixed step 2^-9
        bound = torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-6)
        assert ((back - x).abs() <= bound).all()


def test_rounding_ties_go_to_even_and_448_saturates():
    # hand-worked E4M3 values with a tile amax of 448 (scale exactly 1): ties round to the even mantissa
    x = torch.tensor([[448.0, 1.0625, 1.1875, 432.0, -432.0, 0.0029296875, 447.9, 3.0e-4] + [0.0] * 120])
    q, s = quantize_1x128(x, **REF)
    assert s.item() == 1.0
    assert q.float()[0, :8].tolist() == [448.0, 1.0, 1.25, 448.0, -448.0, 0.00390625, 448.0, 0.0]


@pytest.mark.parametrize("amax", [1e-5, 1e-9, 1e-20])
def test_gradient_sized_tiles_keep_e4m3_precision(amax):
    # The gradients of a loss averaged over many tokens are tiny (1e-5 and below per element): their tiles
    # must be scaled to their own amax, as large ones are (a floor of 1e-4 on the amax flushed a 1e-9
    # tile to zero; benchmarks/RESULTS.md, 2026-12-02). E4M3 keeps 3 mantissa bits: every
    # element at or above 2^-6 of the tile's amax (E4M3's normal range after scaling) within 2^-4 of itself.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=g, dtype=torch.float64)
    x = (x / x.abs().amax(dim=1, keepdim=True) * amax).float()
    q, s = quantize_1x128(x, **REF)
    back = dequantize(q, s, 1).double()
    normal = x.double().abs() >= amax * 2.0 ** -6
    assert normal.float().mean() > 0.9
    err = (back - x.double()).abs()
    assert bool((err[normal] <= 2.0 ** -4 * x.double().abs()[normal]).all())


def test_all_zero_tile_uses_the_amax_floor():
    q, s = quantize_1x128(torch.zeros(3, 256), **REF)
    assert torch.equal(s, torch.full((3, 2), np.float32(AMAX_FLOOR) / np.float32(448.0)))
    assert not q.float().any()


def test_power_of_two_scales_are_exact_ue8m0_and_round_up():
    x = adversarial(200, 300, "normal", seed=3) * torch.logspace(-6, 6, 300)
    for fn in (quantize_1x128, quantize_128x128, quantize_128x1):
        _, plain = fn(x, **REF)
        q, s = fn(x, pow2_scales=True, **REF)
        assert torch.equal(torch.exp2(torch.log2(s).round()), s), "not a power of two"
        assert ((s >= plain) & (s < 2 * plain)).all(), "not the next power of two up"
        assert torch.equal(s.to(torch.float8_e8m0fnu).float(), s), "not representable as UE8M0"
        assert q.float().abs().max() <= 448


@pytest.mark.parametrize("fn", [quantize_1x128, quantize_128x128, quantize_128x1, quantize_1x128_and_128x1])
def test_non_finite_tiles_never_give_finite_answers(fn):
    x = torch.randn(256, 256)
    x[5, 130] = float("nan")
    x[200, 3] = float("inf")
    out = fn(x, **REF)
    pairs = out if isinstance(out[0], tuple) else (out,)
    for _, s in pairs:
        assert (~torch.isfinite(s)).sum() >= 2 and torch.isfinite(s).any()
    q, s = quantize_1x128(x, **REF)
    back = dequantize(q, s, 1)
    assert not torch.isfinite(back[5, 128:256]).any() and not torch.isfinite(back[200, :128]).any()
    clean = x.clone()
    clean[5, 130] = clean[200, 3] = 0.0
    _qc, sc = quantize_1x128(clean, **REF)
    keep = torch.isfinite(s)
    assert torch.equal(s[keep], sc[keep])  # the other tiles do not notice


@pytest.mark.parametrize(("fn", "where"), [
    (quantize_1x128, "tile x[70, 128:256]"),
    (quantize_128x128, "tile x[0:128, 128:256]"),
    (quantize_128x1, "tile x[0:128, 131]"),
    (quantize_1x128_and_128x1, "tile x[70, 128:256]"),
])
def test_check_raises_with_the_tile_location(fn, where):
    x = torch.randn(200, 300)
    x[70, 131] = float("-inf")
    fn(torch.randn(200, 300), check=True, **REF)  # finite input passes
    with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
        fn(x, check=True, **REF)


def test_input_validation():
    with pytest.raises(ValueError, match="2-D"):
        quantize_1x128(torch.randn(2, 3, 128), **REF)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        quantize_1x128(torch.ones(4, 128, dtype=torch.int32), **REF)
    with pytest.raises(ValueError, match="unknown quantization backend"):
        quantize_1x128(torch.ones(4, 128), backend="cudnn")


def test_auto_backend_is_the_reference_on_cpu():
    from dualflow.fp8.quant import _resolve

    assert _resolve("auto", torch.ones(1, 1)) == "reference"


@pytest.mark.parametrize(("rows", "cols", "groups"), [(300, 200, 1), (256, 384, 2), (384, 130, 3), (0, 256, 1)])
def test_128x128_with_its_transpose_is_each_groups_transpose(rows, cols, groups):
    from dualflow.fp8 import quantize_128x128_transposed

    w = torch.randn(rows, cols) * 3
    q, s, qt, st = quantize_128x128_transposed(w, groups=groups, backend="reference")
    q_want, s_want = quantize_128x128(w, backend="reference")
    assert torch.equal(q.view(torch.uint8), q_want.view(torch.uint8)) and torch.equal(s, s_want)
    group_rows, col_blocks = rows // groups, s.shape[1]
    assert qt.shape == (groups * cols, group_rows) and st.shape == (groups * col_blocks, -(-group_rows // 128))
    for g in range(groups):  # plain slicing and .t(): what the blocks of each group's W.T are
        rows_g = slice(g * group_rows, (g + 1) * group_rows)
        assert torch.equal(qt[g * cols:(g + 1) * cols].view(torch.uint8), q[rows_g].t().view(torch.uint8))
        blocks_g = slice(g * group_rows // 128, (g + 1) * group_rows // 128) if groups > 1 else slice(None)
        assert torch.equal(st[g * col_blocks:(g + 1) * col_blocks], s[blocks_g].t())


@pytest.mark.parametrize(("rows", "groups"), [(300, 2), (256, 3), (200, 2), (256, 0)])
def test_128x128_with_its_transpose_refuses_groups_that_do_not_split_the_rows(rows, groups):
    from dualflow.fp8 import quantize_128x128_transposed

    with pytest.raises(ValueError, match=f"groups={groups}: {rows} rows do not split"):
        quantize_128x128_transposed(torch.randn(rows, 128), groups=groups)
