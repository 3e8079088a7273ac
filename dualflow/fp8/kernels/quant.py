"""Triton quantization kernel: one program per 128x128 tile of ``x``, every layout from one read (the
transposed 128x128 copy reads its tile a second time, from cache: see the kernel).

Bit-exact with :mod:`dualflow.fp8.quant`'s reference: the amax is a max (order-free), the divisions are
correctly rounded (``div_rn``, not the approximate ``/``), ``x * (1 / scale)`` is a single multiply (nothing
to contract into an FMA), and the cast saturates and keeps NaN as the reference's clamp does.

The kernel is limited by instructions, not bandwidth, so each element gets as few as the layout allows:
- the amax is an integer max over the bit patterns of ``|x|``. Non-negative floats order like their bit
  patterns and every NaN pattern lies above Inf's, so that max propagates NaN in one instruction per
  element, where the GPU's float max drops NaN and needed a second reduction to put it back;
- the cast is the only clamp: Triton lowers it to ``cvt.rn.satfinite`` (round to nearest even, finite
  values and Inf saturate to +-448, NaN stays NaN), exactly the reference's clamp-then-cast. The CPU
  tests give the interpreter the same conversion (tests/triton_fp8.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dualflow.fp8.quant import AMAX_FLOOR, BLOCK, FP8_DTYPE, FP8_MAX, check_transposed_groups, empty_scales

_FLOOR_BITS = tl.constexpr(int(torch.tensor(AMAX_FLOOR, dtype=torch.float32).view(torch.int32)))
_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _abs_bits(x):
    """Bit patterns of ``|x|`` (fp32) as int32: their integer order is the float order, NaN above Inf."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _scale(amax_bits, POW2: tl.constexpr):
    """The scale ``max(amax, floor) / 448`` (NaN if the group holds one) from :func:`_abs_bits`' max."""
    amax = tl.maximum(amax_bits, _FLOOR_BITS).to(tl.float32, bitcast=True)
    scale = tl.math.div_rn(amax, _MAX)
    if POW2:
        bits = scale.to(tl.int32, bitcast=True)
        exponent = bits & 0x7F800000
        inexact = ((bits & 0x7FFFFF) != 0) & (exponent != 0x7F800000)
        scale = tl.where(inexact, exponent + 0x800000, bits).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _to_fp8(y):
    return y.to(tl.float8e4nv)  # cvt.rn.satfinite: the saturation is the clamp (module docstring)


