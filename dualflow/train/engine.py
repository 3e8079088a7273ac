"""Runs the forward and backward of one global step over this rank's stages.

An engine's ``step(inputs, labels)`` leaves the gradients of ``loss / (micro-batches * dp)`` in the
parameters and returns ``(sum of micro-batch losses, number of micro-batches)`` as seen by this rank
(zero of both on ranks that hold no loss); ``evaluate`` does the same forward-only. The loss is an
:class:`~dualflow.train.mtp.Objective`'s: the gradient is that of its total (multi-token prediction
included), the sum reported is that of the next-token losses. Inputs and labels
are this data-parallel rank's share of the global batch.

- :class:`LocalEngine`: no pipeline (``pp == 1``): the micro-batches one after the other.
- :class:`PipelinedEngine` (``dualflow.train.pipeline``): the schedules of ``dualflow.dualpipe``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from dualflow.train.model import Stage
from dualflow.train.mtp import Objective


class Engine(Protocol):
    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]: ...

    def evaluate(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]: ...


class LocalEngine:
    """The whole model on this rank (possibly with its experts spread over the data-parallel group)."""

    def __init__(self, stage: Stage, microbatches: int, loss_scale: float, objective: Objective | None = None) -> None:
        if not (stage.first and stage.last):
            raise ValueError("LocalEngine runs a stage that holds the whole model (first and last)")
        self.stage, self.chunks, self.scale = stage, microbatches, loss_scale
        self.objective = objective or Objective(stage.cfg)

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        # the loss sum stays on the device: the caller reads it once, after the whole step
        total = torch.zeros((), dtype=torch.float64, device=inputs.device)
        for x, y in zip(inputs.chunk(self.chunks), labels.chunk(self.chunks)):
            loss, main = self.objective(self.stage(x), y)
            (loss * self.scale).backward()
            total += main.detach().double()
        return total, self.chunks

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        total = torch.zeros((), dtype=torch.float64, device=inputs.device)
        for x, y in zip(inputs.chunk(self.chunks), labels.chunk(self.chunks)):
            total += self.objective(self.stage(x), y)[1].double()
        return total, self.chunks
