"""Stage models, the single-process sequential reference, and the worker that compares a pipeline to it.

Every worker builds the same full model from the same seed, keeps copies of its own stages for the
pipeline, runs ``step()`` and the reference (the full model, micro-batch by micro-batch) and reports:
losses and outputs bitwise equal, the gradient metric of every local parameter, measured and predicted
peak activations.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dualflow.dualpipe import DualPipe, DualPipeV, PipelineStallError, generate
from dualflow.dualpipe.backward import backward_full
from dualflow.dualpipe.runtime import PipelineEngine
from tests.dist import progress

FP8 = getattr(torch, "float8_e4m3fn", None)


class Block(nn.Module):
    """A residual MLP stage: the shape of a transformer block's feed-forward half."""

    ep_group = None

    def __init__(self, d: int, tuple_io: bool = False, width: int = 3) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, width * d)
        self.down = nn.Linear(width * d, d)
        self.tuple_io = tuple_io

    def forward(self, x: torch.Tensor, *extra: torch.Tensor):
        if self.tuple_io and extra:  # (hidden fp32, token ids int64, fp8 copy of the hidden, mask bool)
            ids, h8, mask = extra
            x = x + 0.01 * ids.float().unsqueeze(-1) + 0.1 * h8.float() * mask.unsqueeze(-1)
        h = x + self.down(F.gelu(self.up(self.norm(x))))
        if not self.tuple_io:
            return h
        ids = (h.sum(-1) * 1000).long() % 7
        return h, ids, h.detach().to(FP8), h.detach().sum(-1) > 0


class OverlapBlock(Block):
    """A Block whose class implements the F&B protocol (forward of one chunk, then backward of the other)."""

    calls = 0  # per class, incremented by the hook; tests read it in the worker process only

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                    output_grads1):
        OverlapBlock.calls += 1
        outputs0 = module0(*inputs0)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else outputs0
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
            loss1.detach_()
        else:
            torch.autograd.backward(outputs1, grad_tensors=output_grads1)
        return outputs0, loss0


class _ExpertSync(torch.autograd.Function):
    """Identity whose forward and backward each run an all-reduce on the expert-parallel group, as MoE
    dispatch/combine do; the reduced values are not used, so the result stays exact."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        dist.all_reduce(x.detach().sum().reshape(1), group=group)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dist.all_reduce(grad.detach().sum().reshape(1), group=ctx.group)
        return grad, None


class ExpertBlock(OverlapBlock):
    """A stage whose forward calls collectives on a separate expert-parallel group."""

    def forward(self, x: torch.Tensor, *extra: torch.Tensor):
        if self.ep_group is not None:
            x = _ExpertSync.apply(x, self.ep_group)
        return super().forward(x, *extra)


class SplitHookBlock(Block):
    """Opts into its own I/W split (here: the whole backward in I, nothing left for W)."""

    calls = 0

    @classmethod
    def split_backward(cls, module, roots, grads, inputs):
        cls.calls += 1
        return backward_full(roots, grads, inputs), lambda: None


class ViewBlock(Block):
    """Invalid: returns a view of its input."""

    def forward(self, x: torch.Tensor, *extra: torch.Tensor):
        return x.view(x.shape)


class ShapeShiftBlock(Block):
    """Invalid: from its second call on (micro-batch 1 of the first step) returns a longer sequence."""

    def forward(self, x: torch.Tensor, *extra: torch.Tensor):
        self.calls = getattr(self, "calls", 0) + 1
        h = super().forward(x, *extra)
        return torch.cat([h, h[:, :1]], 1) if self.calls > 1 else h


class BadGradBlock(Block):
    """Invalid: its input-gradient hook returns the gradient of the first position only."""

    @classmethod
    def split_backward(cls, module, roots, grads, inputs):
        return [g[:, :1].clone() for g in backward_full(roots, grads, inputs)], lambda: None


BLOCKS = {"block": Block, "overlap": OverlapBlock, "expert": ExpertBlock, "split_hook": SplitHookBlock,
          "view": ViewBlock}


def criterion(out: torch.Tensor, *rest_and_label: torch.Tensor) -> torch.Tensor:
    label = rest_and_label[-1]
    return F.mse_loss(out, label)


def metric(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepSeek's gradient comparison: 1 - 2 sum(xy) / sum(x^2 + y^2) in float64."""
    x, y = x.double(), y.double()
    den = (x * x + y * y).sum().item()
    return 0.0 if den == 0 else 1 - 2 * (x * y).sum().item() / den


