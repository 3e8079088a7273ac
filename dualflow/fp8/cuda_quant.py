"""The activation quantizer of 16-bit inputs in the project's CUDA library (``csrc/quant.cu``): the 1x128
layout, the 128x1 layout (written transposed), or both from one read.

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


def launch(x: torch.Tensor, rowwise: bool, colwise: bool, pow2_scales: bool,
           m_major: bool) -> tuple[torch.Tensor | None, ...]:
    """:func:`quantize` without the check, for a caller that made it (the quantizer's dispatch, once per
    call)."""
    rows, cols = x.shape
    rb, cb = -(-rows // BLOCK), -(-cols // BLOCK)
    q = s = qt = st = None
    if rowwise:
        q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=x.device)
        s = empty_scales(rows, cb, x.device, m_major)
    if colwise:
        qt = torch.empty(cols, rows, dtype=FP8_DTYPE, device=x.device)
        st = empty_scales(cols, rb, x.device, m_major)
    if x.numel():
        lib = _library()
        stream = torch.cuda.current_stream(x.device).cuda_stream
        rc = lib.dualflow_quantize_act(
            x.data_ptr(), _DTYPES[x.dtype], rows, cols, x.stride(0) if rows > 1 else cols, rowwise | colwise << 1,
            *_layout_args(q, s), *_layout_args(qt, st), AMAX_FLOOR, int(pow2_scales), stream)
        if rc != 0:
            raise _cuda.CudaLibraryError(f"dualflow_quantize_act failed (status {rc}): "
                                         f"{lib.dualflow_last_error().decode(errors='replace')}")
    return q, s, qt, st