@triton.jit
def _quant_kernel(x_ptr, R, C, sxr, sxc,
                  q_ptr, s_ptr, sqr, ssr, ssc,
                  qt_ptr, st_ptr, sqtr, sstr, sstc,
                  GROUP_ROWS,
                  ROWWISE: tl.constexpr, COLWISE: tl.constexpr, BLOCKWISE: tl.constexpr, POW2: tl.constexpr,
                  TILE_R: tl.constexpr, TILE_C: tl.constexpr, BLOCK_T: tl.constexpr):
    # A program covers TILE_R x TILE_C of x. Every scale group must lie inside one program: 1x128 needs
    # TILE_C == 128, 128x1 needs TILE_R == 128 (its columns may be split), 128x128 both.
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * TILE_R + tl.arange(0, TILE_R)
    cols = pid_c * TILE_C + tl.arange(0, TILE_C)
    in_r = rows < R
    in_c = cols < C
    mask = in_r[:, None] & in_c[None, :]
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * sxr + cols64[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    ab = _abs_bits(x)
    one_r = tl.full((TILE_R,), 1.0, tl.float32)
    one_c = tl.full((TILE_C,), 1.0, tl.float32)
    if ROWWISE:  # 1x128: one scale per row of the tile
        scale = _scale(tl.max(ab, axis=1), POW2)
        q = _to_fp8(x * tl.math.div_rn(one_r, scale)[:, None])
        tl.store(q_ptr + rows64[:, None] * sqr + cols64[None, :], q, mask=mask)
        tl.store(s_ptr + rows64 * ssr + pid_c * ssc, scale, mask=in_r)
    if COLWISE:  # 128x1: one scale per column, written transposed ([C, R])
        scale = _scale(tl.max(ab, axis=0), POW2)
        q = _to_fp8(x * tl.math.div_rn(one_c, scale)[None, :])
        mask_t = in_c[:, None] & in_r[None, :]
        tl.store(qt_ptr + cols64[:, None] * sqtr + rows64[None, :], tl.trans(q), mask=mask_t)
        tl.store(st_ptr + cols64 * sstr + pid_r * sstc, scale, mask=in_c)
    if BLOCKWISE:  # 128x128: one scale for the tile
        scale = _scale(tl.max(tl.max(ab, axis=1), axis=0), POW2)
        q = _to_fp8(x * tl.math.div_rn(1.0, scale))
        tl.store(q_ptr + rows64[:, None] * sqr + cols64[None, :], q, mask=mask)
        tl.store(s_ptr + pid_r * ssr + pid_c * ssc, scale)
        if BLOCK_T:  # and each group's transpose: rows [g*GROUP_ROWS, (g+1)*GROUP_ROWS) -> qt[g*C:(g+1)*C]
            group = (pid_r * TILE_R) // GROUP_ROWS
            in_group = rows64 - group.to(tl.int64) * GROUP_ROWS
            qt_rows = group.to(tl.int64) * C + cols64
            # the transposed tile is re-loaded (from cache) and scaled again, not tl.trans(q): on an H200,
            # Triton 3.6 stored tl.trans(q) of FP32 input wrongly at sizes it hints as divisible by 16
            # (every weight of the training step); without the hints it was right but 3.4x slower (byte
            # stores), and the re-load costs ~1% (benchmarks/NOTES_gpu.md rows 18 and 20)
            xt = tl.load(x_ptr + cols64[:, None] * sxc + rows64[None, :] * sxr, mask=in_c[:, None] & in_r[None, :],
                         other=0.0).to(tl.float32)
            tl.store(qt_ptr + qt_rows[:, None] * GROUP_ROWS + in_group[None, :],
                     _to_fp8(xt * tl.math.div_rn(1.0, scale)), mask=in_c[:, None] & in_r[None, :])
            group_blocks = tl.cdiv(GROUP_ROWS, TILE_R)
            tl.store(st_ptr + (group * tl.cdiv(C, TILE_C) + pid_c) * group_blocks + pid_r - group * group_blocks,
                     scale)


def _describe(t: torch.Tensor, device: torch.device) -> str:
    return f"{t.dtype} {tuple(t.shape)} with strides {t.stride()} on {device}"


def launch_settings(rowwise: bool, colwise: bool) -> tuple[int, int, int]:
    """(rows per program, columns per program, warps) measured fastest on an H100 (``fp8_quant.py --sweep``,
    RESULTS.md).

    The 128x1 layout alone runs narrow programs with few warps (64 columns, 2 warps: 87% of the copy
    bandwidth, against 46% for 128 columns and 8 warps, which hold 128 registers per thread at 25%
    occupancy); the fused layouts need whole 128x128 tiles and run best with 4 warps (55% of the copy;
    the tile's 128 registers per thread cap the occupancy at 12-25%; a variant holding only 64-column
    slices and re-reading them from L2 for the 1x128 pass measured slower, 45%).
    """
    if colwise and not rowwise:
        return BLOCK, 64, 2
    if colwise:
        return BLOCK, BLOCK, 4
    return BLOCK, BLOCK, 8


def quantize(x: torch.Tensor, *, rowwise: bool, colwise: bool, blockwise: bool, pow2_scales: bool,
             tile_r: int | None = None, tile_c: int | None = None, num_warps: int | None = None,
             m_major: bool = False, transposed_groups: int | None = None,
             out: tuple[torch.Tensor | None, ...] | None = None) -> tuple[torch.Tensor | None, ...]:
    """Launch the kernel; returns ``(q, scales, qt, scales_t)`` with ``None`` for layouts not asked for.

    ``transposed_groups`` (128x128 layout only) also writes the transposed quantization of each of that
    many equal groups of rows: ``qt [G*C, R/G]`` with ``qt[g*C + c, i] = q[g*R/G + i, c]`` and ``scales_t
    [G*ceil(C/128), ceil(R/G/128)]`` likewise (the 128x128 blocks of ``W.T`` are those of ``W``
    transposed: the input gradient's operand, written by the same pass). ``R/G`` must be a multiple of 128
    when ``G > 1``. ``out``: the four outputs' storage, written in place (``None`` for a layout not asked
    for; shapes, dtypes and strides as this function would allocate them).

    ``tile_r`` and ``tile_c`` (rows and columns per program: 128 unless the 1x128 layout is alone, which
    takes any power of two of rows, or the 128x1 layout is alone, which takes any power of two of columns)
    and ``num_warps`` default to :func:`launch_settings`. ``m_major`` writes the 1x128 scales (``scales``
    of the rowwise layout and ``scales_t``) with strides ``(1, rows)`` instead of row-major: the layout
    torch's block-scaled matmul reads, which saves a copy kernel per GEMM operand
    (:func:`dualflow.fp8.quant.empty_scales`).
    """
    if transposed_groups is not None:
        if not blockwise or rowwise or colwise:
            raise ValueError("transposed_groups goes with the 128x128 layout alone")
        check_transposed_groups(x.shape[0], transposed_groups)
    default_r, default_c, default_warps = launch_settings(rowwise or blockwise, colwise)
    tile_r, tile_c, num_warps = tile_r or default_r, tile_c or default_c, num_warps or default_warps
    if tile_c != BLOCK and (rowwise or blockwise):
        raise ValueError(f"tile_c={tile_c}: the 1x128 and 128x128 layouts need 128 columns per program")
    if tile_r != BLOCK and (colwise or blockwise):
        raise ValueError(f"tile_r={tile_r}: the 128x1 and 128x128 layouts need 128 rows per program")
    rows, cols = x.shape
    rb, cb = triton.cdiv(rows, BLOCK), triton.cdiv(cols, BLOCK)
    # with `out` the outputs are only described (meta tensors: shapes and strides, no memory) to check it
    device = torch.device("meta") if out is not None else x.device
    q = s = qt = st = None
    if rowwise or blockwise:
        q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=device)
        s = empty_scales(rb if blockwise else rows, cb, device, m_major and not blockwise)
    if colwise:
        qt = torch.empty(cols, rows, dtype=FP8_DTYPE, device=device)
        st = empty_scales(cols, rb, device, m_major)
    group_rows = rows
    if transposed_groups is not None:
        group_rows = rows // transposed_groups
        qt = torch.empty(transposed_groups * cols, group_rows, dtype=FP8_DTYPE, device=device)
        st = empty_scales(transposed_groups * cb, triton.cdiv(group_rows, BLOCK), device)
    if out is not None:
        for name, mine, given in zip(("q", "scales", "qt", "scales_t"), (q, s, qt, st), out):
            if (mine is None) != (given is None) or (mine is not None and (
                    given.shape != mine.shape or given.dtype != mine.dtype or given.stride() != mine.stride()
                    or given.device != x.device)):
                raise ValueError(f"out: {name} must be {'None' if mine is None else _describe(mine, x.device)}, "
                                 f"got {'None' if given is None else _describe(given, given.device)}")
        q, s, qt, st = out
    if x.numel() == 0:
        return q, s, qt, st
    first = q if q is not None else qt  # stand-ins for the outputs a mode does not write
    first_s = s if s is not None else st
    _quant_kernel[(triton.cdiv(rows, tile_r), triton.cdiv(cols, tile_c))](
        x, rows, cols, x.stride(0), x.stride(1),
        first, first_s, cols, first_s.stride(0), first_s.stride(1),
        qt if qt is not None else first, st if st is not None else first_s, rows,
        st.stride(0) if st is not None else 0, st.stride(1) if st is not None else 0, max(group_rows, 1),
        ROWWISE=rowwise, COLWISE=colwise, BLOCKWISE=blockwise, POW2=pow2_scales, TILE_R=tile_r, TILE_C=tile_c,
        BLOCK_T=transposed_groups is not None,
        num_warps=num_warps,
    )
    return q, s, qt, st
