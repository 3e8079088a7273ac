"""The ``torch`` GEMM backend: torch's block-scaled ``scaled_mm`` (cuBLASLt), with dualflow's scales converted.

What torch wants (ATen's ScaledBlas.cpp; sm90 only, cuBLASLt >= 12.9; ``mat_b`` passed as ``b.T``, i.e.
column-major ``[K, N]``; K and N multiples of 16; M a multiple of 4 on cuBLASLt 13.0, so other row
counts are padded with zero rows here):

- ``torch.nn.functional.scaled_mm`` (torch >= 2.10, ``_scaled_mm_v2``):
  1x128 ``scale_a`` ``[M, K/128]`` with strides ``(1, M)`` (M-major); 1x128 ``scale_b`` ``[N, K/128]``
  with strides ``(1, N)``; 128x128 ``scale_b`` ``[round_up(K/128, 4), N/128]`` with strides
  ``(1, round_up(K/128, 4))``, i.e. the transpose of dualflow's ``[N/128, K/128]`` with its rows padded
  to a multiple of 4 (builds before the padding rule want ``K/128`` rows: the same thing when K/128 is
  a multiple of 4).
- ``torch._scaled_mm`` (the older entry point): the same ``scale_a``; 128x128 ``scale_b`` is the
  transpose view of dualflow's scales (``[K/128, N/128]``, strides ``(1, K/128)``); 1x128 ``scale_b`` is
  ``[K/128, N]`` contiguous.

Which entry point and layout a build accepts is probed once per (device, layout, output dtype) on a
small GEMM whose result is checked against the reference backend. On the CPU none of this exists: torch
accepts only tensor-wise and row-wise scales there, so the backend reports itself unavailable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _m_major(s: torch.Tensor) -> torch.Tensor:
    # strides exactly (1, rows): torch checks them literally, and ``s.t().contiguous().t()`` keeps a
    # one-row tensor's strides as they were (a size-1 dimension counts as contiguous either way)
    rows, cols = s.shape
    if s.stride() == (1, max(rows, 1)):
        return s
    return torch.empty_strided((rows, cols), (1, max(rows, 1)), dtype=s.dtype, device=s.device).copy_(s)


def _prepare_v2(a, a_s, b, b_s, out_dtype, rowwise, pad):
    kind = F.ScalingType
    if rowwise:
        sb, recipe_b = _m_major(b_s), kind.BlockWise1x128
    else:
        kb = b_s.shape[1]
        if pad and kb % 4:
            padded = b_s.new_zeros(b_s.shape[0], -(-kb // 4) * 4)
            padded[:, :kb] = b_s
        else:  # already the layout torch wants (K = 7168 has 56 blocks): no copy per call
            padded = b_s.contiguous()
        sb, recipe_b = padded.t(), kind.BlockWise128x128
    sa, bt = _m_major(a_s), b.t()
    return lambda: F.scaled_mm(a, bt, sa, kind.BlockWise1x128, sb, recipe_b, output_dtype=out_dtype)


def _prepare_v1(a, a_s, b, b_s, out_dtype, rowwise):
    sa, sb, bt = _m_major(a_s), (b_s.t().contiguous() if rowwise else b_s.t()), b.t()
    return lambda: torch._scaled_mm(a, bt, sa, sb, out_dtype=out_dtype)


def _conventions():
    calls = []
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        calls += [("scaled_mm, scale rows padded to 4", functools.partial(_prepare_v2, pad=True)),
                  ("scaled_mm", functools.partial(_prepare_v2, pad=False))]
    if hasattr(torch, "_scaled_mm"):
        calls.append(("_scaled_mm", _prepare_v1))
    return calls


@functools.cache
def _probe(device_index: int, rowwise: bool, out_dtype: torch.dtype):
    """(name, prepare) of the first convention this build runs correctly, or (None, the errors)."""
    from dualflow.fp8.gemm import fp8_gemm
    from dualflow.fp8.quant import quantize_1x128, quantize_128x128

    device = torch.device("cuda", device_index)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(128, 384, device=device, generator=gen)  # K/128 = 3: padding matters
    w = torch.randn(256, 384, device=device, generator=gen)
    a, a_s = quantize_1x128(x, backend="reference")
    b, b_s = (quantize_1x128 if rowwise else quantize_128x128)(w, backend="reference")
    want = fp8_gemm(a, a_s, b, b_s, torch.float32, backend="reference").double()
    errors = []
    for name, prepare in _conventions():
        try:
            got = prepare(a, a_s, b, b_s, out_dtype, rowwise)().double()
        except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
            errors.append(f"{name}: {str(exc).splitlines()[0]}")
            continue
        diff = 1 - 2 * (got * want).sum() / (got * got + want * want).sum()
        if float(diff) < 1e-3:
            return name, prepare
        errors.append(f"{name}: ran but disagrees with the reference (difference {float(diff):.3g})")
    return None, "; ".join(errors) or f"torch {torch.__version__} has neither F.scaled_mm nor torch._scaled_mm"


def unavailable_reason(device: torch.device, rowwise: bool = False,
                       out_dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None when torch's block-scaled matmul runs on ``device``; otherwise why not."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _unavailable_reason(device, rowwise, out_dtype)


@functools.lru_cache(maxsize=64)
def _unavailable_reason(device: torch.device, rowwise: bool, out_dtype: torch.dtype) -> str | None:
    # asked on every GEMM call; the answer for a device never changes within a process
    if device.type != "cuda":
        return (f"torch's block-scaled matmul needs a CUDA sm90 GPU with cuBLASLt >= 12.9; tensors are on "
                f"{device.type}, where torch {torch.__version__} accepts only tensor-wise and row-wise scales")
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"torch's block-scaled matmul runs on sm90 only; this GPU is sm{major}{minor}"
    name, detail = _probe(device.index, rowwise, out_dtype)
    return None if name is not None else f"torch {torch.__version__} rejected every scale layout tried ({detail})"


def prepare(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype,
            rowwise: bool) -> Callable[[], torch.Tensor]:
    """Convert the scales to torch's layouts once; the returned call runs ``a @ b.T`` in torch's matmul.

    Raises :class:`~dualflow.fp8.gemm.BackendUnavailable` where torch cannot run it.
    """
    from dualflow.fp8.gemm import BackendUnavailable

    why = unavailable_reason(a.device, rowwise, out_dtype)
    if why is not None:
        raise BackendUnavailable(why)
    k, n = a.shape[1], b.shape[0]
    if k % 16 or n % 16:
        raise BackendUnavailable(f"torch's scaled matmul needs K and N to be multiples of 16, got K={k}, N={n}; "
                                 "use the triton or reference backend for this shape")
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    _, make = _probe(index, rowwise, out_dtype)
    m = a.shape[0]
    if m % 4 == 0:
        return make(a.contiguous(), a_s, b.contiguous(), b_s, out_dtype, rowwise)
    # cuBLASLt (12.9-13.0, H100) answers NOT_SUPPORTED for a row count that is not a multiple of 4 (the
    # M-major scale rows must be 16-byte aligned); expert GEMMs see any count, so pad with zero rows
    # (zero data, zero scales) and return the first M rows of the result: a copy of A instead of the
    # slower backends
    pad = -m % 4
    a4 = torch.cat([a, a.new_zeros(pad, a.shape[1])])
    s4 = torch.cat([a_s, a_s.new_zeros(pad, a_s.shape[1])])
    call = make(a4, s4, b.contiguous(), b_s, out_dtype, rowwise)
    return lambda: call()[:m]


def gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype,
         rowwise: bool) -> torch.Tensor:
    """``a @ b.T`` through torch's block-scaled matmul.

    A shape cuBLASLt has no block-scaled kernel for (it answers NOT_SUPPORTED from its heuristic query,
    which leaves the CUDA context usable) raises :class:`~dualflow.fp8.gemm.BackendUnavailable`, so that
    the next backend of the caller's list takes it.
    """
    from dualflow.fp8.gemm import BackendUnavailable

    call = prepare(a, a_s, b, b_s, out_dtype, rowwise)
    try:
        return call()
    except RuntimeError as exc:
        if "CUBLAS_STATUS_NOT_SUPPORTED" not in str(exc):
            raise
        (m, k), n = a.shape, b.shape[0]
        raise BackendUnavailable(f"cuBLASLt has no block-scaled kernel for M={m}, K={k}, N={n} "
                                 f"({'1x128' if rowwise else '128x128'} scales of b)") from exc
