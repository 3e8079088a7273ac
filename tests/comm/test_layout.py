"""Routing arithmetic of dualflow.comm.layout against per-token loops (one process)."""

from __future__ import annotations

import pytest
import torch

from dualflow.comm.layout import expert_major_layout, get_dispatch_layout, send_order, to_local_experts


def _routing(tokens: int, experts: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, experts, (tokens, k), generator=g)  # duplicates and -1 included
    if tokens > 2:
        idx[0] = -1  # a token routed nowhere
        idx[1] = experts - 1  # all slots on the last expert
    return idx


@pytest.mark.parametrize("tokens,experts,ranks,k", [(0, 8, 4, 2), (1, 4, 4, 1), (37, 12, 4, 3), (64, 16, 8, 8)])
def test_dispatch_layout_matches_loops(tokens, experts, ranks, k):
    idx = _routing(tokens, experts, k, seed=tokens)
    layout = get_dispatch_layout(idx, experts, ranks)
    per = experts // ranks
    is_in = [[any(e >= 0 and e // per == r for e in row) for r in range(ranks)] for row in idx.tolist()]
    assert layout.is_token_in_rank.tolist() == (is_in or [])
    assert layout.num_tokens_per_rank.tolist() == [sum(row[r] for row in is_in) for r in range(ranks)]
    assert layout.num_tokens_per_expert.tolist() == [int((idx == e).sum()) for e in range(experts)]
    order = [t for r in range(ranks) for t in range(tokens) if is_in[t][r]]
    assert send_order(layout.is_token_in_rank).tolist() == order


@pytest.mark.parametrize("alignment", [1, 4, 128])
def test_expert_major_layout_matches_loops(alignment):
    per, rank, k = 3, 1, 4
    recv = to_local_experts(_routing(29, 4 * per, k, seed=alignment), rank, per)
    counts = [int((recv == e).sum()) for e in range(per)]
    em = expert_major_layout(recv, counts, alignment)
    rows, offsets, pos = [], [0], {}
    for e in range(per):
        for n, row in enumerate(recv.tolist()):
            for j, m in enumerate(row):
                if m == e:
                    pos[(n, j)] = len(rows)
                    rows.append(n)
        rows += [-1] * (-len(rows) % alignment)
        offsets.append(len(rows))
    assert em.offsets == offsets and em.counts == counts and em.num_rows == offsets[-1]
    assert em.rows.tolist() == rows
    assert {(n, j): p for n, r in enumerate(em.position.tolist()) for j, p in enumerate(r) if p >= 0} == pos
    assert all(p == -1 for n, r in enumerate(em.position.tolist()) for j, p in enumerate(r) if (n, j) not in pos)
