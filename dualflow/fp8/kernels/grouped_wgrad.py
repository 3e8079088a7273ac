"""Triton weight-gradient GEMM grouped along the reduction (token) dimension, for MoE experts.

``out[g] = a[:, lo:hi] @ b[:, lo:hi].T`` with ``lo, hi = offsets[g], offsets[g+1]``, both operands E4M3
with 1x128 scales along K (the tokens: the 128x1 quantization of the output gradient and of the
layer input). Every offset must be a multiple of 128 so that no scale tile spans two groups; the block
bounds are read on the device (no host synchronisation). One program per (N tile, M tile, group), the
tiles of a group launched together; a group without tokens gets zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dualflow.fp8.kernels.gemm import BLOCK_K, _k_loop


@triton.jit
def _kgrouped_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, offsets_ptr, N, M,
                     s_an, s_ak, s_san, s_sak, s_bm, s_bk, s_sbm, s_sbk, s_cg, s_cn, s_cm,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # the tiles of one group are launched together (program_id(0) varies fastest), so that the group's
    # operand columns are read from memory once and served from L2 to all of its tiles
    tiles_m = tl.cdiv(M, BLOCK_M)
    pid_n = tl.program_id(0) // tiles_m
    pid_m = tl.program_id(0) % tiles_m
    group = tl.program_id(1)
    # the block bounds are multiples of 128 (the caller's contract): saying so lets the compiler keep the
    # operand loads 16 bytes wide (without it, the run-time offset makes every FP8 load a single byte)
    lo = tl.multiple_of(tl.load(offsets_ptr + group).to(tl.int64), 128)
    hi = tl.multiple_of(tl.load(offsets_ptr + group + 1).to(tl.int64), 128)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    kb0 = lo // BLOCK_K
    acc = _k_loop(a_ptr + lo * s_ak, sa_ptr + kb0 * s_sak, b_ptr + lo * s_bk, sb_ptr + kb0 * s_sbk,
                  offs_n, offs_m, mask_n, mask_m, hi - lo,
                  s_an, s_ak, s_san, s_sak, s_bm, s_bk, s_sbm, s_sbk,
                  True, True, BLOCK_N, BLOCK_M, BLOCK_K)
    c_ptrs = (c_ptr + group.to(tl.int64) * s_cg + offs_n.to(tl.int64)[:, None] * s_cn
              + offs_m.to(tl.int64)[None, :] * s_cm)
    tl.store(c_ptrs, acc, mask=mask_n[:, None] & mask_m[None, :])


CONFIG = dict(block_n=64, block_m=128, num_warps=4, num_stages=4)  # fp8_layers.py --sweep-wgrad, H200


def kgrouped_wgrad(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                   offsets: torch.Tensor, out: torch.Tensor, **config) -> torch.Tensor:
    """``out[g] = a[:, block g] @ b[:, block g].T`` in FP32; ``out`` is ``[G, N, M]``. ``config`` overrides
    :data:`CONFIG` (tile sizes, warps, pipeline stages; benchmarks/fp8_layers.py --sweep-wgrad times them)."""
    cfg = {**CONFIG, **config}
    n = a.shape[0]
    m = b.shape[0]
    groups = offsets.numel() - 1
    block_n, block_m = cfg["block_n"], cfg["block_m"]
    grid = (triton.cdiv(n, block_n) * triton.cdiv(m, block_m), groups)
    _kgrouped_kernel[grid](
        a, a_scales, b, b_scales, out, offsets, n, m,
        a.stride(0), a.stride(1), a_scales.stride(0), a_scales.stride(1),
        b.stride(0), b.stride(1), b_scales.stride(0), b_scales.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=BLOCK_K, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
