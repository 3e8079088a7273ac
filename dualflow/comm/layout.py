"""Routing arithmetic of dispatch/combine in plain torch: who sends which token where, and in what order.

Everything here is local (no communication) and runs on any device. Expert ``e`` of ``E`` lives on rank
``e // (E / R)`` of the expert-parallel group; a token goes once to each rank that hosts at least one of
its top-k experts. Rows leave a rank grouped by destination rank, tokens ascending within a destination,
which is what gives the receiver its (source rank, source token) order.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True, eq=False)
class DispatchLayout:
    """Where this rank's tokens go: the output of :func:`get_dispatch_layout`.

    - ``num_tokens_per_rank`` [R] int64: tokens sent to each rank (a token counts once per rank);
    - ``num_tokens_per_expert`` [E] int64: (token, top-k slot) pairs routed to each expert;
    - ``is_token_in_rank`` [T, R] bool: whether token t goes to rank r.
    """

    num_tokens_per_rank: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor


@dataclasses.dataclass(frozen=True, eq=False)
class ExpertMajorLayout:
    """Received rows regrouped per local expert, each expert's segment padded to the alignment.

    Segment ``e`` spans rows ``[offsets[e], offsets[e + 1])``; its first ``counts[e]`` rows are the
    (token, slot) pairs routed to local expert ``e`` in (source rank, source token, slot) order, the rest
    are padding. ``rows[i]`` is the received row that expert-major row ``i`` copies (-1 for padding),
    ``position[n, j]`` the expert-major row of received row ``n``'s slot ``j`` (-1 where that slot's
    expert is not on this rank).
    """

    offsets: list[int]
    counts: list[int]
    rows: torch.Tensor
    position: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.offsets[-1]


def align_up(n: int, alignment: int) -> int:
    """Smallest multiple of ``alignment`` that is >= ``n``."""
    return (n + alignment - 1) // alignment * alignment


def expert_owner(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """Rank hosting each entry's expert; -1 where the entry is -1 ("no expert")."""
    per_rank = num_experts // num_ranks
    return torch.where(topk_idx >= 0, topk_idx.div(per_rank, rounding_mode="floor"), -1)


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> DispatchLayout:
    """Counts and token-to-rank map of ``topk_idx`` [T, k] (int64, -1 = no expert); inputs are not validated."""
    owner = expert_owner(topk_idx, num_experts, num_ranks)
    num_tokens = topk_idx.shape[0]
    is_in = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    # Column R collects the -1 entries so that one scatter handles them; it is dropped below.
    is_in.scatter_(1, torch.where(owner >= 0, owner, num_ranks), True)
    is_in = is_in[:, :num_ranks].contiguous()
    valid = topk_idx[topk_idx >= 0]
    return DispatchLayout(
        num_tokens_per_rank=is_in.sum(0, dtype=torch.int64),
        num_tokens_per_expert=torch.bincount(valid, minlength=num_experts).to(torch.int64),
        is_token_in_rank=is_in,
    )


def send_order(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """Token index of every outgoing row: grouped by destination rank ascending, tokens ascending within."""
    return is_token_in_rank.t().nonzero()[:, 1]


def to_local_experts(topk_idx: torch.Tensor, rank: int, num_local_experts: int) -> torch.Tensor:
    """Global expert ids -> ids local to ``rank``; -1 where the expert lives elsewhere (or was -1)."""
    local = topk_idx - rank * num_local_experts
    return torch.where((topk_idx >= 0) & (local >= 0) & (local < num_local_experts), local, -1)


def expert_major_layout(recv_topk_idx: torch.Tensor, counts: list[int], alignment: int) -> ExpertMajorLayout:
    """Expert-major arrangement of received rows whose local expert ids are ``recv_topk_idx`` [N, k].

    ``counts`` are the per-local-expert (row, slot) counts, known before the rows arrive; they must match
    ``recv_topk_idx``.
    """
    num_rows, k = recv_topk_idx.shape
    device = recv_topk_idx.device
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + align_up(c, alignment))
    flat = recv_topk_idx.reshape(-1)
    pairs = (flat >= 0).nonzero()[:, 0]  # (row, slot) pairs in row-major order
    experts = flat[pairs]
    order = torch.sort(experts, stable=True).indices  # per expert, (row, slot) order is kept
    pairs, experts = pairs[order], experts[order]
    seg_start = torch.tensor(offsets[:-1], dtype=torch.int64, device=device)
    first = torch.tensor([0, *counts[:-1]], dtype=torch.int64, device=device).cumsum(0)
    dest = seg_start[experts] + torch.arange(pairs.numel(), device=device) - first[experts]
    rows = torch.full((offsets[-1],), -1, dtype=torch.int64, device=device)
    rows[dest] = pairs.div(k, rounding_mode="floor")
    position = torch.full((num_rows * k,), -1, dtype=torch.int64, device=device)
    position[pairs] = dest
    return ExpertMajorLayout(offsets=offsets, counts=list(counts), rows=rows, position=position.view(num_rows, k))
