"""Fine-grained FP8 (E4M3) quantization: 1x128 tiles, 128x128 blocks, and the 128x1 re-tiling of the backward.

The math, identical bit for bit in every backend:

    amax  = max |x| over the tile, in FP32 (a ragged edge is read as zero-padded)
    scale = max(amax, 1e-30) / 448                (optionally rounded up to a power of two)
    q     = e4m3(clamp(x * (1 / scale), -448, 448))   round to nearest even

``1 / scale`` is a correctly rounded FP32 reciprocal and ``x * (1 / scale)`` a multiplication, not a
division. A tile holding NaN or Inf gets a non-finite scale (NaN or Inf), so nothing downstream can turn
it into a finite wrong answer; ``check=True`` raises instead, naming the tile.

Layouts (the contract every GEMM backend reads):

- :func:`quantize_1x128` ``x[R, C]`` -> ``(q[R, C], scales[R, ceil(C/128)])``
- :func:`quantize_128x128` ``w[R, C]`` -> ``(q[R, C], scales[ceil(R/128), ceil(C/128)])``
- :func:`quantize_128x1` ``x[R, C]`` -> ``(qt[C, R], scales[C, ceil(R/128)])``: tiles run along the rows
  of ``x`` and the result is the operand of the weight-gradient GEMM, ``x.T`` quantized 1x128.
- :func:`quantize_1x128_and_128x1` reads ``x`` once and returns both of the above.
- :func:`quantize_128x128_transposed` ``w[R, C]`` -> ``(q, scales)`` as :func:`quantize_128x128` and the
  same blocks transposed, ``(qt[C, R], scales_t[ceil(C/128), ceil(R/128)])``, per group of rows for
  stacked expert weights: the weight's operand of the input-gradient GEMM from the same pass.

All FP8 tensors are contiguous row-major ``torch.float8_e4m3fn``; all scales contiguous row-major FP32,
unless ``m_major_scales=True`` asks for the 1x128 scales (of ``x`` and of ``x.T``) with strides
``(1, rows)`` instead: the same values in the layout torch's block-scaled matmul reads, which then needs
no copy kernel per GEMM operand (every GEMM backend reads either layout).

Each quantizer validates its arguments and calls its custom operator ``torch.ops.dualflow.*``
(:mod:`dualflow.fp8.ops`), so that ``torch.compile`` traces it without a graph break.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from dualflow.fp8.triton_support import triton_unavailable_reason

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# The floor only keeps the scale of an all-zero tile finite (1 / scale = 4.5e32): it must never bind on
# real data. A floor of 1e-4 (common in inference kernels, where activations are O(1)) binds on every
# gradient tile of a mean-reduced loss over 16k tokens (amax ~1e-5 and below); it is the likely cause
# of the FP8 training loss drifting above BF16's (benchmarks/RESULTS.md, 2026-12-02).
AMAX_FLOOR = 1e-30

QuantBackend = Literal["auto", "reference", "triton", "cuda"]
QUANT_BACKENDS = ("auto", "reference", "triton", "cuda")
# the backends whose quantizers (and the SwiGLU kernels fused with them) are Triton's: `cuda` replaces one
# layout's kernel only
TRITON_QUANT_BACKENDS = ("triton", "cuda")
Quantized = tuple[torch.Tensor, torch.Tensor]

_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------
# reference implementation (plain torch, any device): the ground truth of the tests
# ----------------------------------------------------------------------------------------------------------
def round_scale_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Round positive FP32 scales up to the next power of two (exact, on the bits); NaN and Inf stay."""
    bits = scale.view(torch.int32)
    exponent = bits & 0x7F800000
    inexact = ((bits & 0x7FFFFF) != 0) & (exponent != 0x7F800000)
    return torch.where(inexact, exponent + 0x800000, bits).view(torch.float32)


def scale_from_amax(amax: torch.Tensor, pow2_scales: bool = False) -> torch.Tensor:
    """``max(amax, AMAX_FLOOR) / 448`` in FP32 (NaN propagates), optionally rounded up to a power of two."""
    amax = amax.float().clamp(min=AMAX_FLOOR)
    # Divide by a tensor, not by a Python number: on CUDA, torch turns division by a scalar into a
    # multiplication by its reciprocal, which is off by one ulp for some amax (seen on an H100).
    scale = amax / torch.full_like(amax, FP8_MAX)
    return round_scale_up_pow2(scale) if pow2_scales else scale


