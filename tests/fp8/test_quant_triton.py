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
