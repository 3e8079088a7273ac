"""Triton SwiGLU fused with FP8 quantization (DeepSeek-V3: the activation feeding an FP8 GEMM is quantized
where it is computed, so it never travels to another kernel in BF16 for its 1x128 layout).

- forward: ``h [T, 2H]`` (gate | up) -> ``a = silu(gate) * up``;
- backward: ``h`` and ``da [T, H]`` -> ``dh = (da * up * silu'(gate) | da * silu(gate))``, ``[T, 2H]``.

Each kernel computes its value in FP32, rounds it to the input's dtype (the value a BF16 step would hold),
writes that and its 1x128 quantization in one pass over 32-row x 128-column tiles (few registers per
thread, so many tiles in flight); the 128x1 quantization is the quantization backend's column-wise
quantizer over the written value (Triton's, or the CUDA library's under ``cuda``). (One kernel producing
both layouts from a 128x128 tile held in registers ran at about 15-20% of the copy bandwidth on an H200:
the tiles spill.)
``silu(g) = g / (1 + exp(-g))``; the scales and rounding are the quantizer's own code.

Under the quantization backend ``cuda`` the CUDA library's kernel (``csrc/swiglu.cu``) replaces both
steps where it takes the shapes: it computes the value where it loads the operands and quantizes it in
both layouts from a 128x128 tile held in shared memory in 16 bits, so the value is never written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dualflow.fp8.kernels.quant import _abs_bits, _scale, _to_fp8
from dualflow.fp8.quant import BLOCK, FP8_DTYPE, run_quantizer

_ROWS = 32


@triton.jit
def _rowwise_store(v, rows64, cols64, in_r, in_c, pid_c, v_ptr, svr, q_ptr, sqr, s_ptr, ssr, POW2: tl.constexpr):
    mask = in_r[:, None] & in_c[None, :]
    v = v.to(v_ptr.dtype.element_ty)  # the value as the step holds it; both layouts quantize this
    tl.store(v_ptr + rows64[:, None] * svr + cols64[None, :], v, mask=mask)
    v = v.to(tl.float32)
    scale = _scale(tl.max(_abs_bits(v), axis=1), POW2)
    one = tl.full((v.shape[0],), 1.0, tl.float32)
    tl.store(q_ptr + rows64[:, None] * sqr + cols64[None, :], _to_fp8(v * tl.math.div_rn(one, scale)[:, None]),
             mask=mask)
    tl.store(s_ptr + rows64 * ssr + pid_c, scale, mask=in_r)


@triton.jit
def _swiglu_fwd_kernel(h_ptr, T, H, shr, v_ptr, svr, q_ptr, sqr, s_ptr, ssr, end_ptr,
                       HAS_END: tl.constexpr, POW2: tl.constexpr, ROWS: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    if HAS_END:  # rows from end on are not computed (their outputs stay undefined)
        T = tl.minimum(T, tl.load(end_ptr).to(tl.int32))
        if pid_r * ROWS >= T:
            return
    rows = pid_r * ROWS + tl.arange(0, ROWS)
    cols = pid_c * 128 + tl.arange(0, 128)
    in_r, in_c = rows < T, cols < H
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    mask = in_r[:, None] & in_c[None, :]
    base = h_ptr + rows64[:, None] * shr + cols64[None, :]
    gate = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(base + H, mask=mask, other=0.0).to(tl.float32)
    a = gate / (1.0 + tl.exp(-gate)) * up
    _rowwise_store(a, rows64, cols64, in_r, in_c, pid_c, v_ptr, svr, q_ptr, sqr, s_ptr, ssr, POW2)


@triton.jit
def _swiglu_bwd_kernel(h_ptr, da_ptr, T, H, shr, sdar, v_ptr, svr, q_ptr, sqr, s_ptr, ssr, end_ptr,
                       HAS_END: tl.constexpr, POW2: tl.constexpr, ROWS: tl.constexpr):
    # programs [0, H/128) write the gate half of dh, [H/128, 2H/128) the up half
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    if HAS_END:
        T = tl.minimum(T, tl.load(end_ptr).to(tl.int32))
        if pid_r * ROWS >= T:
            return
    half_blocks = H // 128
    up_half = pid_c >= half_blocks
    cb = tl.where(up_half, pid_c - half_blocks, pid_c)
    rows = pid_r * ROWS + tl.arange(0, ROWS)
    cols = cb * 128 + tl.arange(0, 128)
    in_r, in_c = rows < T, cols < H
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    mask = in_r[:, None] & in_c[None, :]
    base = h_ptr + rows64[:, None] * shr + cols64[None, :]
    gate = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + rows64[:, None] * sdar + cols64[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    if up_half:
        d = da * (gate * sig)
    else:
        up = tl.load(base + H, mask=mask, other=0.0).to(tl.float32)
        d = da * up * (sig * (1.0 + gate * (1.0 - sig)))
    out_cols64 = cols64 + tl.where(up_half, H, 0).to(tl.int64)
    _rowwise_store(d, rows64, out_cols64, in_r, in_c, pid_c, v_ptr, svr, q_ptr, sqr, s_ptr, ssr, POW2)


def _rowwise_outputs(rows: int, cols: int, dtype: torch.dtype, device: torch.device):
    v = torch.empty(rows, cols, dtype=dtype, device=device)
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=device)
    s = torch.empty(rows, triton.cdiv(cols, BLOCK), dtype=torch.float32, device=device)
    return v, q, s


def _columnwise(v: torch.Tensor, pow2_scales: bool, quant_backend: str):
    # the 128x1 layout through the quantization backend's dispatch: the CUDA library's kernel under `cuda`
    # (faster than Triton's column quantizer: benchmarks/NOTES_gpu.md row 30), Triton's otherwise
    _, _, qt, st = run_quantizer(v, False, True, False, pow2_scales, quant_backend)
    return qt, st


def _on_the_library(h: torch.Tensor, da: torch.Tensor | None, end: torch.Tensor | None, pow2_scales: bool,
                    quant_backend: str):
    # under the `cuda` backend (the library is there: the backend resolved to it) the library's kernel
    # computes both layouts in one pass where it takes the shapes: its (q, s, qt, st); None otherwise
    if quant_backend != "cuda" or h.device.type != "cuda":
        return None
    from dualflow.fp8.cuda_quant import launch_swiglu, swiglu_why_not

    return launch_swiglu(h, da, end, pow2_scales) if swiglu_why_not(h, da) is None else None


def swiglu_forward(h: torch.Tensor, pow2_scales: bool, end: torch.Tensor | None = None,
                   quant_backend: str = "triton"):
    """``(q, s, qt, st)`` of ``silu(gate) * up`` for ``h = [gate | up]``; with ``end`` (a device scalar), rows
    from ``end`` on are skipped and their outputs are undefined. ``quant_backend`` (a quantization backend
    name, as :func:`dualflow.fp8.quant.run_quantizer` takes it) quantizes the 128x1 layout; under ``cuda``
    the CUDA library's fused kernel (:func:`dualflow.fp8.cuda_quant.swiglu_quantize`) writes both layouts
    where it takes the shapes."""
    done = _on_the_library(h, None, end, pow2_scales, quant_backend)
    if done is not None:
        return done
    t, two_h = h.shape
    hidden = two_h // 2
    v, q, s = _rowwise_outputs(t, hidden, h.dtype, h.device)
    if t and hidden:
        _swiglu_fwd_kernel[(triton.cdiv(t, _ROWS), triton.cdiv(hidden, 128))](
            h, t, hidden, h.stride(0), v, v.stride(0), q, q.stride(0), s, s.stride(0),
            end if end is not None else s, HAS_END=end is not None, POW2=pow2_scales, ROWS=_ROWS, num_warps=4)
    return (q, s, *_columnwise(v, pow2_scales, quant_backend))


def swiglu_backward(h: torch.Tensor, da: torch.Tensor, pow2_scales: bool, end: torch.Tensor | None = None,
                    quant_backend: str = "triton"):
    """``(q, s, qt, st)`` of ``dh`` (``[T, 2H]``) from ``h`` and ``da``; ``H % 128 == 0``; ``end`` and
    ``quant_backend`` as above."""
    done = _on_the_library(h, da, end, pow2_scales, quant_backend)
    if done is not None:
        return done
    t, two_h = h.shape
    hidden = two_h // 2
    v, q, s = _rowwise_outputs(t, two_h, h.dtype, h.device)
    if t and hidden:
        _swiglu_bwd_kernel[(triton.cdiv(t, _ROWS), 2 * (hidden // 128))](
            h, da, t, hidden, h.stride(0), da.stride(0), v, v.stride(0), q, q.stride(0), s, s.stride(0),
            end if end is not None else s, HAS_END=end is not None, POW2=pow2_scales, ROWS=_ROWS, num_warps=4)
    return (q, s, *_columnwise(v, pow2_scales, quant_backend))
