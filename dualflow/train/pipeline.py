"""The trainer's engine over ``dualflow.dualpipe``: DualPipeV, DualPipe, 1F1B or ZB1P on this rank's stages.

Where the micro-batches enter and where their losses are computed follows the runtime's placement:
DualPipeV and the single-direction schedules take inputs on the first pipeline rank and labels on the
rank that holds the last stage (rank 0 for DualPipeV); DualPipe feeds the first half of the batch in at
rank 0 and the second half at the last rank, each computing the loss of the other half.
"""

from __future__ import annotations

import torch

from dualflow.dualpipe import DualPipe, DualPipeV
from dualflow.dualpipe import PipelineEngine as Runtime
from dualflow.train.model import Stage
from dualflow.train.mtp import Objective
from dualflow.train.parallel import ParallelConfig, ParallelLayout
from dualflow.train.stage import OverlappedStage, PipelineStage


class PipelinedEngine:
    """Runs one global step's micro-batches through the pipeline runtime (see engine.py for the contract)."""

    def __init__(self, stages: list[Stage], layout: ParallelLayout, cfg: ParallelConfig, loss_scale: float,
                 objective: Objective | None = None) -> None:
        wrap = OverlappedStage if cfg.overlap else PipelineStage
        self.modules = [wrap(s) for s in stages]
        if cfg.overlap and layout.device.type == "cuda":
            stream = torch.cuda.Stream(layout.device)
            for m in self.modules:
                m.comm_stream = stream
        self.cfg, self.layout, self.scale = cfg, layout, loss_scale
        self.objective = objective or Objective(stages[0].cfg)
        if cfg.schedule == "dualpipev":
            self.runtime: Runtime = DualPipeV(tuple(self.modules), process_group=layout.pp_group)
        elif cfg.schedule == "dualpipe":  # the runtime sums the gradients of the two copies of each stage
            self.runtime = DualPipe(tuple(self.modules), process_group=layout.pp_group)
        else:
            self.runtime = Runtime(self.modules, cfg.schedule, process_group=layout.pp_group)

    def _feeds(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[tuple, tuple]:
        """(inputs, labels) this pipeline rank passes to ``step`` (the runtime ignores what it does not need)."""
        r, last = self.layout.pp_rank, self.cfg.pp - 1
        if self.cfg.schedule == "dualpipe":
            half = inputs.shape[0] // 2
            if r == 0:
                return (inputs[:half],), (labels[half:],)
            if r == last:
                return (inputs[half:],), (labels[:half],)
            return (), ()
        ends = 0 if self.cfg.schedule == "dualpipev" else last
        return ((inputs,) if r == 0 else ()), ((labels,) if r == ends else ())

    def _run(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        raw: list[torch.Tensor] = []

        def criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss, main = self.objective(logits, y)
            raw.append(main.detach())
            return loss * self.scale

        x, y = self._feeds(inputs, labels)
        self.runtime.step(*x, num_chunks=self.cfg.microbatches, criterion=criterion, labels=y)
        total = torch.zeros((), dtype=torch.float64)
        for loss in raw:
            total += loss.double().cpu()
        return total, len(raw)

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self._run(inputs, labels)

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self._run(inputs, labels)
