"""The trainer's engine over ``dualflow.dualpipe``: DualPipeV, DualPipe, 1F1B or ZB1P on this rank's stages.

Where the micro-batches enter and where their losses are computed follows the runtime's placement:
DualPipeV and the single-direction schedules take inputs on the first pipeline rank and labels on the
rank that holds the last stage (rank 0 for DualPipeV); DualPipe feeds the first half of the batch in at
rank 0 and the second half at the last rank, each computing the loss of the other half.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dualflow.dualpipe import DualPipe, DualPipeV
from dualflow.dualpipe import PipelineEngine as Runtime
from dualflow.train.model import Stage, cross_entropy
from dualflow.train.parallel import ParallelConfig, Topology
from dualflow.train.stage import OverlappedStage, PipelineStage


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


class PipelineEngine:
    """Runs one global step's micro-batches through the pipeline runtime (see engine.py for the contract)."""

    def __init__(self, stages: list[Stage], topo: Topology, cfg: ParallelConfig, loss_scale: float) -> None:
        wrap = OverlappedStage if cfg.overlap else PipelineStage
        self.modules = [wrap(s) for s in stages]
        if cfg.overlap and topo.device.type == "cuda":
            stream = torch.cuda.Stream(topo.device)
            for m in self.modules:
                m.comm_stream = stream
        self.cfg, self.topo, self.scale = cfg, topo, loss_scale
        if cfg.schedule == "dualpipev":
            self.runtime: Runtime = DualPipeV(tuple(self.modules), process_group=topo.pp_group)
        elif cfg.schedule == "dualpipe":
            # The copies' gradients are summed here (_sum_mirrored_stages), not by the runtime: its
            # DualPipe.sum_duplicated_grads sizes the receive buffers by this rank's stages in this rank's
            # order, which breaks when the two stages differ in size (reported upstream).
            self.runtime = DualPipe(tuple(self.modules), process_group=topo.pp_group, sum_duplicated_grads=False)
        else:
            self.runtime = Runtime(self.modules, cfg.schedule, process_group=topo.pp_group)

    def _feeds(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[tuple, tuple]:
        """(inputs, labels) this pipeline rank passes to ``step`` (the runtime ignores what it does not need)."""
        r, last = self.topo.pp_rank, self.cfg.pp - 1
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
            loss = cross_entropy(logits, y)
            raw.append(loss.detach())
            return loss * self.scale

        x, y = self._feeds(inputs, labels)
        self.runtime.step(*x, num_chunks=self.cfg.microbatches, criterion=criterion, labels=y)
        total = torch.zeros((), dtype=torch.float64)
        for loss in raw:
            total += loss.double().cpu()
        return total, len(raw)

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        out = self._run(inputs, labels)
        if self.cfg.schedule == "dualpipe":
            self._sum_mirrored_stages()
        return out

    @torch.no_grad()
    def _sum_mirrored_stages(self) -> None:
        """DualPipe: add the gradients of this rank's stages r and P-1-r to those of their copies on rank P-1-r.

        Both copies end up with ``mine + theirs``, the same bits on both sides (addition commutes).
        """
        ranks = dist.get_process_group_ranks(self.topo.pp_group)
        peer = ranks[self.cfg.pp - 1 - self.topo.pp_rank]
        mine = [list(m.parameters()) for m in self.modules]  # stage r, stage P-1-r
        send = [torch.cat([_grad(p).reshape(-1) for p in ps]) for ps in mine]
        # the peer sends its stage P-1-r (our second) first and its stage r (our first) second
        recv = [torch.empty_like(send[1]), torch.empty_like(send[0])]
        ops = [dist.P2POp(dist.isend, t, peer, self.topo.pp_group) for t in send] + \
              [dist.P2POp(dist.irecv, t, peer, self.topo.pp_group) for t in recv]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        for params, flat in zip((mine[1], mine[0]), recv):
            offset = 0
            for p in params:
                g = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self._run(inputs, labels)
