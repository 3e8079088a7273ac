"""A rank's routed experts as stacked weights, run as grouped GEMMs over expert-contiguous rows.

:class:`GroupedExperts` holds the SwiGLU experts of one rank as two tensors, ``w13 [E, 2H, D]`` (gate and
up projections) and ``w2 [E, D, H]`` (down projection), and computes all of them with one grouped GEMM
per projection (forward, input gradient and weight gradient alike):

1. :func:`plan_routes` sorts the received (row, slot) pairs by local expert on the device, with every
   expert's block starting at a multiple of ``align`` rows (the FP8 kernels' 128-row tiles then never
   mix two experts' tokens). The permuted buffer has a static size, ``pairs + E * (align - 1)`` rows
   rounded up to a multiple of ``align``, so nothing is read back to the host; pairs routed to no
   local expert (-1, expert parallelism) are parked after the last expert's block, where no GEMM reads
   or writes. Moving rows in and out of that buffer is a gather both ways (forward and backward).
2. the grouped GEMMs: BF16/FP32 through ``torch._grouped_mm``; FP8 (``fp8_recipe`` set) through
   :func:`dualflow.fp8.fp8_grouped_mlp` (1x128 activations, 128x128 weights, the weight gradient
   grouped along the tokens, SwiGLU fused with the quantization of its output).
3. the outputs return to their (row, slot) place, are weighted in FP32 and summed over the slots.

:func:`routed_reference` is the plain per-expert loop the tests compare against.

The module's ``state_dict`` keeps one entry per expert under its global id
(``{e}.w13.weight [2H, D]``, ``{e}.w2.weight [D, H]``), so checkpoints and exports do not depend on the
stacking or on how experts are spread over ranks; :func:`per_expert_views` gives the same split for
any tensor shaped like a stacked parameter (optimizer moments).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_STACKED = ("w13", "w2")
_STACKED_NAME = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<attr>w13|w2)$")


@dataclasses.dataclass(frozen=True)
class RoutePlan:
    """Where each (row, slot) pair goes in the permuted buffer, and the experts' blocks there.

    ``dest [N * k]``: row of the permuted buffer for each pair (distinct for distinct pairs);
    ``source [rows]``: the pair each permuted row holds, ``N * k`` for none (padding, parked pairs);
    ``ends [E]``: each expert's block ends (int32, cumulative, blocks start at multiples of ``align``);
    ``valid [N * k]``: the pair has a local expert (None: all have); ``rows``: the buffer's static size.
    """

    dest: torch.Tensor
    source: torch.Tensor
    ends: torch.Tensor
    valid: torch.Tensor | None
    rows: int
    k: int

    @property
    def offsets(self) -> torch.Tensor:
        """``[E + 1]`` block boundaries from 0 (the contiguous layout of the FP8 grouped GEMMs)."""
        return F.pad(self.ends, (1, 0))


def plan_routes(local_idx: torch.Tensor, n_experts: int, align: int, all_local: bool = False) -> RoutePlan:
    """Expert-contiguous placement of the pairs of ``local_idx [N, k]`` (-1: no local expert), on the device.

    ``all_local`` promises that no entry is -1 (one process holds every expert), which spares the masking.
    """
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    expert = local_idx.reshape(-1).long()
    pairs = expert.numel()
    sentinel = expert.new_full((), n_experts)
    key = expert if all_local else torch.where(expert < 0, sentinel, expert)
    # int64 counts by scatter-add (bincount would read its size back to the host)
    counts = torch.zeros(n_experts + 1, dtype=torch.int64, device=key.device).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:n_experts] + (align - 1)) // align * align
    ends = torch.cumsum(padded, 0)
    starts = torch.cat([ends.new_zeros(1), ends])  # the parked pairs start after the last block
    first = torch.cumsum(counts, 0) - counts  # each key's first position in sorted order
    # the narrowest integer type that holds the keys: a GPU radix sort makes one pass per key byte (int64
    # keys took 8 passes a call; the order of a stable sort does not depend on the type)
    narrow = torch.int16 if n_experts < 2**15 else torch.int32
    order = torch.argsort(key.to(narrow), stable=True)
    sorted_key = key[order]
    rank_in_group = torch.arange(pairs, device=key.device) - first[sorted_key]
    dest = torch.empty_like(order).scatter_(0, order, starts[sorted_key] + rank_in_group)
    # a multiple of align: the row stride of the 128x1-quantized (transposed) buffers stays 16-byte aligned
    rows = -(-(pairs + n_experts * (align - 1)) // align) * align
    valid = None if all_local else key < n_experts
    held = torch.arange(pairs, device=key.device)
    if valid is not None:  # parked pairs' rows hold nothing: no GEMM output of theirs is ever read
        held = torch.where(valid, held, pairs)
    source = torch.full((rows,), pairs, dtype=torch.int64, device=key.device).scatter_(0, dest, held)
    return RoutePlan(dest, source, ends.to(torch.int32), valid, rows, local_idx.shape[1])


def _with_zero_row(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(1, *t.shape[1:])])


class _Permute(torch.autograd.Function):
    """``x [N, D]`` -> the permuted buffer ``[rows, D]`` (zeros where no pair sits); both ways are gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
        ctx.plan, ctx.n = plan, x.shape[0]
        return _with_zero_row(x).index_select(0, torch.div(plan.source, plan.k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        plan = ctx.plan
        per_pair = grad.index_select(0, plan.dest)
        if plan.valid is not None:  # rows after the last block are undefined: parked pairs must not read them
            per_pair = torch.where(plan.valid[:, None], per_pair, 0)
        return per_pair.view(ctx.n, plan.k, grad.shape[-1]).sum(1), None


class _Combine(torch.autograd.Function):
    """The permuted outputs back to their (row, slot) place, weighted in FP32 and summed over the slots."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, weights: torch.Tensor, plan: RoutePlan, dtype: torch.dtype) -> torch.Tensor:
        n, k = weights.shape
        acc = torch.promote_types(dtype, torch.float32)
        per_pair = out.index_select(0, plan.dest)
        w = weights.reshape(-1, 1).to(acc)
        if plan.valid is not None:
            per_pair = torch.where(plan.valid[:, None], per_pair, 0)
            w = torch.where(plan.valid[:, None], w, 0)
        ctx.save_for_backward(per_pair, w)
        ctx.plan, ctx.out_dtype, ctx.w_dtype = plan, out.dtype, weights.dtype
        return (per_pair.to(acc) * w).view(n, k, out.shape[-1]).sum(1).to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        per_pair, w = ctx.saved_tensors
        plan = ctx.plan
        n, k = grad.shape[0], plan.k
        g = grad.to(w.dtype)
        grad_w = (per_pair.view(n, k, g.shape[-1]).to(w.dtype) * g[:, None, :]).sum(-1).to(ctx.w_dtype)
        # each permuted row's gradient is its pair's weight times its token's gradient (zero where no pair)
        token = torch.div(plan.source, k, rounding_mode="floor")
        grad_out = _with_zero_row(g).index_select(0, token) * _with_zero_row(w).index_select(0, plan.source)
        return grad_out.to(ctx.out_dtype), grad_w, None, None


_GROUPED_MM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``x[block g] @ w[g].T`` for the blocks ending at ``ends``; rows after the last block are undefined."""
    if x.dtype in _GROUPED_MM_DTYPES:
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=ends)
    # float64 (finite-difference tests): one GEMM per expert, which reads the block ends on the host
    out = x.new_zeros(x.shape[0], w.shape[1])
    start = 0
    for g, end in enumerate(ends.tolist()):
        out[start:end] = x[start:end] @ w[g].T
        start = end
    return out


def grouped_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``w2[g] (silu(gate) * up)`` with ``gate, up = w13[g] x`` per expert block; high-precision GEMMs."""
    dtype = x.dtype
    h = _grouped_mm(x, w13.to(dtype), ends)
    gate, up = h.chunk(2, dim=-1)
    return _grouped_mm(F.silu(gate) * up, w2.to(dtype), ends)


class GroupedExperts(nn.Module):
    """SwiGLU experts ``expert_ids`` (global ids) of one rank, stacked; see the module docstring."""

    def __init__(self, dim: int, hidden: int, expert_ids: Iterable[int]) -> None:
        super().__init__()
        self.expert_ids = tuple(int(e) for e in expert_ids)
        n = len(self.expert_ids)
        self.dim, self.hidden = dim, hidden
        self.w13 = nn.Parameter(torch.empty(n, 2 * hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, hidden))
        self.fp8_recipe: Any = None  # a dualflow.fp8.Fp8Recipe: the expert GEMMs run in FP8
        self._fp8_caches: Any = None
        self.fp8_snapshot: Any = None  # dualflow.fp8.nn.Fp8WeightSnapshot pair for compiled calls
        self._fp8_errors: Any = None  # a dualflow.fp8.Fp8ErrorFlag on the experts' device
        self._register_load_state_dict_pre_hook(self._stack_on_load)

    def __len__(self) -> int:
        return len(self.expert_ids)

    def extra_repr(self) -> str:
        ids = self.expert_ids
        span = f"{ids[0]}..{ids[-1]}" if ids else "none"
        return f"experts={len(ids)} ({span}), dim={self.dim}, hidden={self.hidden}, fp8={self.fp8_recipe is not None}"

    def expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert ``i`` on rows ``x`` in plain torch (the reference's building block)."""
        gate, up = F.linear(x, self.w13[i].to(x.dtype)).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2[i].to(x.dtype))

    def align(self) -> int:
        # FP8: 128-row blocks (the 128x1 quantization of the weight gradient stays inside one expert);
        # otherwise 16 rows keep each block 16-byte aligned for the grouped GEMM (at most 15 padding rows each)
        return 128 if self.fp8_recipe is not None else 16

    def forward(self, x: torch.Tensor, local_idx: torch.Tensor, weights: torch.Tensor,
                all_local: bool = False) -> torch.Tensor:
        """Weighted sum over each row's local experts: ``x [N, D]``, ``local_idx``/``weights [N, k]``."""
        plan = plan_routes(local_idx, len(self), self.align(), all_local)
        permuted = _Permute.apply(x, plan)
        if self.fp8_recipe is not None:
            out = self._fp8(permuted, plan)
        else:
            out = grouped_swiglu(permuted, self.w13, self.w2, plan.ends)
        return _Combine.apply(out, weights, plan, x.dtype)

    def enable_fp8(self, recipe: Any) -> None:
        """Run the expert GEMMs in FP8 with ``recipe`` (a dualflow.fp8.Fp8Recipe), on the weights' device.

        The device error flag is made here, before any compiled region runs: created while tracing, it would
        be a tensor of the graph rather than state of the module."""
        from dualflow.fp8 import Fp8ErrorFlag

        self.fp8_recipe = recipe
        self._fp8_errors = Fp8ErrorFlag(self.w13.device)

    def _fp8(self, permuted: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
        from dualflow.fp8 import Fp8ErrorFlag, Fp8WeightCache, fp8_grouped_mlp

        # compiled, the weights are quantized inside the graph (dualflow.fp8.moe): no cache to make
        if self._fp8_caches is None and not torch.compiler.is_compiling():
            self._fp8_caches = (Fp8WeightCache(), Fp8WeightCache())
        if self._fp8_errors is None or self._fp8_errors.device != permuted.device:
            self._fp8_errors = Fp8ErrorFlag(permuted.device)
        return fp8_grouped_mlp(permuted, self.w13, self.w2, plan.offsets, self.fp8_recipe, self._fp8_caches,
                               self._fp8_errors, self.fp8_snapshot)

    def check_fp8_errors(self) -> None:
        """Raise if a grouped GEMM recorded malformed expert offsets (reads a device flag: synchronises).

        The offsets are cumulative sums of counts, so this reports a bug, never a data problem; the step
        calls it once, where it waits for the GPU anyway."""
        if self._fp8_errors is not None:
            self._fp8_errors.check()

    def invalidate_fp8_cache(self) -> None:
        self._fp8_caches = None

    def enable_fp8_snapshot(self) -> bool:
        """FP8 weight snapshots for compiled calls, one per stacked weight (FP8 experts only; see
        :func:`dualflow.fp8.nn.enable_fp8_snapshots`)."""
        from dualflow.fp8.nn import Fp8WeightSnapshot

        if self.fp8_recipe is None:
            return False
        self.fp8_snapshot = (Fp8WeightSnapshot(), Fp8WeightSnapshot())
        return True

    def refresh_fp8_snapshot(self) -> None:
        self.fp8_snapshot[0].refresh(self.w13, self.fp8_recipe)
        self.fp8_snapshot[1].refresh(self.w2, self.fp8_recipe)

    # -------------------------------------------------------------------------------- state dict
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for attr in _STACKED:
            stacked = getattr(self, attr)
            for i, e in enumerate(self.expert_ids):
                destination[f"{prefix}{e}.{attr}.weight"] = stacked[i] if keep_vars else stacked.detach()[i]

    def _stack_on_load(self, state_dict: dict, prefix: str, *_args) -> None:
        # per-expert entries -> the stacked parameters (missing entries stay missing: strict loads report them)
        for attr in _STACKED:
            keys = [f"{prefix}{e}.{attr}.weight" for e in self.expert_ids]
            if all(k in state_dict for k in keys):
                state_dict[prefix + attr] = torch.stack([state_dict.pop(k) for k in keys])


def per_expert_views(name: str, tensor: torch.Tensor, expert_ids: Iterable[int]) -> dict[str, torch.Tensor]:
    """``{per-expert name: view}`` for a tensor shaped like the stacked parameter ``name``; ``{name: tensor}``
    when ``name`` is not a stacked expert parameter (``...experts.w13`` -> ``...experts.{e}.w13.weight``)."""
    match = _STACKED_NAME.match(name)
    if match is None:
        return {name: tensor}
    ids = list(expert_ids)
    if tensor.shape[0] != len(ids):
        raise ValueError(f"{name}: {tensor.shape[0]} stacked experts, but {len(ids)} expert ids {ids}")
    return {f"{match['prefix']}.{e}.{match['attr']}.weight": tensor[i] for i, e in enumerate(ids)}


def routed_reference(experts: GroupedExperts, x: torch.Tensor, local_idx: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """The plain per-expert loop: each local expert once on the rows that selected it (host-synchronising)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)
    for i in range(len(experts)):
        rows, slot = (local_idx == i).nonzero(as_tuple=True)
        if rows.numel():
            y = experts.expert(i, x.index_select(0, rows)).to(acc)
            out.index_add_(0, rows, y * weights[rows, slot].unsqueeze(-1).to(acc))
    return out.to(x.dtype)
