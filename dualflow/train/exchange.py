"""How a MoE layer's tokens reach their experts and come back.

:class:`Exchange` is the two calls a layer makes: ``dispatch`` sends each token to the ranks hosting its
selected experts and ``combine`` sums the expert outputs back at the token's source. Experts are
numbered globally; a rank of an expert-parallel group of size R hosts experts
``[rank * E/R, (rank+1) * E/R)`` and sees them as local ids ``0 .. E/R-1``.

:class:`LocalExchange` is the single-process case: every expert is local, nothing moves, the identity
in both directions. The expert-parallel exchange over ``dualflow.comm`` is in ``dualflow.train.ep``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch


@dataclasses.dataclass
class Received:
    """Rows delivered to this rank: ``x`` [N, H], ``local_idx`` [N, k] (-1 = not here), ``weights`` [N, k]."""

    x: torch.Tensor
    local_idx: torch.Tensor
    weights: torch.Tensor
    handle: Any = None


class Exchange(Protocol):
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> Received: ...

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor: ...


class LocalExchange:
    """All experts in this process: dispatch and combine are the identity."""

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> Received:
        return Received(x, topk_idx, topk_weights)

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        return y