def reference(full: nn.ModuleList, xs: list[torch.Tensor], ls: list[torch.Tensor], scale: float, train: bool):
    """The full model micro-batch by micro-batch: per-micro-batch losses and outputs; gradients in .grad."""
    losses, outs = [], []
    for x, label in zip(xs, ls):
        h = (x,)
        for block in full:
            out = block(*h)
            h = out if isinstance(out, tuple) else (out,)
        loss = criterion(*h, label)
        if train:
            (loss * scale if scale != 1 else loss).backward()
        losses.append(loss.detach())
        outs.append(tuple(t.detach() for t in h))
    return torch.stack(losses), outs


def make_engine(kind: str, local: list[nn.Module], **options) -> PipelineEngine:
    if kind == "dualpipe":
        return DualPipe(tuple(local), **options)
    if kind == "dualpipev":
        return DualPipeV(tuple(local), **options)
    return PipelineEngine(local, kind, **options)


class Case:
    """One pipeline (this rank's stages of it) and its reference model, stepped together."""

    def __init__(self, rank: int, world: int, kind: str, num_chunks: int, *, d: int = 8, mb: int = 2,
                 block: str = "block", tuple_io: bool = False, checkpoint: bool = False, reduction: str = "sum",
                 forward_only: bool = False, return_outputs: bool = False, group=None, group_ranks=None,
                 reverse_mapping: bool = False, lr: float = 0.1, seq_lens: tuple[int, ...] = (3,), seed: int = 0,
                 timeout: float = 60, ep_group=None, device: str = "cpu", uneven: bool = False) -> None:
        pp_world, pp_rank, mapping = world, rank, None
        if group_ranks is not None:
            pp_world, pp_rank = len(group_ranks), group_ranks.index(rank)
        if reverse_mapping:
            mapping = list(range(pp_world))[::-1]   # group rank g is pipeline rank P-1-g
            pp_rank = mapping[pp_rank]
        cls = BLOCKS[block]
        s = generate(kind, pp_world, num_chunks)
        torch.manual_seed(seed)
        self.device = torch.device(device)
        widths = [2 + i if uneven else 3 for i in range(s.num_model_stages)]  # stages of different sizes
        self.full = nn.ModuleList(cls(d, tuple_io, w) for w in widths).to(self.device)
        local = [copy.deepcopy(self.full[s.topology.position[st]]) for st in s.stages_of(pp_rank)]
        for m in local:
            m.ep_group = ep_group  # only the pipeline's copies talk to the expert-parallel group
        self.engine = make_engine(kind, local, process_group=group, rank_mapping=mapping, loss_reduction=reduction,
                                  checkpoint=checkpoint, timeout=timeout)
        self.s, self.rank, self.group, self.N, self.mb, self.d = s, pp_rank, group, num_chunks, mb, d
        self.scale = 1.0 / num_chunks if reduction == "mean" else 1.0
        self.forward_only, self.return_outputs, self.lr, self.seq_lens, self.seed = (
            forward_only, return_outputs, lr, seq_lens, seed)
        self.result: dict = {"losses_equal": [], "outputs_equal": [], "grad_metric": [], "weight_metric": [],
                             "peak": [], "loss_changed": False, "rank": pp_rank}
        self.first_loss = None

    def data(self, it: int):
        """Step ``it``'s full batch, and the parts of it this rank holds."""
        s, N, mb = self.s, self.N, self.mb
        torch.manual_seed(100 * self.seed + it)
        seq = self.seq_lens[it % len(self.seq_lens)]  # shapes may change from step to step
        x, lab = torch.randn(N * mb, seq, self.d), torch.randn(N * mb, seq, self.d)
        x, lab = x.to(self.device), lab.to(self.device)
        offsets = [sum(s.microbatches[:c]) for c in range(len(s.chains))]
        inputs, labels, mine = None, (), None   # inputs entering here, labels of micro-batches leaving here
        for c, stages in enumerate(s.chains):
            lo, hi = offsets[c] * mb, (offsets[c] + s.microbatches[c]) * mb
            if s.placement[stages[0]] == self.rank:
                inputs = x[lo:hi]
            if s.placement[stages[-1]] == self.rank:
                labels, mine = (lab[lo:hi],), (offsets[c], offsets[c] + s.microbatches[c])
        return list(x.chunk(N)), list(lab.chunk(N)), inputs, labels, mine

    def step(self, it: int) -> None:
        xs, ls, inputs, labels, mine = self.data(it)
        engine, full, res = self.engine, self.full, self.result
        progress(f"step {it}: pipeline {self.s.name}")
        engine.zero_grad(set_to_none=True)
        ctx = torch.no_grad() if self.forward_only else torch.enable_grad()
        with ctx:
            loss, out = engine.step(inputs, num_chunks=self.N, criterion=criterion, labels=labels,
                                    return_outputs=self.return_outputs)
        progress(f"step {it}: reference")
        full.zero_grad(set_to_none=True)
        with ctx:
            ref_losses, ref_outs = reference(full, xs, ls, self.scale, not self.forward_only)
        res["has_loss"] = mine is not None
        if mine is None:
            res["losses_equal"].append(loss is None and out is None)
        else:
            lo, hi = mine
            # Bitwise on any CPU: the pipeline's stages and the reference run the same operations on the same
            # micro-batch shapes and inputs, in this process with its one intra-op thread (tests/dist.py).
            res["losses_equal"].append(torch.equal(loss, ref_losses[lo:hi]))
            if self.first_loss is None:
                self.first_loss = loss.clone()
            res["loss_changed"] |= not torch.equal(self.first_loss, loss)
            if self.return_outputs:
                want = [torch.cat([o[i] for o in ref_outs[lo:hi]]) for i in range(len(ref_outs[0]))]
                got = list(out) if isinstance(out, tuple) else [out]
                res["outputs_equal"].append(len(got) == len(want) and all(
                    g.dtype == w.dtype and torch.equal(g.view(torch.uint8) if g.dtype == FP8 else g,
                                                       w.view(torch.uint8) if w.dtype == FP8 else w)
                    for g, w in zip(got, want)))
        if self.forward_only:
            return
        res["grad_metric"].append(max(metric(p.grad, q.grad) if p.grad is not None and q.grad is not None
                                      else float("inf") for p, q in self.pairs()))
        res["peak"].append((engine.last_stats.peak_activations, engine.last_stats.expected_peak_activations))
        _sgd(engine, self.lr)
        _sgd(full, self.lr)
        # The two updates agree to rounding (the pipeline sums micro-batch gradients in another order);
        # continue from the pipeline's weights so that the next step's losses again compare bit for bit.
        res["weight_metric"].append(max(metric(p.detach(), q.detach()) for p, q in self.pairs()))
        _sync_reference(full, engine, self.s, self.group)

    def pairs(self):
        """(pipeline parameter, reference parameter) for every parameter of this rank's stages."""
        for st, m in zip(self.s.stages_of(self.rank), self.engine.module):
            yield from zip(m.parameters(), self.full[self.s.topology.position[st]].parameters())


