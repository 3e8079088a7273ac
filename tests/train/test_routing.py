"""Group-limited routing: selection against a token-by-token reference, its settings, groups aligned with
expert-parallel ranks (each token reaches at most topk_group of them), training with it on gloo against
one process. The dispatch benchmark's bytes per token with and without the limit:
tests/comm/test_bench_moe_a2a.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dualflow.comm import get_dispatch_layout
from dualflow.train.model import ModelConfig, Router, select_experts
from dualflow.train.trainer import Trainer
from tests.dist import run_workers
from tests.train.helpers import tiny, train_worker

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

CFG = ModelConfig(dim=32, n_layers=2, n_dense_layers=1, n_heads=4, dense_hidden=48, expert_hidden=16,
                  n_routed_experts=16, top_k=4, n_group=4, topk_group=2)


def _reference(biased: torch.Tensor, top_k: int, n_group: int, topk_group: int) -> list[set[int]]:
    """Per token, in plain Python: rank the groups by the sum of their two best entries, keep the best
    topk_group, take the top_k entries among their experts."""
    out = []
    size = biased.shape[1] // n_group
    for row in biased.tolist():
        groups = [sorted(row[g * size:(g + 1) * size], reverse=True) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -(groups[g][0] + groups[g][1]))[:topk_group]
        allowed = [e for e in range(len(row)) if e // size in kept]
        out.append(set(sorted(allowed, key=lambda e: -row[e])[:top_k]))
    return out


@pytest.mark.parametrize("experts, top_k, n_group, topk_group", [(16, 4, 4, 2), (12, 3, 3, 1), (64, 8, 8, 4),
                                                                 (8, 2, 4, 4)])
def test_selection_matches_a_token_by_token_reference(experts, top_k, n_group, topk_group):
    g = torch.Generator().manual_seed(experts + top_k)
    # affinities in (0, 1) plus balancing biases of both signs: some kept entries are below zero
    biased = torch.rand(200, experts, generator=g) + (torch.rand(experts, generator=g) - 0.5) * 1.5
    idx = select_experts(biased, top_k, n_group, topk_group)
    assert [set(r) for r in idx.tolist()] == _reference(biased, top_k, n_group, topk_group)
    assert (biased.gather(1, idx).diff(dim=1) <= 0).all()  # best first, as without groups
    size = experts // n_group
    assert all(len({e // size for e in r}) <= topk_group for r in idx.tolist())


def test_a_group_is_scored_by_its_two_best_and_dropped_groups_never_win():
    # group 0 holds the single best expert but a poor second; group 1 is the better pair. All of group 1 is
    # below zero: a dropped group must lose even to negative entries (masked with -inf, not with 0).
    biased = torch.tensor([[0.9, -3.0, -0.1, -0.2]])
    assert select_experts(biased, 2, n_group=2, topk_group=1).tolist() == [[2, 3]]
    assert select_experts(biased, 2).tolist() == [[0, 2]]  # without groups the best two


def test_one_group_is_plain_top_k():
    biased = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(select_experts(biased, 4), torch.topk(biased, 4, dim=-1).indices)
    assert torch.equal(select_experts(biased, 4, 1, 1), select_experts(biased, 4))


def test_router_limits_groups_and_its_weights_ignore_the_bias():
    router = Router(CFG)
    torch.nn.init.normal_(router.weight)
    router.bias.copy_(torch.linspace(-0.3, 0.3, CFG.n_routed_experts))
    x = torch.randn(50, CFG.dim)
    idx, w = router(x)
    scores = torch.sigmoid(x @ router.weight.T)
    assert [set(r) for r in idx.tolist()] == _reference(scores + router.bias, CFG.top_k, CFG.n_group, CFG.topk_group)
    chosen = scores.gather(-1, idx)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True) * CFG.routed_scale)


@pytest.mark.parametrize("bad, match", [
    (dict(n_group=3), "split into model.n_group=3 groups"),
    (dict(n_group=16), "groups of at least 2"),
    (dict(topk_group=5), r"model.topk_group=5 must not exceed model.n_group=4"),
    (dict(topk_group=1, top_k=5), "top_k=5 exceeds the 4 experts"),
    (dict(group_by="racks"), "model.group_by: expected one of 'experts', 'ep_ranks', 'nodes', got 'racks'"),
])
def test_invalid_group_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CFG, **bad)


def test_groups_from_the_expert_parallel_layout():
    cfg = dataclasses.replace(CFG, n_group=1, topk_group=2, group_by="ep_ranks")
    assert cfg.resolve_groups(ep_size=4, ranks_per_node=8) == dataclasses.replace(cfg, n_group=4, group_by="experts")
    nodes = dataclasses.replace(cfg, group_by="nodes")
    assert nodes.resolve_groups(ep_size=8, ranks_per_node=2).n_group == 4  # 8 ranks on 4 nodes
    assert nodes.resolve_groups(ep_size=4, ranks_per_node=8).n_group == 1  # one node: nothing to limit
    assert nodes.resolve_groups(ep_size=4, ranks_per_node=8).topk_group == 1
    with pytest.raises(ValueError, match="whole nodes"):
        nodes.resolve_groups(ep_size=6, ranks_per_node=4)
    with pytest.raises(ValueError, match="n_group=2 is set"):
        dataclasses.replace(cfg, n_group=2).resolve_groups(ep_size=4, ranks_per_node=4)
    assert CFG.resolve_groups(ep_size=4, ranks_per_node=1) is CFG
    with pytest.raises(ValueError, match="resolve_groups"):
        Router(cfg)  # a model is built from the resolved config


def test_groups_aligned_with_ranks_bound_the_ranks_a_token_reaches():
    ranks = 4
    cfg = dataclasses.replace(CFG, n_group=1, topk_group=2, group_by="ep_ranks").resolve_groups(ranks, ranks)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(500, CFG.dim)
    idx, _ = router(x)
    reached = get_dispatch_layout(idx, cfg.n_routed_experts, ranks).is_token_in_rank.sum(1)
    assert int(reached.max()) <= 2
    free = Router(dataclasses.replace(cfg, n_group=1, topk_group=1))
    with torch.no_grad():
        free.weight.copy_(router.weight)
        unlimited = get_dispatch_layout(free(x)[0], cfg.n_routed_experts, ranks).is_token_in_rank.sum(1)
    assert int(unlimited.max()) > 2  # the bound is the limit's doing


def _relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


def test_rank_limited_routing_trains_on_two_expert_parallel_ranks_like_one_process(tmp_path):
    # the tiny model's 4 experts in 2 groups of 2, one group per token: with group_by = "ep_ranks" on two
    # expert-parallel ranks every token is sent to one rank; one process runs the same groups explicitly
    reference = Trainer(tiny(tmp_path / "one", model=dict(n_group=2, topk_group=1))).train().losses
    cfg = tiny(tmp_path / "ep", model=dict(group_by="ep_ranks", topk_group=1), parallel=dict(dp=2, microbatches=2))
    results = run_workers(train_worker, 2, cfg, timeout=180)
    assert _relative(results[0][0], reference) < 1e-5  # the reduction-order bound of test_trainer.py
    assert results[0][0] != Trainer(tiny(tmp_path / "free")).train().losses
