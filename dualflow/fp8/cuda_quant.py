"""The activation quantizer of 16-bit inputs in the project's CUDA library (``csrc/quant.cu``): the 1x128
layout, the 128x1 layout (written transposed), or both from one read; and SwiGLU and its backward fused
with both layouts' quantization of their results (``csrc/swiglu.cu``, :func:`swiglu_quantize`).

The quantization backend ``cuda`` (:func:`dualflow.fp8.quant.resolve_quant_backend`) takes this kernel for
the layouts and inputs it covers (:func:`why_not`: the activation layouts, BF16 or FP16, sizes and row
stride multiples of 4) and Triton's kernels for everything else (weights' 128x128 blocks, FP32 input).
It holds its 128x128 tile in shared memory in the input's 16-bit type instead of FP32 registers, so more
tiles are in flight per SM than in the Triton kernel, and gives each scale's divisions to one lane
(benchmarks/NOTES_gpu.md rows 25-28). Same bits as the reference.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from dualflow import _cuda
from dualflow.fp8 import triton_support
from dualflow.fp8.quant import AMAX_FLOOR, BLOCK, FP8_DTYPE, empty_scales

_DTYPES = {torch.bfloat16: 0, torch.float16: 1}


@functools.cache
def _library() -> ctypes.CDLL:
    lib = _cuda.load()
    c, i64, ptr = ctypes, ctypes.c_int64, ctypes.c_size_t
    lib.dualflow_quantize_act.argtypes = [ptr, c.c_int, i64, i64, i64, c.c_int, ptr, ptr, i64, i64, ptr, ptr, i64,
                                          i64, c.c_float, c.c_int, ptr]
    lib.dualflow_swiglu_quantize.argtypes = [ptr, c.c_int, i64, i64, i64, ptr, i64, ptr, c.c_int, ptr, ptr, i64, i64,
                                             ptr, ptr, i64, i64, c.c_float, c.c_int, ptr]
    return lib


@functools.cache
def _library_problem() -> str | None:
    # once per process, failure included: `auto` asks at every resolution, and a missing library would
    # otherwise be looked for again each time
    try:
        _library()
    except _cuda.CudaLibraryError as exc:
        return str(exc).splitlines()[0]
    return None


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the kernel cannot run on ``device`` (None: it can): the library, or a device before sm_89."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"it runs on CUDA devices, not {device.type}"
    problem = _library_problem()
    if problem is not None:
        return problem
    major, minor = triton_support.device_capability(device)  # the one capability query (tests replace it)
    if (major, minor) < (8, 9):
        return f"FP8 conversion needs compute capability 8.9 or later, this device has {major}.{minor}"
    return None


def why_not(x: torch.Tensor, rowwise: bool, colwise: bool, blockwise: bool) -> str | None:
    """Why the kernel does not cover this quantization (None: it does). The device is checked apart."""
    if blockwise or not (rowwise or colwise):
        return "it writes the activation layouts (1x128, 128x1 or both), not 128x128 blocks"
    if x.dtype not in _DTYPES:
        return f"it reads bfloat16 or float16, not {x.dtype}"
    rows, cols = x.shape
    bad_stride = rows > 1 and (x.stride(0) % 4 or x.stride(0) < cols)
    if rows % 4 or cols % 4 or bad_stride or (cols > 1 and x.stride(1) != 1):
        return f"rows, columns and the row stride must be multiples of 4 with unit column stride: {tuple(x.shape)} " \
               f"with strides {x.stride()}"
    if x.data_ptr() % 8:
        return "its input must be 8-byte aligned"
    return None


def quantize(x: torch.Tensor, *, rowwise: bool, colwise: bool, pow2_scales: bool = False,
             m_major: bool = False) -> tuple[torch.Tensor | None, ...]:
    """``(q, scales, qt, scales_t)`` as :func:`dualflow.fp8.kernels.quant.quantize` writes them for these
    layouts (``None`` for a layout not asked for; ``m_major``: the 1x128 scales with strides ``(1, rows)``).
    ``x`` must pass :func:`why_not`."""
    reason = why_not(x, rowwise, colwise, False)
    if reason is not None:
        raise ValueError(f"the CUDA quantizer does not take this input: {reason}")
    return launch(x, rowwise, colwise, pow2_scales, m_major)


def _layout_args(q: torch.Tensor | None, s: torch.Tensor | None) -> tuple[int, int, int, int]:
    # one layout's outputs as the C ABI takes them: pointers and the scales' strides (zeros: not asked for)
    return (q.data_ptr(), s.data_ptr(), *s.stride()) if q is not None else (0, 0, 0, 0)


def _outputs(rows: int, cols: int, rowwise: bool, colwise: bool, m_major: bool,
             device: torch.device) -> tuple[torch.Tensor | None, ...]:
    # (q, s, qt, st) of a [rows, cols] result, None for a layout not asked for
    q = s = qt = st = None
    if rowwise:
        q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=device)
        s = empty_scales(rows, -(-cols // BLOCK), device, m_major)
    if colwise:
        qt = torch.empty(cols, rows, dtype=FP8_DTYPE, device=device)
        st = empty_scales(cols, -(-rows // BLOCK), device, m_major)
    return q, s, qt, st


def _check(lib: ctypes.CDLL, name: str, rc: int) -> None:
    if rc != 0:
        message = lib.dualflow_last_error().decode(errors="replace")
        raise _cuda.CudaLibraryError(f"{name} failed (status {rc}): {message}")


def launch(x: torch.Tensor, rowwise: bool, colwise: bool, pow2_scales: bool,
           m_major: bool) -> tuple[torch.Tensor | None, ...]:
    """:func:`quantize` without the check, for a caller that made it (the quantizer's dispatch, once per
    call)."""
    rows, cols = x.shape
    q, s, qt, st = _outputs(rows, cols, rowwise, colwise, m_major, x.device)
    if x.numel():
        lib = _library()
        stream = torch.cuda.current_stream(x.device).cuda_stream
        _check(lib, "dualflow_quantize_act", lib.dualflow_quantize_act(
            x.data_ptr(), _DTYPES[x.dtype], rows, cols, x.stride(0) if rows > 1 else cols, rowwise | colwise << 1,
            *_layout_args(q, s), *_layout_args(qt, st), AMAX_FLOOR, int(pow2_scales), stream))
    return q, s, qt, st


def swiglu_why_not(h: torch.Tensor, da: torch.Tensor | None = None) -> str | None:
    """Why :func:`swiglu_quantize` does not take ``h`` (and, for the backward, ``da``); None: it does. The
    device is checked apart (:func:`unavailable_reason`)."""
    if h.dim() != 2 or h.dtype not in _DTYPES:
        return f"it reads a 2-D bfloat16 or float16 h, not {h.dtype} of shape {tuple(h.shape)}"
    rows, two_h = h.shape
    hidden = two_h // 2
    if rows % 4 or two_h % 8 or h.stride(1) != 1 or h.stride(0) % 4 or h.data_ptr() % 8:
        return f"rows and hidden must be multiples of 4, h 8-byte aligned with unit column stride and a row stride " \
               f"that is a multiple of 4: {tuple(h.shape)} with strides {h.stride()}"
    if da is not None:
        if da.dtype != h.dtype or da.shape != (rows, hidden) or da.stride(1) != 1 or da.stride(0) % 4 \
                or da.data_ptr() % 8:
            return f"da must be {h.dtype} [{rows}, {hidden}], 8-byte aligned, unit column stride and a row stride " \
                   f"that is a multiple of 4; got {da.dtype} {tuple(da.shape)} with strides {da.stride()}"
        if hidden % BLOCK:
            return f"the backward needs hidden a multiple of {BLOCK}, got {hidden}"
    return None


def swiglu_quantize(h: torch.Tensor, da: torch.Tensor | None, end: torch.Tensor | None,
                    pow2_scales: bool) -> tuple[torch.Tensor, ...]:
    """``(q, s, qt, st)``: ``silu(gate) * up`` of ``h = [gate | up]`` (``da`` None) or its gradient ``dh``
    from ``da`` (``[T, 2H]``), computed as :mod:`dualflow.fp8.moe`'s reference does, rounded to ``h``'s dtype
    and quantized 1x128 and 128x1 in one pass (the layouts :func:`quantize` writes). ``end`` (a device
    int32/int64 scalar, read on the device): the 128-row tiles from it on are skipped, their outputs left
    undefined. ``h`` (and ``da``) must pass :func:`swiglu_why_not`."""
    reason = swiglu_why_not(h, da)
    if reason is not None:
        raise ValueError(f"the CUDA SwiGLU quantizer does not take this input: {reason}")
    if end is not None and (end.dtype not in (torch.int32, torch.int64) or end.numel() != 1
                            or end.device != h.device):
        raise ValueError(f"end must be one int32/int64 on {h.device}, got {end.dtype} {tuple(end.shape)} on "
                         f"{end.device}")
    return launch_swiglu(h, da, end, pow2_scales)


def launch_swiglu(h: torch.Tensor, da: torch.Tensor | None, end: torch.Tensor | None,
                  pow2_scales: bool) -> tuple[torch.Tensor, ...]:
    """:func:`swiglu_quantize` without its checks, for a caller that made them (the SwiGLU dispatch)."""
    rows, two_h = h.shape
    hidden = two_h // 2
    q, s, qt, st = _outputs(rows, hidden if da is None else two_h, True, True, False, h.device)
    if h.numel():
        lib = _library()
        stream = torch.cuda.current_stream(h.device).cuda_stream
        _check(lib, "dualflow_swiglu_quantize", lib.dualflow_swiglu_quantize(
            h.data_ptr(), _DTYPES[h.dtype], rows, hidden, h.stride(0) if rows > 1 else two_h,
            0 if da is None else da.data_ptr(), 0 if da is None else (da.stride(0) if rows > 1 else hidden),
            0 if end is None else end.data_ptr(), 0 if end is None else end.element_size(),
            *_layout_args(q, s), *_layout_args(qt, st), AMAX_FLOOR, int(pow2_scales), stream))
    return q, s, qt, st