def run_case(rank: int, world: int, kind: str, num_chunks: int, *, steps: int = 1, group_ranks=None, **options):
    """Run ``steps`` pipeline steps and the reference; return what the parent asserts on."""
    group = None
    if group_ranks is not None:  # the pipeline is a subgroup of the world; every rank creates the group
        group = dist.new_group(group_ranks)
        if rank not in group_ranks:
            return {"skipped": True}
    case = Case(rank, world, kind, num_chunks, group=group, group_ranks=group_ranks, **options)
    for it in range(steps):
        case.step(it)
    case.result["hook_calls"] = OverlapBlock.calls + SplitHookBlock.calls
    return case.result


def _sgd(model: nn.Module, lr: float) -> None:
    """Plain SGD (torch.optim would import torch._dynamo, seconds per worker on this machine)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)


def _sync_reference(full: nn.ModuleList, engine: PipelineEngine, s, group) -> None:
    """Copy every rank's stage weights into every rank's reference model (all-gather of flat weights)."""
    flat = torch.cat([p.detach().reshape(-1) for m in engine.module for p in m.parameters()])
    size = dist.get_world_size(group)
    gathered = [torch.empty_like(flat) for _ in range(size)]
    dist.all_gather(gathered, flat, group=group)
    mapping = engine.transport.peers
    for pp in range(size):
        src = gathered[dist.get_group_rank(group, mapping[pp]) if group is not None else mapping[pp]]
        offset = 0
        for st in s.stages_of(pp):
            for q in full[s.topology.position[st]].parameters():
                n = q.numel()
                with torch.no_grad():
                    q.copy_(src[offset:offset + n].view_as(q))
                offset += n


def check(results: list[dict], grad_tol: float = 1e-13) -> None:
    """Assertions shared by the runtime tests."""
    for r in results:
        if r.get("skipped"):
            continue
        assert all(r["losses_equal"]), f"pipeline rank {r['rank']}: losses differ from the reference {r}"
        assert all(r["outputs_equal"]), f"pipeline rank {r['rank']}: outputs differ from the reference {r}"
        assert all(g < grad_tol for g in r["grad_metric"]), f"pipeline rank {r['rank']}: gradients {r['grad_metric']}"
        assert all(w < grad_tol for w in r["weight_metric"]), f"pipeline rank {r['rank']}: weights {r['weight_metric']}"
        assert all(p == e for p, e in r["peak"]), f"pipeline rank {r['rank']}: peak activations {r['peak']}"



def run_many(rank: int, world: int, cases: list[tuple[str, int, dict]]) -> list[dict]:
    """Several cases in one set of processes (each process start costs seconds on this machine)."""
    out = []
    for kind, n, options in cases:
        progress(f"case {kind} N={n} {options}")
        out.append(run_case(rank, world, kind, n, **options))
    return out


def check_many(results_by_rank: list[list[dict]], cases: list) -> None:
    for i, case in enumerate(cases):
        try:
            check([per_rank[i] for per_rank in results_by_rank])
        except AssertionError as exc:
            raise AssertionError(f"case {case}: {exc}") from None


def expert_parallel_pipelines(rank: int, world: int) -> list[dict]:
    """Two DualPipeV pipelines over subgroups ({0, 2} and {1, 3}, pipeline ranks mapped in reverse) whose
    stages all-reduce over expert-parallel groups ({0, 1} and {2, 3}) in forward and backward, with the
    F&B hook of the stage class: the training job's arrangement."""
    pp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    ep_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    members = [0, 2] if rank % 2 == 0 else [1, 3]
    out = []
    for kind, n in (("dualpipev", 5), ("dualpipe", 6)):
        case = Case(rank, world, kind, n, block="expert", group=pp_groups[rank % 2], group_ranks=members,
                    reverse_mapping=True, seed=rank % 2, ep_group=ep_groups[rank // 2])
        for it in range(2):
            case.step(it)
        case.result["hook_calls"] = OverlapBlock.calls
        out.append(case.result)
    return out


def two_pipelines_in_one_process(rank: int, world: int) -> list[dict]:
    """Two engines on the same group, stepped alternately: no state is shared between them."""
    a = Case(rank, world, "dualpipev", 4, seed=1)
    b = Case(rank, world, "dualpipe", 6, seed=2, d=6, block="split_hook")
    for it in range(2):
        a.step(it)
        b.step(it)
    b.result["hook_calls"] = SplitHookBlock.calls
    return [a.result, b.result]


def _expect(out: dict, name: str, exc: type[BaseException], fn) -> None:
    try:
        fn()
    except exc as e:
        out[name] = f"{type(e).__name__}: {e}"
    except BaseException as e:
        out[name] = f"WRONG {type(e).__name__}: {e}"
    else:
        out[name] = "no error"


def invalid_use(rank: int, world: int) -> dict:
    """Every kind of invalid use on 3 ranks: errors before any communication, or stall reports naming
    the rank that failed. Each scenario gets its own group (a stalled step leaves receives posted)."""
    from dualflow.dualpipe import one_f_one_b

    out: dict = {}
    d, x = 8, torch.randn(12, 3, 8)
    blocks = (Block(d), Block(d))
    _expect(out, "odd_ranks", ValueError, lambda: DualPipe(blocks))
    _expect(out, "module_count", ValueError, lambda: DualPipeV((Block(d),)))
    _expect(out, "not_a_module", TypeError, lambda: PipelineEngine([lambda t: t], "1f1b"))
    _expect(out, "reduction", ValueError, lambda: DualPipeV(blocks, loss_reduction="avg"))
    _expect(out, "mapping", ValueError, lambda: DualPipeV(blocks, rank_mapping=[0, 0, 1]))
    pipe = DualPipeV(blocks, timeout=3)
    _expect(out, "zero_chunks", ValueError, lambda: pipe.step(x, num_chunks=0, criterion=criterion, labels=(x,)))
    inter = PipelineEngine([Block(d), Block(d)], "interleaved")
    _expect(out, "rounds", ValueError, lambda: inter.step(x, num_chunks=7, criterion=criterion, labels=(x,)))
    fixed = PipelineEngine([Block(d)], one_f_one_b(world, 6))
    _expect(out, "fixed_count", ValueError, lambda: fixed.step(x, num_chunks=4, criterion=criterion, labels=(x,)))
    # one-rank pipelines: the rank holds inputs, labels and every stage
    solo = [dist.new_group([r]) for r in range(world)][rank]
    one = DualPipeV((Block(d), Block(d)), process_group=solo)
    _expect(out, "no_criterion", ValueError, lambda: one.step(x, num_chunks=4))
    _expect(out, "no_split", ValueError, lambda: one.step(x[:7], num_chunks=4, criterion=criterion, labels=(x[:7],)))
    view = DualPipeV((ViewBlock(d), Block(d)), process_group=solo)
    _expect(out, "view", ValueError, lambda: view.step(x, num_chunks=4, criterion=criterion, labels=(x,)))
    # rank 0's batch does not split: rank 0 fails before communicating, the others report a stall
    group = dist.new_group(list(range(world)))
    pipe = DualPipeV((Block(d), Block(d)), process_group=group, timeout=3)
    if rank == 0:
        _expect(out, "partial", ValueError, lambda: pipe.step(x[:7], num_chunks=6, criterion=criterion,
                                                                labels=(x[:7],)))
    else:
        _expect(out, "partial", PipelineStallError, lambda: pipe.step(None, num_chunks=6))
    # the ranks disagree on the number of micro-batches: somebody waits for a message that never comes
    group = dist.new_group(list(range(world)))
    pipe = DualPipeV((Block(d), Block(d)), process_group=group, timeout=3)
    n = 6 if rank != 1 else 8
    _expect(out, "mismatch", PipelineStallError, lambda: pipe.step(x if rank == 0 else None, num_chunks=n,
                                                                   criterion=criterion, labels=(x,)))
    return out


def layout_changes(rank: int, world: int) -> dict:
    """On 2 ranks, each scenario on its own group: a stage whose second micro-batch has another shape (the
    sender names it, the receiver stalls), a hook whose input gradients have the wrong shape; after either,
    both engines refuse another step, and a new engine on a new group trains."""
    out: dict = {}
    d, x = 8, torch.randn(8, 3, 8)
    for name, kind, first in (("shape", "dualpipev", ShapeShiftBlock), ("grad", "zb1p", BadGradBlock)):
        group = dist.new_group(list(range(world)))
        stages = [first(d)] if kind == "zb1p" else [first(d), Block(d)]
        if kind == "zb1p" and rank == 0:
            stages = [Block(d)]
        pipe = make_engine(kind, stages, process_group=group, timeout=2)
        labels = (x,) if rank == (0 if kind == "dualpipev" else world - 1) else ()
        mine = x if rank == 0 else None
        fails = ValueError if rank == (0 if name == "shape" else 1) else PipelineStallError
        _expect(out, name, fails, lambda pipe=pipe, mine=mine, labels=labels: pipe.step(
            mine, num_chunks=4, criterion=criterion, labels=labels))
        _expect(out, f"{name}_again", RuntimeError, lambda pipe=pipe, mine=mine, labels=labels: pipe.step(
            mine, num_chunks=4, criterion=criterion, labels=labels))
    group = dist.new_group(list(range(world)))
    pipe = DualPipeV((Block(d), Block(d)), process_group=group, timeout=60)
    loss, _ = pipe.step(x if rank == 0 else None, num_chunks=4, criterion=criterion, labels=(x,) if rank == 0 else ())
    out["rebuilt"] = loss is None if rank else bool(torch.isfinite(loss).all())
    return out
