"""Multi-token prediction (DeepSeek-V3 section 2.2): modules that predict the tokens after the next one.

Module ``k`` (1 .. ``mtp_depth``) takes the hidden state ``h^{k-1}_i`` of depth ``k-1`` (depth 0: the main
model's last layer, before its final norm) and the embedding of token ``t_{i+k}``::

    h'_i  = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])       i = 0 .. seq-k-1
    h^k   = Layer(h')                                                one transformer layer (MoE where the
    P^k_i = head(norm_k(h^k_i))  ~  t_{i+k+1}                         model's layers are), causal over i

with the embedding and the output head shared with the main model (DeepSeek's own checkpoints concatenate
the embedding first, which fixes the layout of ``eh_proj``). The modules live on the stage that holds the
head; in a pipeline the token ids travel with the hidden states from the first stage. That stage returns
one logits tensor, the main positions followed by each depth's (``seq + (seq-1) + ... + (seq-D)`` rows per
sequence, one GEMM through the head); :func:`split_logits` cuts it, :class:`Objective` turns it into
``main loss + mtp_loss_weight * mean(MTP losses)``. A model without the modules is the same model minus
them (:func:`drop_mtp`): they only add a training signal and can be left out at inference.

State keys of the phases (``dualflow.train.model``): ``mtp_tokens`` (token ids on their way to the last
stage), ``mtp_emb{k}`` (embeddings of ``t_{i+k}``), ``mtp_h{k}`` (depth k's hidden state, kept for the
head), ``mtp_head`` (a tied head's weight); every phase of a stage that predicts further tokens carries
the ``mtp_`` keys it does not consume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from dualflow.train.model import Layer, ModelConfig, Phase, RMSNorm, State, cross_entropy


def carrying(phase: Phase) -> Phase:
    """``phase`` that also passes on the ``mtp_`` entries of its input state that it does not return."""

    def fn(s: State) -> State:
        out = phase.fn(s)
        for key, value in s.items():
            if key.startswith("mtp_") and key not in out:
                out[key] = value
        return out

    return phase._replace(fn=fn)


def embed_ahead(embed: nn.Module, ids: torch.Tensor, depth: int, dtype: torch.dtype, main: bool,
                tied_head: bool) -> State:
    """``mtp_emb{k}`` = embeddings of ``ids[:, k:]`` for k = 1 .. depth (and ``x`` = those of ``ids`` if ``main``).

    One lookup for all of them, so that the embedding weight is read by one node of the graph. A tied head
    reads the weight through ``mtp_head``, a view made here: a phase's backward reaches a parameter only
    from inside the phase, and the head's phase comes after this one (the weight then has two readers, the
    lookup and the view, and the phase-by-phase backward stays bitwise equal to autograd's).
    """
    parts = ([ids] if main else []) + [ids[:, k:] for k in range(1, depth + 1)]
    if ids.shape[-1] <= depth:
        raise ValueError(f"multi-token prediction of depth {depth} needs sequences longer than {depth} tokens, "
                         f"got {ids.shape[-1]}: lengthen data.seq_len or lower model.mtp_depth")
    rows = embed(torch.cat(parts, dim=1)).to(dtype).split([p.shape[1] for p in parts], dim=1)
    out: State = {f"mtp_emb{k}": e for k, e in zip(range(1, depth + 1), rows[1:] if main else rows)}
    if main:
        out["x"] = rows[0]
    if tied_head:
        out["mtp_head"] = embed.weight.view_as(embed.weight)
    return out


class MTPModule(nn.Module):
    """Depth ``depth`` of multi-token prediction: the two norms and projection, one layer, its final norm."""

    def __init__(self, cfg: ModelConfig, depth: int, expert_ids: Iterable[int]) -> None:
        super().__init__()
        self.depth = depth
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.layer = Layer(cfg, cfg.n_layers + depth - 1, expert_ids)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def phase_in(self, s: State) -> State:
        """``x`` (depth k-1's hidden state, kept as ``mtp_h{k-1}``) and ``mtp_emb{k}`` -> the layer's input."""
        k, h = self.depth, s["x"]
        emb = s[f"mtp_emb{k}"]
        out = {key: v for key, v in s.items() if key.startswith("mtp_") and key != f"mtp_emb{k}"}
        out[f"mtp_h{k - 1}"] = h
        out["x"] = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h[:, :emb.shape[1]])], dim=-1))
        return out


class MultiTokenPrediction(nn.ModuleDict):
    """The modules of depths 1 .. ``mtp_depth`` (keys "1", "2", ...) and their phases on the last stage."""

    def __init__(self, cfg: ModelConfig, expert_ids: Iterable[int]) -> None:
        experts = list(expert_ids)
        super().__init__({str(k): MTPModule(cfg, k, experts) for k in range(1, cfg.mtp_depth + 1)})
        self.depth = cfg.mtp_depth

    def layers(self) -> list[Layer]:
        return [m.layer for m in self.values()]

    def phases(self) -> list[Phase]:
        """Each depth's input phase, then its layer's phases (the stage wraps them all in :func:`carrying`)."""
        out = []
        for m in self.values():
            out.append(Phase("compute", f"mtp{m.depth}.in", m.phase_in, (m.enorm, m.hnorm, m.eh_proj)))
            out += m.layer.phases()
        return out

    def normed(self, s: State) -> list[torch.Tensor]:
        """Each depth's final norm of its hidden state (the last depth's is ``x``), for the shared head."""
        mods = list(self.values())
        return [m.norm(s[f"mtp_h{m.depth}"]) for m in mods[:-1]] + [mods[-1].norm(s["x"])]


def split_logits(logits: torch.Tensor, seq_len: int, depth: int) -> tuple[torch.Tensor, ...]:
    """The last stage's output [batch, seq + (seq-1) + ... + (seq-depth), vocab] cut into the main logits and
    each depth's ([batch, seq - k, vocab] for depth k: position i predicts token i + k + 1)."""
    sizes = [seq_len - k for k in range(depth + 1)]
    if logits.shape[1] != sum(sizes):
        raise ValueError(f"logits have {logits.shape[1]} positions; a sequence of {seq_len} with multi-token "
                         f"prediction of depth {depth} gives {sum(sizes)}: are model.mtp_depth and the labels "
                         "those of the model that produced them?")
    return logits.split(sizes, dim=1)


