"""Balanced stage cut against brute force; stage placement per schedule."""

from __future__ import annotations

import itertools
import random

import pytest

from dualflow.train.model import ModelConfig
from dualflow.train.partition import balanced_partition, num_stages, rank_stages, stage_costs


def _brute_force(costs, n_stages, first, last):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        bounds = (0, *cuts, n)
        loads = [sum(costs[a:b]) for a, b in itertools.pairwise(bounds)]
        loads[0] += first
        loads[-1] += last
        if best is None or max(loads) < best:
            best = max(loads)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_partition_is_optimal(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    stages = rng.randint(1, n)
    costs = [rng.choice([1.0, 2.0, 5.0, rng.random() * 10]) for _ in range(n)]
    first, last = rng.random() * 8, rng.random() * 8
    parts = balanced_partition(costs, stages, first, last)
    assert len(parts) == stages and all(len(p) for p in parts)
    assert [i for p in parts for i in p] == list(range(n))
    loads = [sum(costs[i] for i in p) for p in parts]
    loads[0] += first
    loads[-1] += last
    assert max(loads) == pytest.approx(_brute_force(costs, stages, first, last))


def test_head_cost_pulls_layers_off_the_last_stage():
    sizes = {}
    for vocab in (256, 4096):
        embed, layers, head = stage_costs(ModelConfig(dim=64, n_layers=6, vocab_size=vocab), seq_len=128)
        sizes[vocab] = [len(p) for p in balanced_partition(layers, 3, embed, head)]
    assert sizes[256] == [2, 2, 2]
    assert sizes[4096][-1] == 1 and sum(sizes[4096]) == 6


def test_too_many_stages_is_an_error():
    with pytest.raises(ValueError, match="non-empty stages"):
        balanced_partition([1.0, 1.0], 3)


def test_rank_stages():
    assert num_stages("dualpipev", 2) == 4 and rank_stages("dualpipev", 2, 0) == (0, 3)
    assert rank_stages("dualpipev", 2, 1) == (1, 2)
    assert rank_stages("dualpipe", 4, 1) == (1, 2) and rank_stages("dualpipe", 4, 3) == (3, 0)
    assert rank_stages("1f1b", 3, 2) == (2,) and num_stages("zb1p", 3) == 3
    with pytest.raises(ValueError, match="unknown"):
        num_stages("gpipe", 2)
