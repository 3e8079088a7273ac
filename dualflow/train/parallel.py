"""Process layout and the collectives of one optimizer step outside the pipeline.

World = ``pp`` pipeline ranks x ``dp`` data-parallel ranks, global rank ``pp_rank * dp + dp_rank``: the
ranks of one pipeline position are adjacent (on GPUs: one node, NVLink), which is where the
expert-parallel all-to-all runs. Expert parallelism uses the data-parallel group of each pipeline
position (``ep = dp``): each rank hosts ``n_routed_experts / dp`` experts.

After the pipeline step: non-expert gradients are summed over the data-parallel group (the loss is
already scaled by ``1 / (micro-batches * dp)``, so the sum is the gradient of the global mean); expert
gradients are not reduced (an expert lives on one rank and has seen every rank's tokens); the global
gradient norm counts every distinct parameter once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from dualflow.launcher.config import ConfigError, OneOf, Range, check_fields
from dualflow.train.partition import SCHEDULES


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    pp: int = 1
    dp: int = 1
    schedule: str = "dualpipev"
    microbatches: int = 4
    overlap: bool = True
    zero1: bool = False
    # cross-rank argument checks of the expert dispatch/combine (dualflow.comm.Buffer's ``checks``):
    # "first" exchanges them on the first calls only, so later steps do not wait for the GPU per call
    comm_checks: str = "first"

    def __post_init__(self) -> None:
        check_fields(self, "parallel", pp=Range(ge=1), dp=Range(ge=1), schedule=OneOf(*SCHEDULES),
                     microbatches=Range(ge=1), comm_checks=OneOf("collective", "first", "local"))
        problems = []
        if self.schedule == "dualpipe" and self.pp % 2:
            problems.append(f"parallel.schedule='dualpipe' needs an even number of pipeline ranks, got parallel.pp="
                            f"{self.pp}; use 'dualpipev' for any number")
        minimum = {"dualpipev": 2 * self.pp, "dualpipe": 2 * self.pp}.get(self.schedule, self.pp)
        if self.pp > 1 and self.microbatches < minimum:
            problems.append(f"parallel.microbatches={self.microbatches}: {self.schedule} on parallel.pp={self.pp} "
                            f"pipeline ranks needs at least {minimum}")
        if self.schedule == "dualpipe" and self.pp > 1 and self.microbatches % 2:
            problems.append(f"parallel.microbatches={self.microbatches}: dualpipe splits the micro-batches between "
                            "its two ends and needs an even number")
        if problems:
            raise ConfigError(problems, "invalid parallel config")

    @property
    def world(self) -> int:
        return self.pp * self.dp


@dataclasses.dataclass
class ParallelLayout:
    """This process's coordinates and the groups it belongs to (``None`` groups when world is 1)."""

    cfg: ParallelConfig
    rank: int
    pp_rank: int
    dp_rank: int
    pp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def build(cls, cfg: ParallelConfig, device: torch.device | None = None) -> ParallelLayout:
        """Create the groups (collective: every rank calls it, in the same order)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != cfg.world:
            raise ValueError(f"parallel.pp * parallel.dp = {cfg.pp} * {cfg.dp} = {cfg.world} processes are needed, "
                             f"{world} were started: launch with --nproc-per-node {cfg.world} or change parallel.*")
        rank = dist.get_rank() if dist.is_initialized() else 0
        pp_rank, dp_rank = divmod(rank, cfg.dp)
        pp_group = dp_group = None
        if world > 1:
            for d in range(cfg.dp):
                g = dist.new_group([p * cfg.dp + d for p in range(cfg.pp)])
                pp_group = g if d == dp_rank else pp_group
            for p in range(cfg.pp):
                g = dist.new_group([p * cfg.dp + d for d in range(cfg.dp)])
                dp_group = g if p == pp_rank else dp_group
        return cls(cfg, rank, pp_rank, dp_rank, pp_group, dp_group, device or torch.device("cpu"))

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Reduce a few numbers over the whole world (identity in one process), in float64."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.cfg.world > 1:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return t.tolist()

    def expert_ids(self, n_experts: int) -> range:
        if n_experts % self.cfg.dp:
            raise ValueError(f"model.n_routed_experts={n_experts} does not divide over {self.cfg.dp} expert-parallel "
                             "ranks (parallel.dp); make it a multiple")
        per = n_experts // self.cfg.dp
        return range(self.dp_rank * per, (self.dp_rank + 1) * per)


def is_expert(name: str) -> bool:
    return ".moe.experts." in name


def _flat_all_reduce(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


@torch.no_grad()
def reduce_gradients(params: dict[str, nn.Parameter], layout: ParallelLayout) -> None:
    """Sum non-expert gradients over the data-parallel group, one flat all-reduce per dtype."""
    if layout.cfg.dp == 1:
        return
    grads = [p.grad for n, p in sorted(params.items()) if not is_expert(n) and p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        _flat_all_reduce([g for g in grads if g.dtype == dtype], layout.dp_group)


@torch.no_grad()
def gradient_norm(params: dict[str, nn.Parameter], counted: Iterable[str], layout: ParallelLayout) -> float:
    """The global norm of all gradients (over every rank).

    ``counted`` names the parameters this rank contributes to the norm: each distinct parameter must be
    counted on exactly one rank (replicas of non-expert weights only on data-parallel rank 0, the second
    copy of a DualPipe stage nowhere).
    """
    counted = set(counted)
    mine = [p.grad.detach() for name, p in sorted(params.items())
            if p.grad is not None and name in counted and (is_expert(name) or layout.dp_rank == 0)]
    # one multi-tensor norm kernel (FP32 per tensor, squares summed in FP64), one read of the host value
    sq = torch.stack(torch._foreach_norm(mine)).double().pow(2).sum() if mine else torch.zeros((), dtype=torch.float64)
    return layout.all_reduce([float(sq)])[0] ** 0.5


def clip_divisor(norm: float, max_norm: float) -> float | None:
    """What the gradients are divided by so that their global norm ``norm`` is at most ``max_norm`` (0 = no
    clipping); None when they stay as they are. The optimizer applies it as it reads the gradients
    (:meth:`dualflow.train.optim.AdamW.step`): no separate pass over every gradient."""
    if max_norm > 0 and norm > max_norm:
        return (norm + 1e-6) / max_norm
    return None


def zero1_owners(params: dict[str, nn.Parameter], dp: int) -> dict[str, int]:
    """Data-parallel rank that owns each non-expert parameter's optimizer state (greedy size balance)."""
    load = [0] * dp
    owners = {}
    for name in sorted(params, key=lambda n: (-params[n].numel(), n)):
        if is_expert(name):
            continue
        owner = min(range(dp), key=lambda r: (load[r], r))
        owners[name] = owner
        load[owner] += params[name].numel()
    return owners


@torch.no_grad()
def broadcast_owned(params: dict[str, nn.Parameter], owners: dict[str, int], layout: ParallelLayout) -> None:
    """After a ZeRO-1 step: every non-expert parameter from its owner to the rest of the group."""
    if layout.cfg.dp == 1:
        return
    ranks = dist.get_process_group_ranks(layout.dp_group)
    for name in sorted(owners):
        dist.broadcast(params[name].data, src=ranks[owners[name]], group=layout.dp_group)