class Objective:
    """The training loss of the last stage's output against the labels (next tokens, [batch, seq]).

    ``objective(logits, labels) -> (loss, main)``: ``main`` is the next-token cross-entropy; ``loss`` adds
    ``mtp_loss_weight`` x the mean over depths of the MTP cross-entropies (depth k against the labels from
    position k on), or is ``main`` itself without multi-token prediction. Each call records the MTP losses
    and, when gradients are off (validation), each depth's accuracy; :meth:`take` returns their sums since
    the last take.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        self.depth, self.weight = cfg.mtp_depth, cfg.mtp_loss_weight
        self._losses: list[torch.Tensor] = []
        self._accuracies: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.depth:
            loss = cross_entropy(logits, labels)
            return loss, loss
        parts = split_logits(logits, labels.shape[-1], self.depth)
        main = cross_entropy(parts[0], labels)
        mtp = torch.stack([cross_entropy(parts[k], labels[:, k:]) for k in range(1, self.depth + 1)])
        self._losses.append(mtp.detach())
        if not torch.is_grad_enabled():
            self._accuracies.append(torch.stack([(parts[k].argmax(-1) == labels[:, k:]).double().mean()
                                                 for k in range(1, self.depth + 1)]))
        return main + self.weight * mtp.mean(), main

    def take(self) -> tuple[list[float], list[float]]:
        """(per-depth sums of the MTP losses, per-depth sums of the accuracies) since the last call; zeros
        where nothing was recorded. Lists of ``mtp_depth`` floats on every rank (ready for one all-reduce)."""
        sums = [torch.stack(v).double().sum(0).cpu().tolist() if v else [0.0] * self.depth
                for v in (self._losses, self._accuracies)]
        self._losses, self._accuracies = [], []
        return sums[0], sums[1]


def drop_mtp(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and state of the same model without its multi-token prediction modules (for inference)."""
    return (dataclasses.replace(cfg, mtp_depth=0),
            {k: v for k, v in state_dict.items() if not k.startswith("mtp.")})
