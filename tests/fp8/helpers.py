"""Inputs and comparisons shared by the FP8 tests: random and adversarial tensors, bit-level equality."""

from __future__ import annotations

import torch

from dualflow.fp8 import dequantize
from dualflow.fp8.quant import AMAX_FLOOR

KINDS = ("normal", "zero_tiles", "at_clamp", "near_448", "subnormal", "huge_tiny", "nonfinite")


def adversarial(rows: int, cols: int, kind: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A ``rows x cols`` tensor of one kind of trouble for a 1x128 / 128x128 quantizer (see KINDS)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 3
    if kind == "zero_tiles":  # whole 1x128 rows, a 128x128 block and signed zeros
        x[::3, :128] = 0.0
        x[:128, 128:256] = 0.0
        x[1::5] = -0.0 * x[1::5].sign()
    elif kind == "at_clamp":  # tile amax exactly at, just below and just above the amax floor
        floor = torch.tensor(AMAX_FLOOR, dtype=torch.float32)
        near = torch.stack([floor, torch.nextafter(floor, torch.tensor(0.0)),
                            torch.nextafter(floor, torch.tensor(1.0))])
        x = x / x.abs().amax() * AMAX_FLOOR
        x[:, ::128] = near[torch.arange(rows) % 3][:, None]
    elif kind == "near_448":  # amax 448 (scale 1): e4m3 rounding ties, the top of the range
        ties = torch.tensor([1.0625, 1.1875, 432.0, 416.0, 440.0, 447.9, 448.0, -448.0, 0.01, 3.3e-3])
        x = ties[torch.randint(0, len(ties), (rows, cols), generator=g)]
        x[:, ::128] = 448.0
    elif kind == "subnormal":  # FP32 subnormals, and values landing in E4M3's subnormal range
        x = torch.randn(rows, cols, generator=g) * 1e-39
        x[::2] = (torch.rand(rows, cols, generator=g)[::2] * 0.015)
        x[::2, ::128] = 448.0
    elif kind == "huge_tiny":
        x = x * torch.where(torch.rand(rows, cols, generator=g) < 0.5, 1e30, 1e-30)
        x[0, 0] = 3.0e38
    elif kind == "nonfinite":
        flat = x.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[:6]
        flat[idx[:2]] = float("nan")
        flat[idx[2:4]] = float("inf")
        flat[idx[4:]] = float("-inf")
    elif kind != "normal":
        raise ValueError(kind)
    return x.to(dtype)


def assert_bitwise(want: torch.Tensor, got: torch.Tensor) -> None:
    """The same dtype, shape and bits (NaN payloads and the sign of zero included): what two runs of the same
    kernels on the same operands must give."""
    assert want.dtype == got.dtype and want.shape == got.shape, (want.dtype, got.dtype, want.shape, got.shape)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[want.element_size()]
    assert torch.equal(want.contiguous().view(bits), got.contiguous().view(bits))


def assert_same_fp8(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal E4M3 bytes, NaN codes (either sign) counting as equal to each other."""
    assert a.dtype == b.dtype == torch.float8_e4m3fn and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    nan_a, nan_b = a.float().isnan(), b.float().isnan()
    assert torch.equal(nan_a, nan_b), f"NaN positions differ at {(nan_a != nan_b).nonzero()[:5].tolist()}"
    diff = (a.view(torch.uint8) != b.view(torch.uint8)) & ~nan_a
    assert not diff.any(), (f"{int(diff.sum())} bytes differ, first at {diff.nonzero()[:5].tolist()}: "
                            f"{a.float()[diff][:5].tolist()} vs {b.float()[diff][:5].tolist()}")


def assert_same_scales(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-equal FP32 scales (any NaN equals any NaN)."""
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    nan_a, nan_b = a.isnan(), b.isnan()
    assert torch.equal(nan_a, nan_b)
    diff = (a.view(torch.int32) != b.view(torch.int32)) & ~nan_a
    assert not diff.any(), f"scales differ at {diff.nonzero()[:5].tolist()}: {a[diff][:5]} vs {b[diff][:5]}"


def gemm_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepSeek's GEMM accuracy metric ``1 - 2 sum(xy) / sum(x^2 + y^2)`` in float64."""
    x, y = x.detach().double(), y.detach().double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``, in dB."""
    r, t = reference.detach().double(), test.detach().double()
    return float(10 * torch.log10((r * r).sum() / ((r - t) ** 2).sum()))


def scaled_randn(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Normal data whose magnitude jumps by decades between 128-blocks: a scale applied to the wrong
    block shows up as a large error."""
    g = torch.Generator().manual_seed(seed)
    rb, cb = -(-rows // 128), -(-cols // 128)
    mag = 10.0 ** torch.randint(-3, 4, (rb, cb), generator=g).float()
    mag = mag.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    row_mag = 2.0 ** torch.randint(-4, 5, (rows, 1), generator=g).float()  # and between rows
    return torch.randn(rows, cols, generator=g) * mag * row_mag


def assert_agrees(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor) -> None:
    """``|got - want| <= 2 ulp(got.dtype) |want| + 2^-9 magnitude`` elementwise, NaN/Inf in the same places.

    What a tensor-core FP8 GEMM can promise against the reference backend: the reference sums each
    128-wide K block exactly in FP32, Hopper's FP8 MMA adds the products of a block in a
    limited-precision accumulator (about 14 bits, DeepSeek-V3 section 3.3) before the FP32 promotion.
    A CUTLASS kernel promotes once per block, after four K=32 MMAs: on operands whose products share a
    sign their rounding errors share one too (the output seen came out smaller in magnitude) and reached
    2^-9.95 of the magnitude on an H200 (the k-grouped weight gradient over 1,024 tokens of scaled data),
    past the 2^-10 this bound used to allow.
    ``magnitude`` is ``|A| @ |B|^T`` of the dequantized operands (:func:`magnitude`): a scale taken from
    a wrong block or a lost promotion is off by whole multiples of it.
    """
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[got.dtype]
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), "non-finite outputs differ in position"
    g, w, mag = got.double()[finite], want.double()[finite], magnitude.double()[finite]
    excess = (g - w).abs() - (2 * ulp * w.abs() + 2.0**-9 * mag)
    assert not bool((excess > 0).any()), (
        f"{int((excess > 0).sum())} of {g.numel()} outputs off; worst at {int(excess.argmax())}: "
        f"{g[excess.argmax()].item()} vs {w[excess.argmax()].item()} (magnitude {mag[excess.argmax()].item()})")


def magnitude(a, sa, a_rows, b, sb, b_rows) -> torch.Tensor:
    """``|A| @ |B|^T`` in float64 of the dequantized operands: the size of what entered each output."""
    return dequantize(a, sa, a_rows).abs().double() @ dequantize(b, sb, b_rows).abs().double().T
