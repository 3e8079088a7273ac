"""The Triton quantization kernel against the reference, bit for bit (CPU: Triton's interpreter); that holds on
any machine because the recipe's operations are exact or correctly rounded (tests/fp8/test_quant.py)."""

from __future__ import annotations

import pytest
import torch

from dualflow.fp8 import quantize_1x128, quantize_1x128_and_128x1, quantize_128x1, quantize_128x128
from tests.fp8.helpers import KINDS, adversarial, assert_same_fp8, assert_same_scales

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN * 0 in numpy

QUANTIZERS = [quantize_1x128, quantize_128x128, quantize_128x1, quantize_1x128_and_128x1]


def _pairs(out):
    return out if isinstance(out[0], tuple) else (out,)


def assert_backends_agree(x: torch.Tensor, fn, **kw) -> None:
    want = _pairs(fn(x, backend="reference", **kw))
    got = _pairs(fn(x, backend="triton", **kw))
    for (q, s), (q_want, s_want) in zip(got, want):
        assert_same_scales(s, s_want)
        assert_same_fp8(q, q_want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fn", QUANTIZERS, ids=lambda f: f.__name__)
def test_bit_exact_on_random_and_adversarial_input(fn, kind):
    assert_backends_agree(adversarial(200, 300, kind, seed=7), fn)


@pytest.mark.parametrize("fn", QUANTIZERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", ["normal", "huge_tiny", "nonfinite", "at_clamp"])
def test_bit_exact_with_power_of_two_scales(fn, kind):
    assert_backends_agree(adversarial(130, 260, kind, seed=11), fn, pow2_scales=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "subnormal", "near_448", "nonfinite"])
def test_bit_exact_on_16_bit_input(dtype, kind):
    assert_backends_agree(adversarial(129, 257, kind, dtype=dtype, seed=5), quantize_1x128_and_128x1)
    assert_backends_agree(adversarial(129, 257, kind, dtype=dtype, seed=5), quantize_128x128)


@pytest.mark.parametrize("shape", [(1, 1), (1, 128), (128, 128), (3, 1000), (257, 129)])
def test_bit_exact_on_ragged_shapes(shape):
    x = adversarial(*shape, "normal", seed=2)
    for fn in QUANTIZERS:
        assert_backends_agree(x, fn)


def test_strided_views_and_empty_input():
    base = adversarial(300, 400, "normal", seed=4)
    for view in (base.t(), base[10:200:2, 5:300]):
        for fn in QUANTIZERS:
            assert_backends_agree(view, fn)
    for fn in (quantize_1x128, quantize_128x1):
        q, s = fn(torch.zeros(0, 256), backend="triton")
        q_want, s_want = fn(torch.zeros(0, 256), backend="reference")
        assert q.shape == q_want.shape and s.shape == s_want.shape


def test_check_reports_the_same_tile_as_the_reference():
    x = torch.randn(200, 300)
    x[150, 40] = float("nan")
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match=r"tile x\[128:256, 0:128\]"):
            quantize_128x128(x, check=True, backend=backend)


@pytest.mark.parametrize(("rowwise", "colwise", "blockwise", "tile_r", "tile_c", "warps"), [
    (True, False, False, 32, 128, 4), (True, False, False, 64, 128, 2), (False, True, False, 128, 32, 1),
    (False, True, False, 128, 64, 4), (True, True, False, 128, 128, 8), (False, False, True, 128, 128, 2)])
def test_every_launch_setting_the_sweep_times_is_bit_exact(rowwise, colwise, blockwise, tile_r, tile_c, warps):
    from dualflow.fp8.kernels.quant import quantize
    from dualflow.fp8.quant import run_quantizer

    x = adversarial(200, 300, "nonfinite", seed=9)
    got = quantize(x, rowwise=rowwise, colwise=colwise, blockwise=blockwise, pow2_scales=False, tile_r=tile_r,
                   tile_c=tile_c, num_warps=warps)
    want = run_quantizer(x, rowwise, colwise, blockwise, False, "reference")
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            (assert_same_scales if g.dtype == torch.float32 else assert_same_fp8)(g.contiguous(), w.contiguous())


@pytest.mark.parametrize(("modes", "tiles", "match"), [
    ((True, False, False), (128, 64), "tile_c=64"), ((False, True, False), (64, 128), "tile_r=64"),
    ((False, False, True), (32, 128), "tile_r=32"), ((True, True, False), (128, 32), "tile_c=32")])
def test_launch_settings_a_layout_cannot_take_are_refused(modes, tiles, match):
    from dualflow.fp8.kernels.quant import quantize

    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(256, 256), rowwise=modes[0], colwise=modes[1], blockwise=modes[2], pow2_scales=False,
                 tile_r=tiles[0], tile_c=tiles[1])


@pytest.mark.parametrize(("rows", "cols", "groups"), [(300, 200, 1), (256, 384, 2), (384, 130, 3), (1, 5, 1)])
@pytest.mark.parametrize("kind", ["normal", "nonfinite", "at_clamp"])
def test_128x128_with_its_transpose_per_group_is_bit_exact(rows, cols, groups, kind):
    from dualflow.fp8 import quantize_128x128_transposed

    w = adversarial(rows, cols, kind, seed=13)
    got = quantize_128x128_transposed(w, groups=groups, backend="triton")
    want = quantize_128x128_transposed(w, groups=groups, backend="reference")
    for g, r in zip(got, want):
        (assert_same_scales if g.dtype == torch.float32 else assert_same_fp8)(g, r)


def test_out_storage_is_written_in_place_and_checked():
    from dualflow.fp8.kernels.quant import quantize

    w = adversarial(256, 384, "normal", seed=3)
    want = quantize(w, rowwise=False, colwise=False, blockwise=True, pow2_scales=False, transposed_groups=2)
    out = tuple(torch.empty_like(t) for t in want)
    got = quantize(w, rowwise=False, colwise=False, blockwise=True, pow2_scales=False, transposed_groups=2, out=out)
    assert all(g is o for g, o in zip(got, out))
    for g, r in zip(got, want):
        (assert_same_scales if g.dtype == torch.float32 else assert_same_fp8)(g, r)
    wrong = (*out[:3], out[3].t())  # the transposed scales in the wrong orientation
    with pytest.raises(ValueError, match=r"out: scales_t must be torch.float32 \(6, 1\) with strides \(1, 1\)"):
        quantize(w, rowwise=False, colwise=False, blockwise=True, pow2_scales=False, transposed_groups=2, out=wrong)