def cast_to_fp8(y: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even FP32 -> E4M3 (what the GPU's ``cvt.rn.satfinite`` does); NaN stays."""
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _reference(x: torch.Tensor, tile_rows: int, pow2_scales: bool) -> Quantized:
    """Quantize ``x`` with ``tile_rows x 128`` tiles; the edges are zero-padded, the result is cut back."""
    rows, cols = x.shape
    pad_r, pad_c = -rows % tile_rows, -cols % BLOCK
    xp = F.pad(x.float(), (0, pad_c, 0, pad_r))
    tiles = xp.view((rows + pad_r) // tile_rows, tile_rows, (cols + pad_c) // BLOCK, BLOCK)
    scale = scale_from_amax(tiles.abs().amax(dim=(1, 3)), pow2_scales)
    inv = torch.ones_like(scale) / scale  # correctly rounded on every device, like the kernel's div_rn
    q = cast_to_fp8(tiles * inv[:, None, :, None])
    return q.view(rows + pad_r, cols + pad_c)[:rows, :cols].contiguous(), scale


def dequantize(q: torch.Tensor, scales: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """FP32 ``q * scale`` for ``tile_rows x 128`` tiles (``tile_rows`` 1 or 128); the inverse of quantization."""
    rows, cols = q.shape
    expand = scales.repeat_interleave(tile_rows, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return q.float() * expand


def empty_scales(rows: int, cols: int, device: torch.device, m_major: bool = False) -> torch.Tensor:
    """An uninitialised FP32 ``[rows, cols]`` scale tensor, row-major or (``m_major``) with strides exactly
    ``(1, max(rows, 1))``: torch checks the strides literally, and a size-1 dimension is not free to take
    any stride there."""
    if not m_major:
        return torch.empty(rows, cols, dtype=torch.float32, device=device)
    return torch.empty_strided((rows, cols), (1, max(rows, 1)), dtype=torch.float32, device=device)


def _as_m_major(s: torch.Tensor) -> torch.Tensor:
    return empty_scales(*s.shape, s.device, True).copy_(s)


def run_quantizer(x: torch.Tensor, rowwise: bool, colwise: bool, blockwise: bool, pow2_scales: bool, backend: str,
                  m_major: bool = False, transposed_groups: int | None = None) -> tuple[torch.Tensor | None, ...]:
    """``(q, scales, qt, scales_t)`` of the layouts asked for (``None`` for the others), unvalidated: the
    implementation behind the operators of :mod:`dualflow.fp8.ops`. ``backend`` is resolved when it is not
    already ``reference`` or ``triton``; ``m_major`` applies to the 1x128 scales only; ``transposed_groups``
    (the 128x128 layout alone) also gives each row group's blocks transposed as ``qt, scales_t``
    (:func:`quantize_128x128_transposed`)."""
    if backend not in ("reference", "triton", "cuda"):
        backend = resolve_quant_backend(backend, x.device)
    if backend == "cuda":
        from dualflow.fp8 import cuda_quant

        if transposed_groups is None and cuda_quant.why_not(x, rowwise, colwise, blockwise) is None:
            return cuda_quant.launch(x, rowwise, colwise, pow2_scales, m_major)
        backend = "triton"  # the layouts and inputs the CUDA kernel does not cover
    if backend == "triton":
        from dualflow.fp8.kernels.quant import quantize as _triton

        return _triton(x, rowwise=rowwise, colwise=colwise, blockwise=blockwise, pow2_scales=pow2_scales,
                       m_major=m_major, transposed_groups=transposed_groups)
    q = s = qt = st = None
    if rowwise or blockwise:
        q, s = _reference(x, BLOCK if blockwise else 1, pow2_scales)
        if m_major and not blockwise:
            s = _as_m_major(s)
    if colwise:
        qt, st = _reference(x.t(), 1, pow2_scales)
        if m_major:
            st = _as_m_major(st)
    if transposed_groups is not None:
        qt, st = transposed_blocks(q, s, transposed_groups)
    return q, s, qt, st


def check_transposed_groups(rows: int, groups: int) -> int:
    """Rows per group of :func:`quantize_128x128_transposed` (``ValueError`` if ``rows`` do not split into
    ``groups`` groups of a multiple of 128 rows; one group may have any number)."""
    if groups < 1 or rows % groups or (groups > 1 and (rows // groups) % BLOCK):
        raise ValueError(f"groups={groups}: {rows} rows do not split into that many groups of a multiple of "
                         f"{BLOCK} rows (one group may have any number)")
    return rows // groups


def transposed_blocks(q: torch.Tensor, scales: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 128x128 quantization ``(q [R, C], scales)`` transposed group by group: ``qt [G*C, R/G]`` with
    ``qt[g*C + c, i] = q[g*R/G + i, c]`` and ``scales_t`` likewise (the blocks of ``W.T`` are those of ``W``
    transposed: same bytes, same scales). What the kernel writes in the same pass; the reference."""
    rows, cols = q.shape
    group_rows = check_transposed_groups(rows, groups)
    group_blocks, col_blocks = math.ceil(group_rows / BLOCK), scales.shape[1]
    # clone, not contiguous(): where the transpose is already contiguous (a size-1 or empty dimension) the
    # outputs must still not share storage
    qt = q.view(groups, group_rows, cols).transpose(1, 2).clone(memory_format=torch.contiguous_format)
    st = scales.reshape(groups, group_blocks, col_blocks).transpose(1, 2).clone(memory_format=torch.contiguous_format)
    return qt.view(groups * cols, group_rows), st.view(groups * col_blocks, group_blocks)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------
def resolve_quant_backend(backend: str, device: torch.device | str) -> str:
    """The quantization backend ``backend`` selects on ``device``: ``auto`` is ``cuda`` on a CUDA device where
    Triton's kernels run (:mod:`dualflow.fp8.triton_support`: compute capability 8.9+) and the project's CUDA
    library is built, ``triton`` where only Triton's run, and ``reference`` otherwise; ``triton`` or ``cuda``
    where it cannot run raises ``RuntimeError`` with the reason.

    ``cuda`` is the project's CUDA library for the activation layouts (1x128, 128x1, both) of 16-bit
    inputs (:mod:`dualflow.fp8.cuda_quant`) and Triton's kernels for every other layout and input; it needs
    both. It is ``auto``'s first choice because it measured faster than Triton's kernels in every activation
    layout at every shape benchmarked, with the same bits (benchmarks/NOTES_gpu.md row 30)."""
    device = torch.device(device)
    if backend == "auto":
        if device.type != "cuda" or triton_unavailable_reason(device) is not None:
            return "reference"
        from dualflow.fp8.cuda_quant import unavailable_reason

        return "cuda" if unavailable_reason(device) is None else "triton"
    if backend == "reference":
        return backend
    if backend in TRITON_QUANT_BACKENDS:
        reason = triton_unavailable_reason(device)
        if reason is None and backend == "cuda":
            from dualflow.fp8.cuda_quant import unavailable_reason

            reason = unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"quantization backend {backend!r} cannot run here: {reason}. Use "
                               "backend='reference' or 'auto'.")
        return backend
    raise ValueError(f"unknown quantization backend {backend!r}; expected one of {QUANT_BACKENDS}")


def _resolve(backend: str, x: torch.Tensor) -> str:
    return resolve_quant_backend(backend, x.device)


def _validate(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} expects a 2-D tensor [rows, cols], got shape {tuple(x.shape)}; "
                         "flatten the leading dimensions first (x.reshape(-1, x.shape[-1]))")
    if x.dtype not in _FLOAT_INPUTS:
        raise TypeError(f"{name} expects float32, bfloat16 or float16 input, got {x.dtype}")


def _check_finite(scales: torch.Tensor, describe) -> None:
    bad = ~torch.isfinite(scales)
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0].tolist())
        raise ValueError(f"non-finite input: {describe(i, j)} holds NaN or Inf (scale {scales[i, j].item()}); "
                         f"{int(bad.sum())} of {scales.numel()} tiles are affected")


def _tile(i: int, j: int, rows: int) -> str:
    return f"tile x[{i * rows}:{(i + 1) * rows}, {j * BLOCK}:{(j + 1) * BLOCK}]" if rows > 1 \
        else f"tile x[{i}, {j * BLOCK}:{(j + 1) * BLOCK}]"


def _tile_t(i: int, j: int) -> str:  # scales of the 128x1 layout are indexed [column of x, row block of x]
    return f"tile x[{j * BLOCK}:{(j + 1) * BLOCK}, {i}]"


def _ops():
    # the operators are registered by dualflow.fp8.ops, which imports this module (hence the late lookup)
    return torch.ops.dualflow


def quantize_1x128(x: torch.Tensor, *, pow2_scales: bool = False, check: bool = False,
                   backend: QuantBackend = "auto", m_major_scales: bool = False) -> Quantized:
    """1x128 tiles (activations, output gradients): ``x[R, C]`` -> ``(q[R, C], scales[R, ceil(C/128)])``."""
    _validate(x, "quantize_1x128")
    q, s = _ops().quantize_1x128(x, pow2_scales, _resolve(backend, x), m_major_scales)
    if check:
        _check_finite(s, lambda i, j: _tile(i, j, 1))
    return q, s


def quantize_128x128(w: torch.Tensor, *, pow2_scales: bool = False, check: bool = False,
                     backend: QuantBackend = "auto") -> Quantized:
    """128x128 blocks (weights): ``w[R, C]`` -> ``(q[R, C], scales[ceil(R/128), ceil(C/128)])``."""
    _validate(w, "quantize_128x128")
    q, s = _ops().quantize_128x128(w, pow2_scales, _resolve(backend, w))
    if check:
        _check_finite(s, lambda i, j: _tile(i, j, BLOCK))
    return q, s


def quantize_128x128_transposed(w: torch.Tensor, *, groups: int = 1, pow2_scales: bool = False,
                                check: bool = False, backend: QuantBackend = "auto") -> tuple[torch.Tensor, ...]:
    """128x128 blocks of ``w[R, C]`` and of each of its ``groups`` row groups transposed, from one pass:
    ``(q[R, C], scales[ceil(R/128), ceil(C/128)], qt[G*C, R/G], scales_t[G*ceil(C/128), ceil(R/G/128)])``
    with ``qt[g*C + c, i] = q[g*R/G + i, c]``. For stacked expert weights ``[G, out, in]`` flattened to
    ``[G*out, in]`` (``out`` a multiple of 128), ``qt`` is ``[G, in, out]`` flattened: each expert's
    ``W.T``, the operand of the input-gradient GEMM, without a transposing copy."""
    _validate(w, "quantize_128x128_transposed")
    check_transposed_groups(w.shape[0], groups)
    q, s, qt, st = _ops().quantize_128x128_t(w, pow2_scales, _resolve(backend, w), groups)
    if check:
        _check_finite(s, lambda i, j: _tile(i, j, BLOCK))
    return q, s, qt, st


def quantize_128x1(x: torch.Tensor, *, pow2_scales: bool = False, check: bool = False,
                   backend: QuantBackend = "auto", m_major_scales: bool = False) -> Quantized:
    """128x1 tiles along the rows: ``x[R, C]`` -> ``(qt[C, R], scales[C, ceil(R/128)])``, i.e. ``x.T`` 1x128."""
    _validate(x, "quantize_128x1")
    qt, st = _ops().quantize_128x1(x, pow2_scales, _resolve(backend, x), m_major_scales)
    if check:
        _check_finite(st, _tile_t)
    return qt, st


def quantize_1x128_and_128x1(x: torch.Tensor, *, pow2_scales: bool = False, check: bool = False,
                             backend: QuantBackend = "auto",
                             m_major_scales: bool = False) -> tuple[Quantized, Quantized]:
    """Both :func:`quantize_1x128` and :func:`quantize_128x1` of ``x`` from a single read of ``x``."""
    _validate(x, "quantize_1x128_and_128x1")
    q, s, qt, st = _ops().quantize_1x128_and_128x1(x, pow2_scales, _resolve(backend, x), m_major_scales)
    if check:
        _check_finite(s, lambda i, j: _tile(i, j, 1))
        _check_finite(st, _tile_t)
    return (q, s), (qt, st)


def num_blocks(n: int) -> int:
    """``ceil(n / 128)``: the number of scale entries along a dimension of ``n`` elements."""
    return math.ceil(n / BLOCK)
