"""Independent reference of dispatch/combine: per-token Python loops over every rank's gathered inputs.

It shares no code with dualflow.comm: routing, ordering, expert-major layout and the FP32 accumulation
order are re-derived here from the API's contract (docs/comm.md), one token at a time.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Expected:
    """What one destination rank must receive."""

    rows: list[tuple[int, int]]  # (source rank, source token) per received row, in order
    fields: list[torch.Tensor]  # each payload tensor's received rows (data, then scales for FP8)
    topk_idx: torch.Tensor  # [N, k] local ids, -1 elsewhere
    weights: torch.Tensor | None  # [N, k], 0 where the expert is elsewhere
    counts: list[int]  # (row, slot) pairs per local expert, unaligned
    offsets: list[int]  # expert-major segment starts, aligned, plus the total
    em_rows: list[int]  # received row copied by each expert-major row, -1 for padding
    em_pos: dict[tuple[int, int], int]  # (row, slot) -> expert-major row


def expected_receive(fields_by_src, topk_by_src, weights_by_src, num_experts: int, dest: int, alignment: int = 1):
    """``fields_by_src[s]``: list of payload tensors of rank s; ``topk_by_src[s]``: its [T_s, k] ids."""
    num_ranks = len(topk_by_src)
    per_rank = num_experts // num_ranks
    k = topk_by_src[0].shape[1]
    rows, local = [], []
    for s in range(num_ranks):
        for t, ids in enumerate(topk_by_src[s].tolist()):
            mine = [e - dest * per_rank if e >= 0 and e // per_rank == dest else -1 for e in ids]
            if any(m >= 0 for m in mine):
                rows.append((s, t))
                local.append(mine)
    fields = []
    for f in range(len(fields_by_src[0])):
        proto = fields_by_src[0][f]
        picked = [fields_by_src[s][f][t] for s, t in rows]
        fields.append(torch.stack(picked) if picked else proto.new_empty((0, *proto.shape[1:])))
    topk_idx = torch.tensor(local, dtype=torch.int64).view(len(rows), k)
    weights = None
    if weights_by_src is not None:
        weights = torch.zeros(len(rows), k, dtype=torch.float32)
        for n, (s, t) in enumerate(rows):
            for j in range(k):
                if local[n][j] >= 0:
                    weights[n, j] = weights_by_src[s][t, j]
    counts = [sum(1 for r in local for m in r if m == e) for e in range(per_rank)]
    offsets, em_rows, em_pos = [0], [], {}
    for e in range(per_rank):
        for n, r in enumerate(local):
            for j, m in enumerate(r):
                if m == e:
                    em_pos[(n, j)] = len(em_rows)
                    em_rows.append(n)
        while len(em_rows) % alignment:
            em_rows.append(-1)
        offsets.append(len(em_rows))
    return Expected(rows, fields, topk_idx, weights, counts, offsets, em_rows, em_pos)


def expert_major_fields(exp: Expected) -> list[torch.Tensor]:
    """The received payload tensors laid out expert-major, padding rows all-zero bytes."""
    out = []
    for f in exp.fields:
        zero = torch.zeros(f.shape[1:], dtype=f.dtype)
        rows = [f[n] if n >= 0 else zero for n in exp.em_rows]
        out.append(torch.stack(rows) if rows else f.new_empty((0, *f.shape[1:])))
    return out


def contribution(exp: Expected, n: int, y: torch.Tensor, weights: torch.Tensor | None,
                 expert_major: bool) -> torch.Tensor:
    """Row n's contribution to its source token: FP32 arithmetic in the documented order, then y's dtype."""
    slots = [j for j, m in enumerate(exp.topk_idx[n].tolist()) if m >= 0]
    if not expert_major:
        if weights is None:
            return y[n]
        total = torch.zeros((), dtype=torch.float32)
        for j in slots:
            total = total + weights[n, j]
        return (y[n].float() * total).to(y.dtype)
    acc = torch.zeros(y.shape[1], dtype=torch.float32)
    for j in slots:
        term = y[exp.em_pos[(n, j)]].float()
        acc = acc + (term * weights[n, j] if weights is not None else term)
    return acc.to(y.dtype)


def expected_combine(expected_by_dest: list[Expected], y_by_dest, weights_by_dest, src: int, num_tokens: int,
                     expert_major: bool):
    """What source rank ``src`` gets back: per token, FP32 sum over destinations ascending from +0.0."""
    dtype, width = y_by_dest[0].dtype, y_by_dest[0].shape[1]
    out = torch.zeros(num_tokens, width, dtype=torch.float32)
    k = expected_by_dest[0].topk_idx.shape[1]
    out_w = torch.zeros(num_tokens, k, dtype=torch.float32)
    for d, exp in enumerate(expected_by_dest):
        for n, (s, t) in enumerate(exp.rows):
            if s != src:
                continue
            out[t] = out[t] + contribution(exp, n, y_by_dest[d], weights_by_dest[d] if weights_by_dest else None,
                                           expert_major).float()
            if weights_by_dest:
                mask = exp.topk_idx[n] >= 0
                out_w[t] = out_w[t] + torch.where(mask, weights_by_dest[d][n], 0.0)
    return out.to(dtype), out_w
