"""A small decoder-only transformer in the DeepSeek-V3 shape, built so that any slice of it is a stage.

- RMSNorm, rotary attention (plain multi-head, or DeepSeek's multi-head latent attention with
  ``attention = "mla"``), SwiGLU feed-forward blocks;
- the first ``n_dense_layers`` layers dense, the rest mixture-of-experts: shared expert(s) plus routed
  experts, top-k of sigmoid affinities normalised over the selected experts, and auxiliary-loss-free
  balancing (a per-expert bias that only steers selection, nudged after each step toward balance);
- tied or untied output head.

:class:`Stage` holds a contiguous slice (embedding? layers [a, b) head?) with the routed experts of one
expert-parallel rank, so the whole model (one stage, one rank) and any pipeline/expert-parallel cut
of it have the same parameter names (global layer and expert ids) and the same initial values. Each
layer is written as *phases* (attention, dispatch, MLP, combine) over a small state dict: the plain
forward chains them, the pipeline's overlapped forward/backward interleaves two micro-batches' phases.
The token exchange of a MoE layer goes through an injected :class:`~dualflow.train.exchange.Exchange`
(no communication in one process, ``dualflow.comm`` across ranks); the arithmetic is the same.

No tensor of the forward is read by more than two autograd nodes (hence the fused ``wqkv``, ``wkv_b`` and ``w13``,
the single-node RMSNorm, the experts' one permutation): its gradient is then a sum of at most two terms,
which floating-point addition gives the same whatever the order, so a backward run phase by phase
(the overlapped pipeline step) is bitwise equal to one autograd pass over the whole stage.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dualflow.launcher.config import ConfigError, OneOf, Range, check_fields
from dualflow.train.exchange import Exchange, LocalExchange
from dualflow.train.experts import GroupedExperts, per_expert_views

State = dict[str, Any]


class Phase(NamedTuple):
    """One piece of a stage's forward: ``kind`` "compute" or "comm" (what may overlap the other micro-batch's
    work), a name for profiles, ``fn(state) -> state``, the modules whose parameters it uses, and whether
    its shapes are the same at every step (``static``: what ``train.compile`` compiles)."""

    kind: str
    name: str
    fn: Callable[[State], State]
    modules: tuple[nn.Module, ...]
    static: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the model. Sizes are global: expert parallelism divides ``n_routed_experts``."""

    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_dense_layers: int = 1
    n_heads: int = 4
    dense_hidden: int = 384
    expert_hidden: int = 128
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    top_k: int = 2
    routed_scale: float = 1.0
    bias_update_speed: float = 0.001
    rope_theta: float = 10000.0
    # positions whose rotary cos/sin tables are precomputed (longer sequences compute theirs at every call)
    max_seq_len: int = 4096
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    # attention: "mha" (rotary multi-head) or "mla" (multi-head latent attention, DeepSeek-V2/V3): queries
    # through a rank-q_lora_rank latent (0: a direct projection), keys and values through one shared
    # rank-kv_lora_rank latent; each head's query/key is a qk_nope_head_dim part without positions plus
    # a qk_rope_head_dim rotary part (the key's rotary part shared by all heads); values v_head_dim wide.
    attention: str = "mha"
    q_lora_rank: int = 0
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    # group-limited routing (DeepSeek-V3): the routed experts form n_group groups of consecutive ids, a group
    # scores the sum of its two largest affinity + bias, and a token takes its top_k experts within the
    # topk_group best groups. group_by = "ep_ranks" or "nodes" makes the groups the expert-parallel ranks'
    # (or nodes') experts, set when the job starts (resolve_groups): each token then travels to at most
    # topk_group ranks (nodes), DeepSeek-V3's node-limited routing.
    n_group: int = 1
    topk_group: int = 1
    group_by: str = "experts"
    # multi-token prediction (DeepSeek-V3 section 2.2, dualflow.train.mtp): mtp_depth sequential modules on
    # the stage holding the head; training loss = main loss + mtp_loss_weight x mean of their losses.
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3

    def __post_init__(self) -> None:
        check_fields(self, "model", vocab_size=Range(ge=1), dim=Range(ge=1), n_layers=Range(ge=1),
                     n_dense_layers=Range(ge=0), n_heads=Range(ge=1), dense_hidden=Range(ge=1),
                     expert_hidden=Range(ge=1), n_routed_experts=Range(ge=1), n_shared_experts=Range(ge=0),
                     top_k=Range(ge=1), routed_scale=Range(gt=0), bias_update_speed=Range(ge=0, note="0: fixed biases"),
                     rope_theta=Range(gt=0), max_seq_len=Range(ge=1), norm_eps=Range(gt=0), init_std=Range(gt=0),
                     attention=OneOf("mha", "mla"),
                     q_lora_rank=Range(ge=0, note="0: no query latent"), kv_lora_rank=Range(ge=1),
                     qk_nope_head_dim=Range(ge=1), qk_rope_head_dim=Range(ge=2), v_head_dim=Range(ge=1),
                     n_group=Range(ge=1), topk_group=Range(ge=1), group_by=OneOf("experts", "ep_ranks", "nodes"),
                     mtp_depth=Range(ge=0, note="0: no multi-token prediction"), mtp_loss_weight=Range(gt=0))
        problems = []
        if self.attention == "mha" and (self.dim % self.n_heads or (self.dim // self.n_heads) % 2):
            problems.append(f"model.dim={self.dim} must split into model.n_heads={self.n_heads} heads of even size")
        if self.attention == "mla" and self.qk_rope_head_dim % 2:
            problems.append(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.n_dense_layers > self.n_layers:
            problems.append(f"model.n_dense_layers={self.n_dense_layers} must not exceed "
                            f"model.n_layers={self.n_layers}")
        if self.n_dense_layers < self.n_layers and self.top_k > self.n_routed_experts:
            problems.append(f"model.top_k={self.top_k} must not exceed model.n_routed_experts={self.n_routed_experts}")
        problems += self._routing_problems()
        if problems:
            raise ConfigError(problems, "invalid model config")

    def _routing_problems(self) -> list[str]:
        if self.group_by != "experts":  # n_group comes from the layout (resolve_groups), checked then
            return []
        if self.topk_group > self.n_group:
            return [f"model.topk_group={self.topk_group} must not exceed model.n_group={self.n_group}"]
        if self.n_group == 1 or not self.has_moe:
            return []
        size = self.n_routed_experts // self.n_group
        if self.n_routed_experts % self.n_group or size < 2:
            return [f"model.n_routed_experts={self.n_routed_experts} must split into model.n_group={self.n_group} "
                    "groups of at least 2 experts (a group scores the sum of its two best)"]
        if self.top_k > self.topk_group * size:
            return [f"model.top_k={self.top_k} exceeds the {self.topk_group * size} experts of model.topk_group="
                    f"{self.topk_group} groups of {size}: raise model.topk_group or lower model.top_k"]
        return []

    @property
    def has_moe(self) -> bool:
        """Whether any layer (multi-token prediction's included) is a mixture-of-experts layer."""
        return any(self.is_moe(i) for i in range(self.n_layers + self.mtp_depth))

    def is_moe(self, layer: int) -> bool:
        """Layer ``layer`` is MoE (ids from n_layers on are the multi-token prediction modules' layers)."""
        return layer >= self.n_dense_layers

    def resolve_groups(self, ep_size: int, ranks_per_node: int) -> ModelConfig:
        """This config with ``group_by`` turned into ``n_group`` for an expert-parallel group of ``ep_size``
        consecutive ranks, ``ranks_per_node`` of them per node (experts are placed in rank order);
        ``topk_group`` is capped at that ``n_group`` (one node: no limit to apply)."""
        if self.group_by == "experts":
            return self
        n = ep_size
        if self.group_by == "nodes":
            if ep_size > ranks_per_node and ep_size % ranks_per_node:
                raise ValueError(f"model.group_by='nodes': the {ep_size} expert-parallel ranks do not fill whole "
                                 f"nodes of {ranks_per_node} ranks; use group_by='ep_ranks' or another layout")
            n = max(1, ep_size // ranks_per_node)
        if self.n_group not in (1, n):
            raise ValueError(f"model.group_by={self.group_by!r} makes n_group={n}, but model.n_group="
                             f"{self.n_group} is set: leave n_group at 1 or use group_by='experts'")
        return dataclasses.replace(self, n_group=n, topk_group=min(self.topk_group, n), group_by="experts")

    def attention_weights(self) -> int:
        """Weights of one layer's attention projections (its norms not included)."""
        d, h = self.dim, self.n_heads
        if self.attention == "mha":
            return 4 * d * d
        qk = h * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        r = self.q_lora_rank
        q = d * r + r * qk if r else d * qk
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank * h * (
            self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + h * self.v_head_dim * d

    def attention_widths(self) -> tuple[int, int]:
        """(query/key width, value width) summed over the heads."""
        if self.attention == "mha":
            return self.dim, self.dim
        return (self.n_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim), self.n_heads * self.v_head_dim)

    def num_params(self, active: bool = False) -> int:
        """Parameter count (``active``: those one token uses, i.e. only ``top_k`` routed experts), the
        multi-token prediction modules included (each: three norms, a 2*dim x dim projection, a layer)."""
        latent_norms = (self.q_lora_rank + self.kv_lora_rank) if self.attention == "mla" else 0
        d, attn = self.dim, self.attention_weights() + 2 * self.dim + latent_norms
        expert = 3 * d * self.expert_hidden
        routed = self.top_k if active else self.n_routed_experts
        moe = attn + self.n_shared_experts * expert + routed * expert + self.n_routed_experts * d
        dense = attn + 3 * d * self.dense_hidden
        layers = sum(moe if self.is_moe(i) else dense for i in range(self.n_layers + self.mtp_depth))
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embed + d + layers + self.mtp_depth * (3 * d + 2 * d * d)


class _RMSNormFn(torch.autograd.Function):
    """``x / rms(x) * weight`` with a hand-written backward, so that ``x`` is read by one autograd node."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = _at_least_fp32(x)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return (xf * r * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        xhat = _at_least_fp32(x) * r
        g = _at_least_fp32(grad)
        gw = g * weight
        dx = r * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        dweight = (g * xhat).flatten(0, -2).sum(0)
        return dx.to(x.dtype), dweight.to(weight.dtype), None


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in FP32 (normalisation stays in high precision)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


def rotary_tables(seq: int, half: int, theta: float,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP32 ``(cos, sin)`` [seq, half] of rotary angle ``position * theta^(-j/half)`` for channel pair ``j``."""
    freqs = theta ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
    angles = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` [..., 2 * half] with each adjacent channel pair rotated by the angles of the tables, which
    broadcast against ``x`` [..., half] (``[seq, half]`` for ``x`` [..., seq, 2 * half])."""
    half = x.shape[-1] // 2
    xf = _at_least_fp32(x).unflatten(-1, (half, 2))
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of ``x`` [batch, heads, seq, head_dim] (pairs of adjacent channels)."""
    return apply_rotary(x, *rotary_tables(x.shape[-2], x.shape[-1] // 2, theta, x.device))


class Rotary(nn.Module):
    """:func:`rotary` with its cos/sin tables precomputed for ``max_seq`` positions (non-persistent
    buffers: they follow the module's device and stay out of checkpoints).

    Computed inside a compiled graph, the tables were recomputed for every element of ``x`` (a power, a
    cosine and a sine each: the rotary kernels ran at a fifth of the memory bandwidth, ~4 ms of an 80 ms
    step of configs/gpu1.toml on an H200; benchmarks/NOTES_gpu.md). Longer sequences compute theirs at
    every call, as :func:`rotary` does."""

    def __init__(self, head_dim: int, theta: float, max_seq: int) -> None:
        super().__init__()
        self.theta = theta
        cos, sin = rotary_tables(max_seq, head_dim // 2, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, seq_dim: int = -2) -> torch.Tensor:
        """``x`` rotated by the angles of its positions along ``seq_dim`` (the channels last)."""
        dims = x.dim()
        seq_dim = seq_dim % dims
        if seq_dim == dims - 1:
            raise ValueError(f"seq_dim must not be the channel dimension (the last of {dims})")
        seq = x.shape[seq_dim]
        cos, sin = ((self.cos[:seq], self.sin[:seq]) if seq <= self.cos.shape[0] else
                    rotary_tables(seq, x.shape[-1] // 2, self.theta, x.device))
        shape = (seq,) + (1,) * (dims - seq_dim - 2) + (cos.shape[-1],)  # broadcast over the dims in between
        return apply_rotary(x, cos.view(shape), sin.view(shape))


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.rotary = Rotary(cfg.dim // cfg.n_heads, cfg.rope_theta, cfg.max_seq_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.wqkv(x).view(b, s, 3, self.n_heads, -1).unbind(2)  # [b, s, heads, head_dim] each
        # rotated in the projection's own order, heads swapped with positions only as views for the
        # attention: rotated after the swap, the rotary's backward wrote the projection's gradient through
        # a transpose, at a fifth of the forward's speed (benchmarks/NOTES_gpu.md rows 35 and 37)
        q, k = self.rotary(q, seq_dim=1), self.rotary(k, seq_dim=1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, s, d))


def shared_input(x: torch.Tensor, layers: list[nn.Module]) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]``, through the layers' own path for one input read by several of
    them where their type has one (``Fp8Linear.shared_input``: ``x`` quantized once for all)."""
    kind = type(layers[0])
    shared = getattr(kind, "shared_input", None)
    if shared is not None and all(type(layer) is kind for layer in layers):
        return shared(x, layers)
    return [layer(x) for layer in layers]


class LatentAttention(nn.Module):
    """Causal multi-head latent attention (DeepSeek-V2/V3), computed with the keys and values expanded.

    ``q = wq_b(q_norm(wq_a(x)))`` (or ``wq(x)`` without a query latent) splits per head into a part
    without positions and a rotary part; ``wkv_a(x)`` gives the key/value latent and one rotary key part
    shared by all heads; ``wkv_b(kv_norm(latent))`` gives each head's key part without positions and its
    value. Scores use the full query/key width ``qk_nope_head_dim + qk_rope_head_dim``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope, self.rope, self.vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank, self.q_rank = cfg.kv_lora_rank, cfg.q_lora_rank
        qk = cfg.n_heads * (self.nope + self.rope)
        if self.q_rank:
            self.wq_a = nn.Linear(cfg.dim, self.q_rank, bias=False)
            self.q_norm = RMSNorm(self.q_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(self.q_rank, qk, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, qk, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.kv_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_rank, cfg.n_heads * (self.nope + self.vdim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.vdim, cfg.dim, bias=False)
        self.rotary = Rotary(self.rope, cfg.rope_theta, cfg.max_seq_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.n_heads
        q, kv_a = shared_input(x, [self.wq_a if self.q_rank else self.wq, self.wkv_a])
        if self.q_rank:
            q = self.wq_b(self.q_norm(q))
        # [b, s, heads, width] throughout, as Attention does: the heads swapped with positions only as views
        q_nope, q_rope = q.view(b, s, h, -1).split([self.nope, self.rope], dim=-1)
        latent, k_rope = kv_a.split([self.kv_rank, self.rope], dim=-1)
        k_nope, v = self.wkv_b(self.kv_norm(latent)).view(b, s, h, -1).split([self.nope, self.vdim], dim=-1)
        k_rope = self.rotary(k_rope, seq_dim=1)[:, :, None].expand(b, s, h, self.rope)  # shared by the heads
        q = torch.cat([q_nope, self.rotary(q_rope, seq_dim=1)], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        # scale 1/sqrt(nope + rope)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, s, h * self.vdim))


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x), with w1 and w3 as one [2 * hidden, dim] matrix ``w13``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def select_experts(biased: torch.Tensor, top_k: int, n_group: int = 1, topk_group: int = 1) -> torch.Tensor:
    """Ids of the ``top_k`` largest entries of ``biased`` [tokens, experts] (affinity + bias), in descending order.

    With ``n_group > 1`` (DeepSeek-V3's group-limited routing) the experts form ``n_group`` groups of
    consecutive ids, each scored by the sum of its two largest entries, and only the ``topk_group`` best
    groups of a token compete: the others are set to -inf before the top-k.
    """
    if n_group > 1:
        groups = biased.unflatten(-1, (n_group, -1))
        best = groups.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
        dropped = torch.ones(groups.shape[:-1], dtype=torch.bool, device=biased.device).scatter_(-1, best, False)
        biased = groups.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(-2)
    return torch.topk(biased, top_k, dim=-1, sorted=True).indices


class Router(nn.Module):
    """Sigmoid affinities, top-k selection on affinity + balancing bias (optionally group-limited, see
    :func:`select_experts`), weights normalised over the top-k.

    The gate runs in FP32 whatever the surrounding precision (the recipe keeps gating in high precision).
    ``bias`` only changes which experts are selected, never the weights; ``load`` counts the tokens each
    expert received in training forwards since the last :meth:`update_bias`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.group_by != "experts":
            raise ValueError(f"model.group_by={cfg.group_by!r} takes n_group from the parallel layout: build the "
                             "model from cfg.resolve_groups(ep_size, ranks_per_node) (the trainer does)")
        self.top_k, self.scale, self.speed = cfg.top_k, cfg.routed_scale, cfg.bias_update_speed
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            scores = torch.sigmoid(F.linear(_at_least_fp32(x), self.weight))
            idx = select_experts(scores.detach() + self.bias, self.top_k, self.n_group, self.topk_group)
            chosen = scores.gather(-1, idx)
            weights = chosen / chosen.sum(-1, keepdim=True) * self.scale
        if self.training and torch.is_grad_enabled():  # a scatter-add: bincount would sync with the host
            flat = idx.flatten()
            self.load.scatter_add_(0, flat, torch.ones_like(flat, dtype=self.load.dtype))
        return idx, weights

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Raise the bias of under-loaded experts and lower it for over-loaded ones by ``speed``."""
        self.bias += self.speed * torch.sign(load.mean() - load)
        self.load.zero_()


class MoE(nn.Module):
    """Shared expert(s) plus the routed experts ``expert_ids`` (global ids) hosted on this rank."""

    def __init__(self, cfg: ModelConfig, expert_ids: Iterable[int]) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.shared = MLP(cfg.dim, cfg.expert_hidden * cfg.n_shared_experts) if cfg.n_shared_experts else None
        self.experts = GroupedExperts(cfg.dim, cfg.expert_hidden, expert_ids)

    def routed(self, x: torch.Tensor, local_idx: torch.Tensor, weights: torch.Tensor,
               all_local: bool = False) -> torch.Tensor:
        """Weighted sum over each received row's local experts (ids in ``local_idx``, -1 = elsewhere).

        Grouped GEMMs over expert-contiguous rows (dualflow.train.experts), with no host synchronisation;
        ``all_local`` says that no id is -1.
        """
        return self.experts(x, local_idx, weights, all_local)


class Layer(nn.Module):
    """One transformer layer, dense or MoE, as phases: attn -> [dispatch] -> mlp -> [combine]."""

    def __init__(self, cfg: ModelConfig, layer_id: int, expert_ids: Iterable[int]) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = LatentAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.is_moe(layer_id):
            self.moe: MoE | None = MoE(cfg, expert_ids)
            self.mlp: MLP | None = None
        else:
            self.moe, self.mlp = None, MLP(cfg.dim, cfg.dense_hidden)
        # Set by the stage; not a submodule (it holds process groups, not parameters).
        self.exchange: Exchange = LocalExchange()

    def phase_attn(self, s: State) -> State:
        h = s["x"] + self.attn(self.attn_norm(s["x"]))
        xn = self.mlp_norm(h)
        if self.moe is None:
            return {"h": h, "xn": xn}
        flat = xn.flatten(0, 1)
        idx, weights = self.moe.gate(flat)
        return {"h": h, "xn": xn, "flat": flat, "idx": idx, "weights": weights}

    def phase_dispatch(self, s: State) -> State:
        recv = self.exchange.dispatch(s["flat"], s["idx"], s["weights"])
        return {"h": s["h"], "xn": s["xn"], "recv_x": recv.x, "recv_idx": recv.local_idx, "recv_w": recv.weights,
                "handle": recv.handle, "all_local": isinstance(self.exchange, LocalExchange)}

    def phase_mlp(self, s: State) -> State:
        if self.moe is None:
            return {"x": s["h"] + self.mlp(s["xn"])}
        y = self.moe.routed(s["recv_x"], s["recv_idx"], s["recv_w"], s.get("all_local", False))
        out = {"h": s["h"], "y": y, "handle": s["handle"]}
        if self.moe.shared is not None:
            out["shared"] = self.moe.shared(s["xn"])
        return out

    def phase_combine(self, s: State) -> State:
        routed = self.exchange.combine(s["y"], s["handle"]).view_as(s["h"])
        x = s["h"] + routed if "shared" not in s else s["h"] + s["shared"] + routed
        return {"x": x}

    def phases(self) -> list[Phase]:
        if self.moe is None:
            return [Phase("compute", f"L{self.layer_id}.attn", self.phase_attn, (self.attn_norm, self.attn,
                                                                                  self.mlp_norm)),
                    Phase("compute", f"L{self.layer_id}.mlp", self.phase_mlp, (self.mlp,))]
        return [Phase("compute", f"L{self.layer_id}.attn", self.phase_attn,
                      (self.attn_norm, self.attn, self.mlp_norm, self.moe.gate)),
                Phase("comm", f"L{self.layer_id}.dispatch", self.phase_dispatch, ()),
                # an expert-parallel rank receives a different number of rows at every step
                Phase("compute", f"L{self.layer_id}.mlp", self.phase_mlp,
                      (self.moe.experts,) + ((self.moe.shared,) if self.moe.shared is not None else ()),
                      static=isinstance(self.exchange, LocalExchange)),
                Phase("comm", f"L{self.layer_id}.combine", self.phase_combine, ())]


class Stage(nn.Module):
    """A contiguous slice of the model: embedding (``first``), layers ``layer_ids``, norm + head (``last``).

    ``expert_ids`` selects the routed experts this rank hosts (all of them without expert parallelism).
    Input: token ids [batch, seq] on the first stage, hidden states [batch, seq, dim] elsewhere.
    Output: logits [batch, seq, vocab] on the last stage, hidden states elsewhere.

    With multi-token prediction (``cfg.mtp_depth > 0``, dualflow.train.mtp) the last stage also holds its
    modules and returns the main logits followed by each depth's along the sequence; a stage that is not
    the first then takes ``(hidden, token ids)``, and one that is not the last returns them.
    """

    def __init__(self, cfg: ModelConfig, layer_ids: Iterable[int], *, first: bool, last: bool,
                 expert_ids: Iterable[int] | None = None, compute_dtype: torch.dtype = torch.float32,
                 tied_embed: nn.Embedding | None = None) -> None:
        super().__init__()
        self.cfg, self.first, self.last, self.compute_dtype = cfg, first, last, compute_dtype
        experts = list(range(cfg.n_routed_experts) if expert_ids is None else expert_ids)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim) if first else None
        self.layers = nn.ModuleDict({str(i): Layer(cfg, i, experts) for i in layer_ids})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps) if last else None
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False) if last and not cfg.tie_embeddings else None
        self.mtp: Any = None
        self.compiler: Any = None  # a dualflow.train.compile.PhaseCompiler (train.compile)
        if last and cfg.mtp_depth:
            from dualflow.train.mtp import MultiTokenPrediction

            self.mtp = MultiTokenPrediction(cfg, experts)
        # A tied head and multi-token prediction use the embedding of this stage or of the first stage held
        # by the same rank (``tied_embed``); it is kept out of the submodules so that the parameter has one
        # owner (and one name).
        self._shared_embed = [self.embed or tied_embed] if last and (cfg.tie_embeddings or cfg.mtp_depth) else []
        if self._shared_embed and self._shared_embed[0] is None:
            raise ValueError("tie_embeddings and mtp_depth > 0 need the embedding on the rank that holds the head: "
                             "pass the first stage's embedding as tied_embed, or use a schedule that places the "
                             "first and last stage on one rank (DualPipe, DualPipeV); otherwise set "
                             "tie_embeddings = false and mtp_depth = 0")

    def all_layers(self) -> list[Layer]:
        """The stage's layers, those of its multi-token prediction modules included."""
        return list(self.layers.values()) + (self.mtp.layers() if self.mtp is not None else [])

    def set_exchange(self, exchange: Exchange) -> None:
        """Route every MoE layer's tokens through ``exchange``."""
        for layer in self.all_layers():
            layer.exchange = exchange

    def moe_routers(self) -> dict[int, Router]:
        return {layer.layer_id: layer.moe.gate for layer in self.all_layers() if layer.moe is not None}

    def phase_embed(self, s: State) -> State:
        if self.mtp is not None:  # the ids ahead are embedded in the same lookup
            from dualflow.train.mtp import embed_ahead

            return embed_ahead(self.embed, s["x"], self.cfg.mtp_depth, self.compute_dtype, main=True,
                               tied_head=self.cfg.tie_embeddings)
        out = {"x": self.embed(s["x"]).to(self.compute_dtype)}
        if self.cfg.mtp_depth:  # a first stage of a pipeline: the ids travel on to the last stage
            out["mtp_tokens"] = s["x"]
        return out

    def phase_embed_ahead(self, s: State) -> State:
        from dualflow.train.mtp import embed_ahead

        ahead = embed_ahead(self._shared_embed[0], s["mtp_tokens"], self.cfg.mtp_depth, self.compute_dtype,
                            main=False, tied_head=self.cfg.tie_embeddings)
        return {"x": s["x"], **ahead}

    def phase_head(self, s: State) -> State:
        x = self.norm(s["x"]) if self.mtp is None else torch.cat([self.norm(s["mtp_h0"]), *self.mtp.normed(s)], 1)
        weight = self.head.weight if self.head is not None else s.get("mtp_head", self._shared_embed[0].weight)
        return {"x": _at_least_fp32(F.linear(x, weight))}

    def phases(self) -> list[Phase]:
        """The stage's forward as a sequence of phases (what the overlapped pipeline step interleaves)."""
        # train.compile; applied before `carrying` below, which wraps each function anew at every call
        compiled = self.compiler.wrap if self.compiler is not None else (lambda p: p)
        out = [Phase("compute", "embed", self.phase_embed, (self.embed,))] if self.first else []
        for layer in self.layers.values():
            out += layer.phases()
        out = [compiled(p) for p in out]
        if self.mtp is not None:
            if not self.first:
                out.append(Phase("compute", "mtp.embed", self.phase_embed_ahead, (self._shared_embed[0],)))
            out += self.mtp.phases()
        if self.cfg.mtp_depth:
            from dualflow.train.mtp import carrying

            out = [carrying(p) for p in out]
        if self.last:
            if self.head is not None:
                head: tuple[nn.Module, ...] = (self.head,)
            else:  # tied; with multi-token prediction its weight comes through the state (mtp.embed_ahead)
                head = () if self.mtp is not None else (self._shared_embed[0],)
            norms = tuple(m.norm for m in self.mtp.values()) if self.mtp is not None else ()
            out.append(compiled(Phase("compute", "head", self.phase_head, (self.norm, *head, *norms))))
        return out

    def input_state(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> State:
        """The state the first phase reads: ``x``, and the token ids a later stage with MTP needs."""
        if not self.cfg.mtp_depth or self.first:
            return {"x": x}
        if tokens is None:
            raise ValueError("with model.mtp_depth > 0 a stage after the first takes (hidden states, token ids): "
                             "pass the ids the previous stage returned beside its hidden states")
        return {"x": x, "mtp_tokens": tokens}

    def output(self, s: State) -> Any:
        """The stage's output from the last phase's state: ``x``, with the token ids before the last stage."""
        if "mtp_tokens" in s and not self.last:  # a copy: a stage output must not alias its input
            return s["x"], s["mtp_tokens"].clone()
        return s["x"]

    def autocast(self, device: torch.device) -> Any:
        # no weight-cast cache: each weight is cast once per forward anyway, and a CUDA-graph capture of the
        # step must not keep casts made during the capture (train/graphs.py)
        return torch.autocast(device.type, dtype=self.compute_dtype,
                              enabled=self.compute_dtype in (torch.bfloat16, torch.float16), cache_enabled=False)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> Any:
        state = self.input_state(x, tokens)
        with self.autocast(x.device):
            for phase in self.phases():
                state = phase.fn(state)
        return self.output(state)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic per-parameter initialisation keyed by the parameter's global name.

        Any partition of the model (stages, expert shards) therefore starts from the same values as the
        whole model in one process.
        """
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        experts = {name: m.expert_ids for name, m in self.named_modules() if isinstance(m, GroupedExperts)}
        for param_name, param in self.named_parameters():
            owner = param_name.rpartition(".")[0]
            # stacked experts: each expert from its own global name, so any expert-parallel split matches
            for name, p in per_expert_views(param_name, param, experts.get(owner, ())).items():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                    continue
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                scale = out_std if name.endswith(("wo.weight", "w2.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
        for router in self.moe_routers().values():
            router.bias.zero_()
            router.load.zero_()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in FP32 over every position."""
    return F.cross_entropy(_at_least_fp32(logits).flatten(0, -2), labels.flatten())


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
