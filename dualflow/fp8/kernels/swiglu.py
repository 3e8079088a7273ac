"""Triton SwiGLU fused with FP8 quantization (DeepSeek-V3: the activation feeding an FP8 GEMM is quantized
where it is computed, so it never travels in BF16).

- forward: ``h [T, 2H]`` (gate | up) -> ``a = silu(gate) * up`` quantized 1x128 (the down projection's
  input) and 128x1 (its weight gradient), one program per 128x128 tile of ``a``;
- backward: ``h`` and ``da [T, H]`` -> ``dh = (da * up * silu'(gate) | da * silu(gate))`` quantized 1x128
  and 128x1 (the gate/up projection's input gradient and weight gradient); needs ``H % 128 == 0`` so
  that each 128-column tile of ``dh`` lies in one half.

Arithmetic in FP32; ``silu(g) = g / (1 + exp(-g))``. The quantization is the one of
:mod:`dualflow.fp8.kernels.quant` (same scale and rounding code).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dualflow.fp8.kernels.quant import _scale, _to_fp8
from dualflow.fp8.quant import BLOCK, FP8_DTYPE


@triton.jit
def _quantize_tile(v, rows64, cols64, in_r, in_c, pid_r, pid_c, q_ptr, s_ptr, sqr, ssr, qt_ptr, st_ptr, sqtr,
                   sstr, POW2: tl.constexpr):
    # v: a [128, 128] FP32 tile (zero outside the tensor); both layouts written
    ax = tl.abs(v)
    nan = (v != v).to(tl.int32)
    one = tl.full((128,), 1.0, tl.float32)
    mask = in_r[:, None] & in_c[None, :]
    scale = _scale(tl.max(ax, axis=1), tl.max(nan, axis=1) > 0, POW2)
    tl.store(q_ptr + rows64[:, None] * sqr + cols64[None, :], _to_fp8(v * tl.math.div_rn(one, scale)[:, None]),
             mask=mask)
    tl.store(s_ptr + rows64 * ssr + pid_c, scale, mask=in_r)
    scale_t = _scale(tl.max(ax, axis=0), tl.max(nan, axis=0) > 0, POW2)
    qt = _to_fp8(v * tl.math.div_rn(one, scale_t)[None, :])
    tl.store(qt_ptr + cols64[:, None] * sqtr + rows64[None, :], tl.trans(qt), mask=in_c[:, None] & in_r[None, :])
    tl.store(st_ptr + cols64 * sstr + pid_r, scale_t, mask=in_c)


@triton.jit
def _swiglu_fwd_kernel(h_ptr, T, H, shr, q_ptr, s_ptr, qt_ptr, st_ptr, sqr, ssr, sqtr, sstr, end_ptr,
                       HAS_END: tl.constexpr, POW2: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    if HAS_END:  # rows from end on are not computed (their outputs stay undefined)
        T = tl.minimum(T, tl.load(end_ptr).to(tl.int32))
        if pid_r * 128 >= T:
            return
    rows = pid_r * 128 + tl.arange(0, 128)
    cols = pid_c * 128 + tl.arange(0, 128)
    in_r, in_c = rows < T, cols < H
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    mask = in_r[:, None] & in_c[None, :]
    base = h_ptr + rows64[:, None] * shr + cols64[None, :]
    gate = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(base + H, mask=mask, other=0.0).to(tl.float32)
    a = gate / (1.0 + tl.exp(-gate)) * up
    _quantize_tile(a, rows64, cols64, in_r, in_c, pid_r, pid_c, q_ptr, s_ptr, sqr, ssr, qt_ptr, st_ptr, sqtr, sstr,
                   POW2)


@triton.jit
def _swiglu_bwd_kernel(h_ptr, da_ptr, T, H, shr, sdar, q_ptr, s_ptr, qt_ptr, st_ptr, sqr, ssr, sqtr, sstr, end_ptr,
                       HAS_END: tl.constexpr, POW2: tl.constexpr):
    # programs [0, H/128) write the gate half of dh, [H/128, 2H/128) the up half
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    if HAS_END:
        T = tl.minimum(T, tl.load(end_ptr).to(tl.int32))
        if pid_r * 128 >= T:
            return
    half_blocks = H // 128
    up_half = pid_c >= half_blocks
    cb = tl.where(up_half, pid_c - half_blocks, pid_c)
    rows = pid_r * 128 + tl.arange(0, 128)
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
    _quantize_tile(d, rows64, out_cols64, in_r, in_c, pid_r, pid_c, q_ptr, s_ptr, sqr, ssr, qt_ptr, st_ptr, sqtr,
                   sstr, POW2)


def _outputs(rows: int, cols: int, device: torch.device):
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=device)
    s = torch.empty(rows, triton.cdiv(cols, BLOCK), dtype=torch.float32, device=device)
    qt = torch.empty(cols, rows, dtype=FP8_DTYPE, device=device)
    st = torch.empty(cols, triton.cdiv(rows, BLOCK), dtype=torch.float32, device=device)
    return q, s, qt, st


def swiglu_forward(h: torch.Tensor, pow2_scales: bool, end: torch.Tensor | None = None):
    """``(q, s, qt, st)`` of ``silu(gate) * up`` for ``h = [gate | up]``; with ``end`` (a device scalar), rows
    from ``end`` on are skipped and left undefined."""
    t, two_h = h.shape
    hidden = two_h // 2
    q, s, qt, st = _outputs(t, hidden, h.device)
    if t and hidden:
        _swiglu_fwd_kernel[(triton.cdiv(t, 128), triton.cdiv(hidden, 128))](
            h, t, hidden, h.stride(0), q, s, qt, st, q.stride(0), s.stride(0), qt.stride(0), st.stride(0),
            end if end is not None else s, HAS_END=end is not None, POW2=pow2_scales, num_warps=8)
    return q, s, qt, st


def swiglu_backward(h: torch.Tensor, da: torch.Tensor, pow2_scales: bool, end: torch.Tensor | None = None):
    """``(q, s, qt, st)`` of ``dh`` (``[T, 2H]``) from ``h`` and ``da``; ``H % 128 == 0``; ``end`` as above."""
    t, two_h = h.shape
    hidden = two_h // 2
    q, s, qt, st = _outputs(t, two_h, h.device)
    if t and hidden:
        _swiglu_bwd_kernel[(triton.cdiv(t, 128), 2 * (hidden // 128))](
            h, da, t, hidden, h.stride(0), da.stride(0), q, s, qt, st, q.stride(0), s.stride(0), qt.stride(0),
            st.stride(0), end if end is not None else s, HAS_END=end is not None, POW2=pow2_scales, num_warps=8)
    return q, s, qt, st
