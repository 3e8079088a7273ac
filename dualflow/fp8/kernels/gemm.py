"""Triton block-scaled FP8 GEMMs: ``c = a @ b.T`` with FP32 promotion every 128 of K.

Block K equals the scale group (128): each K step is one fp8 ``tl.dot`` into a fresh FP32 tile that is
multiplied by ``scale_a[m] * scale_b[n]`` and added to the FP32 accumulator, which is what DeepSeek-V3's
"promote every 128 elements" prescribes. ``b``'s scales are either 128x128 blocks (forward, input
gradient: row index ``n // 128``) or 1x128 tiles (weight gradient: row index ``n``).

Three entry kernels share the K loop: dense, grouped with a contiguous layout (rows of all groups
concatenated, group ``g`` owning rows ``offsets[g]:offsets[g+1]``) and grouped with a masked layout
(``a[G, M_max, K]`` with ``counts[g]`` valid rows). Groups of any size work; a group whose size is a
multiple of BLOCK_M wastes no row of its tiles.

The grouped kernels read their group index on the device and trust none of it: offsets are clamped into
``[0, T]`` and made non-decreasing, counts into ``[0, M_max]``, so a malformed index never makes them
touch memory outside ``a`` and ``out``. With ``RECORD``, program (0, 0) also writes the first malformed
group of the whole index into ``errors`` (the record of :mod:`dualflow.fp8.groups`), unless an earlier
error is already there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 128


@triton.jit
def _k_loop(a_ptr, sa_ptr, b_ptr, sb_ptr, offs_m, offs_n, mask_m, mask_n, K,
            s_am, s_ak, s_sam, s_sak, s_bn, s_bk, s_sbn, s_sbk,
            B_ROWWISE: tl.constexpr, EVEN_K: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    if B_ROWWISE:
        sb_rows = n64
    else:
        sb_rows = n64 // BLOCK_K
    a_ptrs = a_ptr + m64[:, None] * s_am + offs_k[None, :] * s_ak
    b_ptrs = b_ptr + n64[:, None] * s_bn + offs_k[None, :] * s_bk
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            in_k = (kb * BLOCK_K + offs_k) < K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & in_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[:, None] & in_k[None, :], other=0.0)
        sa = tl.load(sa_ptr + m64 * s_sam + kb * s_sak, mask=mask_m, other=0.0)
        sb = tl.load(sb_ptr + sb_rows * s_sbn + kb * s_sbk, mask=mask_n, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    return acc


@triton.jit
def _store(c_ptr, acc, offs_m, offs_n, mask_m, mask_n, s_cm, s_cn, ACCUMULATE: tl.constexpr):
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * s_cm + offs_n.to(tl.int64)[None, :] * s_cn
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dense_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, M, N, K,
                  s_am, s_ak, s_sam, s_sak, s_bn, s_bk, s_sbn, s_sbk, s_cm, s_cn,
                  B_ROWWISE: tl.constexpr, ACCUMULATE: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped tile order: GROUP_M row tiles sweep the columns together, so b stays in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = _k_loop(a_ptr, sa_ptr, b_ptr, sb_ptr, offs_m, offs_n, mask_m, mask_n, K,
                  s_am, s_ak, s_sam, s_sak, s_bn, s_bk, s_sbn, s_sbk,
                  B_ROWWISE, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    _store(c_ptr, acc, offs_m, offs_n, mask_m, mask_n, s_cm, s_cn, ACCUMULATE)


@triton.jit
def _record(errors_ptr, found, code, group, first, second, bound):
    # one writer per launch (program (0, 0), `found` false elsewhere); the first error recorded stays
    if tl.load(errors_ptr, mask=found, other=1) == 0:
        tl.store(errors_ptr + 1, group.to(tl.int64))
        tl.store(errors_ptr + 2, first.to(tl.int64))
        tl.store(errors_ptr + 3, second.to(tl.int64))
        tl.store(errors_ptr + 4, bound.to(tl.int64))
        tl.store(errors_ptr, code.to(tl.int64))  # the code last: a record is complete once it is set


@triton.jit
def _contiguous_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, offsets_ptr, errors_ptr, T, G, N, K,
                       s_am, s_ak, s_sam, s_sak, s_bg, s_bn, s_bk, s_sbg, s_sbn, s_sbk, s_cm, s_cn,
                       RECORD: tl.constexpr, EVEN_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # program_id(0) enumerates the row tiles of all groups in order; find this one's group
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    zero = pid_m.to(tl.int64) * 0
    group = zero - 1
    row0 = zero
    row_end = zero
    tiles_before = zero
    bad_group = zero - 1
    bad_lo = zero
    bad_hi = zero
    for g in range(0, G):
        lo_raw = tl.load(offsets_ptr + g).to(tl.int64)
        hi_raw = tl.load(offsets_ptr + g + 1).to(tl.int64)
        bad = (tl.minimum(lo_raw, hi_raw) < 0) | (tl.maximum(lo_raw, hi_raw) > T) | (hi_raw < lo_raw)
        first_bad = bad & (bad_group < 0)
        bad_group = tl.where(first_bad, g, bad_group)
        bad_lo = tl.where(first_bad, lo_raw, bad_lo)
        bad_hi = tl.where(first_bad, hi_raw, bad_hi)
        # rows [lo, hi) inside [0, T] whatever the offsets hold
        lo = tl.minimum(tl.maximum(lo_raw, 0), T)
        hi = tl.maximum(tl.minimum(tl.maximum(hi_raw, 0), T), lo)
        tiles = tl.cdiv(hi - lo, BLOCK_M)
        inside = (pid_m >= tiles_before) & (pid_m < tiles_before + tiles)
        group = tl.where(inside, g, group)
        row0 = tl.where(inside, lo + (pid_m - tiles_before) * BLOCK_M, row0)
        row_end = tl.where(inside, hi, row_end)
        tiles_before += tiles
    if RECORD:
        _record(errors_ptr, (pid_m == 0) & (pid_n == 0) & (bad_group >= 0), zero + 1, bad_group, bad_lo, bad_hi,
                zero + T)
    if group < 0:  # the grid is an upper bound on the number of row tiles
        return
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < row_end
    mask_n = offs_n < N
    acc = _k_loop(a_ptr, sa_ptr, b_ptr + group * s_bg, sb_ptr + group * s_sbg, offs_m, offs_n, mask_m, mask_n, K,
                  s_am, s_ak, s_sam, s_sak, s_bn, s_bk, s_sbn, s_sbk,
                  False, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    _store(c_ptr, acc, offs_m, offs_n, mask_m, mask_n, s_cm, s_cn, False)


@triton.jit
def _masked_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, counts_ptr, errors_ptr, G, M_MAX, N, K,
                   s_ag, s_am, s_ak, s_sag, s_sam, s_sak, s_bg, s_bn, s_bk, s_sbg, s_sbn, s_sbk, s_cg, s_cm, s_cn,
                   RECORD: tl.constexpr, EVEN_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    if RECORD:  # noqa: SIM102 (a compile-time branch: Triton drops it when RECORD is False)
        if (pid == 0) & (pid_n == 0):
            zero = pid.to(tl.int64) * 0
            bad_group = zero - 1
            bad_count = zero
            for g in range(0, G):
                c = tl.load(counts_ptr + g).to(tl.int64)
                first_bad = ((c < 0) | (c > M_MAX)) & (bad_group < 0)
                bad_group = tl.where(first_bad, g, bad_group)
                bad_count = tl.where(first_bad, c, bad_count)
            _record(errors_ptr, bad_group >= 0, zero + 2, bad_group, bad_count, zero + M_MAX, zero + M_MAX)
    tiles_m = tl.cdiv(M_MAX, BLOCK_M)
    group = pid // tiles_m
    # at most M_MAX rows, and none for a negative count
    count = tl.minimum(tl.maximum(tl.load(counts_ptr + group).to(tl.int64), 0), M_MAX)
    offs_m = (pid % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    if (pid % tiles_m) * BLOCK_M >= count:  # rows past the valid count are not computed
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < count
    mask_n = offs_n < N
    g64 = group.to(tl.int64)
    acc = _k_loop(a_ptr + g64 * s_ag, sa_ptr + g64 * s_sag, b_ptr + g64 * s_bg, sb_ptr + g64 * s_sbg,
                  offs_m, offs_n, mask_m, mask_n, K,
                  s_am, s_ak, s_sam, s_sak, s_bn, s_bk, s_sbn, s_sbk,
                  False, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    _store(c_ptr + g64 * s_cg, acc, offs_m, offs_n, mask_m, mask_n, s_cm, s_cn, False)


def _config(m: int) -> dict:
    # 128x128 output tiles, 3 stages of 32 KiB of fp8 operands in flight, for training shapes; 64-row
    # tiles (one warpgroup) when M is small so that more programs share the SMs
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


def gemm(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor, *,
         b_rowwise: bool, accumulate: bool) -> torch.Tensor:
    """``out (+)= a @ b.T`` for a[M, K], b[N, K]; ``out`` is [M, N] (any float dtype)."""
    m, k = a.shape
    n = b.shape[0]
    cfg = _config(m)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _dense_kernel[grid](
        a, a_scales, b, b_scales, out, m, n, k,
        a.stride(0), a.stride(1), a_scales.stride(0), a_scales.stride(1),
        b.stride(0), b.stride(1), b_scales.stride(0), b_scales.stride(1), out.stride(0), out.stride(1),
        B_ROWWISE=b_rowwise, ACCUMULATE=accumulate, EVEN_K=k % BLOCK_K == 0, BLOCK_K=BLOCK_K, GROUP_M=8, **cfg)
    return out


def grouped_contiguous(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                       offsets: torch.Tensor, out: torch.Tensor, errors: torch.Tensor | None = None) -> torch.Tensor:
    """``out[rows of g] = a[rows of g] @ b[g].T`` with rows ``offsets[g]:offsets[g+1]``; a malformed group is
    recorded into ``errors`` (int64 record of :mod:`dualflow.fp8.groups`) when given."""
    total, k = a.shape
    groups, n, _ = b.shape
    cfg = _config(total // max(groups, 1))
    tiles_m = triton.cdiv(total, cfg["BLOCK_M"]) + groups  # each group adds at most one partial tile
    grid = (tiles_m, triton.cdiv(n, cfg["BLOCK_N"]))
    _contiguous_kernel[grid](
        a, a_scales, b, b_scales, out, offsets, offsets if errors is None else errors, total, groups, n, k,
        a.stride(0), a.stride(1), a_scales.stride(0), a_scales.stride(1),
        b.stride(0), b.stride(1), b.stride(2), b_scales.stride(0), b_scales.stride(1), b_scales.stride(2),
        out.stride(0), out.stride(1),
        RECORD=errors is not None, EVEN_K=k % BLOCK_K == 0, BLOCK_K=BLOCK_K, **cfg)
    return out


def grouped_masked(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                   counts: torch.Tensor, out: torch.Tensor, errors: torch.Tensor | None = None) -> torch.Tensor:
    """``out[g, :counts[g]] = a[g, :counts[g]] @ b[g].T``; other rows of ``out`` are left untouched. A malformed
    count is recorded into ``errors`` when given."""
    groups, m_max, k = a.shape
    n = b.shape[1]
    cfg = _config(m_max)
    grid = (groups * triton.cdiv(m_max, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _masked_kernel[grid](
        a, a_scales, b, b_scales, out, counts, counts if errors is None else errors, groups, m_max, n, k,
        a.stride(0), a.stride(1), a.stride(2), a_scales.stride(0), a_scales.stride(1), a_scales.stride(2),
        b.stride(0), b.stride(1), b.stride(2), b_scales.stride(0), b_scales.stride(1), b_scales.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        RECORD=errors is not None, EVEN_K=k % BLOCK_K == 0, BLOCK_K=BLOCK_K, **cfg)
    return out
