"""Balanced cut of the model into pipeline stages, and which stages each pipeline rank holds.

The cost of a piece is its forward FLOPs per token (backward is a fixed multiple of it, so the
balance is the same): the embedding (a row gather and, backward, a scatter-add: 2*dim), each layer
(attention projections and scores, dense or routed+shared MLP, router), and the final norm plus head
(2*dim*vocab). Stage 0 carries the embedding and the last stage the head, and the cut minimises the
most expensive stage exactly (dynamic programming over contiguous cuts).
"""

from __future__ import annotations

import functools

from dualflow.train.model import ModelConfig

SCHEDULES = ("dualpipev", "dualpipe", "1f1b", "zb1p")


def layer_flops(cfg: ModelConfig, layer: int, seq_len: int) -> float:
    """Forward FLOPs per token of layer ``layer``."""
    d = cfg.dim
    qk, v = cfg.attention_widths()
    # projections, then scores and values over the whole sequence (the usual MFU convention, which does
    # not halve them for the causal mask): 8 d^2 + 4 seq d for plain multi-head attention
    attn = 2 * cfg.attention_weights() + 2 * seq_len * (qk + v)
    if not cfg.is_moe(layer):
        return attn + 2 * 3 * d * cfg.dense_hidden
    experts = 2 * 3 * d * cfg.expert_hidden * (cfg.top_k + cfg.n_shared_experts)
    return attn + experts + 2 * d * cfg.n_routed_experts


def stage_costs(cfg: ModelConfig, seq_len: int) -> tuple[float, list[float], float]:
    """(embedding, per-layer, head) forward FLOPs per token; the head's share includes the multi-token
    prediction modules on its stage (each: a 2*dim x dim projection, a layer, the head again)."""
    mtp = sum(4.0 * cfg.dim ** 2 + layer_flops(cfg, cfg.n_layers + k, seq_len) for k in range(cfg.mtp_depth))
    return (2.0 * cfg.dim, [layer_flops(cfg, i, seq_len) for i in range(cfg.n_layers)],
            2.0 * cfg.dim * cfg.vocab_size * (1 + cfg.mtp_depth) + mtp)


def balanced_partition(layer_costs: list[float], n_stages: int, first_extra: float = 0.0,
                       last_extra: float = 0.0) -> list[range]:
    """Contiguous layer ranges, one per stage, each non-empty, minimising the largest stage cost.

    ``first_extra``/``last_extra`` are added to the first/last stage (embedding, head). Ties go to the cut
    that puts layers earlier.
    """
    n = len(layer_costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot cut {n} layers into {n_stages} non-empty stages: use at most {n} stages "
                         f"(fewer pipeline ranks) or a deeper model")
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int, stage: int) -> float:
        return (prefix[b] - prefix[a] + (first_extra if stage == 0 else 0.0)
                + (last_extra if stage == n_stages - 1 else 0.0))

    @functools.cache
    def best(start: int, stage: int) -> tuple[float, tuple[int, ...]]:
        # layers [start, n) into stages [stage, n_stages): (max cost, end of each stage)
        if stage == n_stages - 1:
            return cost(start, n, stage), (n,)
        options = []
        for end in range(start + 1, n - (n_stages - stage - 1) + 1):
            rest, ends = best(end, stage + 1)
            options.append((max(cost(start, end, stage), rest), (end, *ends)))
        return min(options, key=lambda o: o[0])

    ends = best(0, 0)[1]
    starts = (0, *ends[:-1])
    return [range(a, b) for a, b in zip(starts, ends)]


def num_stages(schedule: str, pp: int) -> int:
    """Model stages for a schedule on ``pp`` pipeline ranks (DualPipeV cuts the model into 2*pp)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} unknown; choose one of {', '.join(SCHEDULES)}")
    return 2 * pp if schedule == "dualpipev" else pp


def rank_stages(schedule: str, pp: int, pp_rank: int) -> tuple[int, ...]:
    """Stage ids a pipeline rank holds, in the order its pipeline runtime expects its modules.

    DualPipeV: stages r and 2P-1-r. DualPipe: stages r and P-1-r (each stage lives on two ranks).
    1F1B, ZB1P: stage r.
    """
    n = num_stages(schedule, pp)
    if schedule in ("dualpipev", "dualpipe"):
        return (pp_rank, n - 1 - pp_rank)
    return (pp_rank,)
