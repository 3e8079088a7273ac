"""A small decoder-only transformer in the DeepSeek-V3 shape, built so that any slice of it is a stage.

- RMSNorm, rotary multi-head attention, SwiGLU feed-forward blocks;
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
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dualflow.train.exchange import Exchange, LocalExchange

State = dict[str, Any]


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
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        problems = []
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            problems.append(f"dim={self.dim} must split into n_heads={self.n_heads} heads of even size")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            problems.append(f"n_dense_layers={self.n_dense_layers} must lie in [0, n_layers={self.n_layers}]")
        if self.n_dense_layers < self.n_layers and not 1 <= self.top_k <= self.n_routed_experts:
            problems.append(f"top_k={self.top_k} must lie in [1, n_routed_experts={self.n_routed_experts}]")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "dense_hidden", "expert_hidden"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    def is_moe(self, layer: int) -> bool:
        return layer >= self.n_dense_layers

    def num_params(self, active: bool = False) -> int:
        """Parameter count (``active``: those one token uses, i.e. only ``top_k`` routed experts)."""
        d, attn = self.dim, 4 * self.dim * self.dim + 2 * self.dim
        expert = 3 * d * self.expert_hidden
        routed = self.top_k if active else self.n_routed_experts
        moe = attn + self.n_shared_experts * expert + routed * expert + self.n_routed_experts * d
        dense = attn + 3 * d * self.dense_hidden
        n_moe = self.n_layers - self.n_dense_layers
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embed + d + self.n_dense_layers * dense + n_moe * moe


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in FP32 (normalisation stays in high precision)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _at_least_fp32(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).to(x.dtype)


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of ``x`` [batch, heads, seq, head_dim] (pairs of adjacent channels)."""
    seq, half = x.shape[-2], x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = torch.outer(torch.arange(seq, device=x.device, dtype=torch.float32), freqs)
    cos, sin = angles.cos(), angles.sin()
    xf = _at_least_fp32(x).unflatten(-1, (half, 2))
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.theta = cfg.n_heads, cfg.rope_theta
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(cfg.dim, cfg.dim, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (w(x).view(b, s, self.n_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(rotary(q, self.theta), rotary(k, self.theta), v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    """Sigmoid affinities, top-k selection on affinity + balancing bias, weights normalised over the top-k.

    The gate runs in FP32 whatever the surrounding precision (the recipe keeps gating in high precision).
    ``bias`` only changes which experts are selected, never the weights; ``load`` counts the tokens each
    expert received in training forwards since the last :meth:`update_bias`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.scale, self.speed = cfg.top_k, cfg.routed_scale, cfg.bias_update_speed
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            scores = torch.sigmoid(F.linear(_at_least_fp32(x), self.weight))
            idx = torch.topk(scores.detach() + self.bias, self.top_k, dim=-1, sorted=True).indices
            chosen = scores.gather(-1, idx)
            weights = chosen / chosen.sum(-1, keepdim=True) * self.scale
        if self.training and torch.is_grad_enabled():
            self.load += torch.bincount(idx.flatten(), minlength=self.load.numel()).to(self.load.dtype)
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
        self.experts = nn.ModuleDict({str(e): MLP(cfg.dim, cfg.expert_hidden) for e in expert_ids})

    def routed(self, x: torch.Tensor, local_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum over each received row's local experts (ids in ``local_idx``, -1 = elsewhere)."""
        acc = torch.promote_types(x.dtype, torch.float32)
        y = torch.zeros(x.shape, dtype=acc, device=x.device)
        for local, expert in enumerate(self.experts.values()):
            rows, slot = (local_idx == local).nonzero(as_tuple=True)
            if rows.numel():
                out = expert(x[rows]).to(acc) * weights[rows, slot].unsqueeze(-1).to(acc)
                y = y.index_add(0, rows, out)
        return y.to(x.dtype)


class Layer(nn.Module):
    """One transformer layer, dense or MoE, as phases: attn -> [dispatch] -> mlp -> [combine]."""

    def __init__(self, cfg: ModelConfig, layer_id: int, expert_ids: Iterable[int]) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
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
        return {"h": h, "xn": xn, "idx": idx, "weights": weights}

    def phase_dispatch(self, s: State) -> State:
        recv = self.exchange.dispatch(s["xn"].flatten(0, 1), s["idx"], s["weights"])
        return {"h": s["h"], "xn": s["xn"], "recv": recv}

    def phase_mlp(self, s: State) -> State:
        if self.moe is None:
            return {"x": s["h"] + self.mlp(s["xn"])}
        recv = s["recv"]
        y = self.moe.routed(recv.x, recv.local_idx, recv.weights)
        out = {"h": s["h"], "y": y, "handle": recv.handle}
        if self.moe.shared is not None:
            out["shared"] = self.moe.shared(s["xn"])
        return out

    def phase_combine(self, s: State) -> State:
        routed = self.exchange.combine(s["y"], s["handle"]).view_as(s["h"])
        x = s["h"] + routed if "shared" not in s else s["h"] + s["shared"] + routed
        return {"x": x}

    def phases(self) -> list[tuple[str, Callable[[State], State]]]:
        """(kind, function) pairs; kind is "compute" or "comm" (what may overlap the other micro-batch)."""
        if self.moe is None:
            return [("compute", self.phase_attn), ("compute", self.phase_mlp)]
        return [("compute", self.phase_attn), ("comm", self.phase_dispatch), ("compute", self.phase_mlp),
                ("comm", self.phase_combine)]


class Stage(nn.Module):
    """A contiguous slice of the model: embedding (``first``), layers ``layer_ids``, norm + head (``last``).

    ``expert_ids`` selects the routed experts this rank hosts (all of them without expert parallelism).
    Input: token ids [batch, seq] on the first stage, hidden states [batch, seq, dim] elsewhere.
    Output: logits [batch, seq, vocab] on the last stage, hidden states elsewhere.
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
        # A tied head borrows the embedding of this stage or of the first stage held by the same rank;
        # it is kept out of the submodules so the parameter has one owner (and one name).
        self._tied = [self.embed or tied_embed] if last and cfg.tie_embeddings else []
        if self._tied and self._tied[0] is None:
            raise ValueError("tie_embeddings needs the embedding on the rank that holds the head: pass the "
                             "first stage's embedding as tied_embed, set tie_embeddings = false, or use a "
                             "schedule that places the first and last stage on one rank (DualPipe, DualPipeV)")

    def set_exchange(self, exchange: Exchange) -> None:
        """Route every MoE layer's tokens through ``exchange``."""
        for layer in self.layers.values():
            layer.exchange = exchange

    def moe_routers(self) -> dict[int, Router]:
        return {layer.layer_id: layer.moe.gate for layer in self.layers.values() if layer.moe is not None}

    def phase_embed(self, s: State) -> State:
        return {"x": self.embed(s["x"]).to(self.compute_dtype)}

    def phase_head(self, s: State) -> State:
        x = self.norm(s["x"])
        weight = self.head.weight if self.head is not None else self._tied[0].weight
        return {"x": _at_least_fp32(F.linear(x, weight))}

    def phases(self) -> list[tuple[str, Callable[[State], State]]]:
        out = [("compute", self.phase_embed)] if self.first else []
        for layer in self.layers.values():
            out += layer.phases()
        return out + ([("compute", self.phase_head)] if self.last else [])

    def autocast(self, device: torch.device) -> Any:
        return torch.autocast(device.type, dtype=self.compute_dtype,
                              enabled=self.compute_dtype in (torch.bfloat16, torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state: State = {"x": x}
        with self.autocast(x.device):
            for _, fn in self.phases():
                state = fn(state)
        return state["x"]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic per-parameter initialisation keyed by the parameter's global name.

        Any partition of the model (stages, expert shards) therefore starts from the same values as the
        whole model in one process.
        """
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
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
