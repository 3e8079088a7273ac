"""Pipeline runtime: executes a schedule's per-rank program over torch.distributed.

:class:`PipelineEngine` runs any schedule kind (1F1B, ZB1P, interleaved, DualPipe, DualPipeV) on a rank's
stage modules; :class:`DualPipe` and :class:`DualPipeV` are drop-in replacements for DeepSeek's modules
of the same names (same constructor, ``step()`` and ``overlapped_forward_backward`` protocol). The
runtime holds no schedule logic: the order of every compute, send and receive comes from
:func:`dualflow.dualpipe.comms.programs`. See docs/pipeline_runtime.md for the contract of stage modules.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from dualflow.dualpipe.backward import WeightFn, backward_full, backward_split
from dualflow.dualpipe.comms import Message, Op, forward_only, programs
from dualflow.dualpipe.p2p import PipelineStallError, TensorSpec, Transport
from dualflow.dualpipe.schedule import Action, Overlap, Schedule, Step, generate
from dualflow.dualpipe.simulate import peak_activations
from dualflow.utils import nvtx

ScheduleSource = str | Schedule | Callable[[int, int], Schedule]


@dataclass(frozen=True)
class StepStats:
    """What the last ``step()`` measured on this rank."""

    wall_s: float
    compute_s: float            # time inside stage forward/backward/weight computations
    actions: int                # compute steps run
    peak_activations: int       # most (stage, micro-batch) activations held at once
    expected_peak_activations: int  # the simulator's prediction for this rank's schedule

    @property
    def idle_s(self) -> float:
        return self.wall_s - self.compute_s


@dataclass
class _Chunk:
    """State of one (stage, micro-batch) between its forward and its last backward step."""

    inputs: tuple[torch.Tensor, ...]
    roots: list = field(default_factory=list)        # differentiable outputs (tensors or gradient edges)
    grad_specs: tuple[TensorSpec, ...] = ()           # layout of the gradient message for them
    loss: torch.Tensor | None = None
    weight: WeightFn | None = None


def _split(t: torch.Tensor, n: int, dim: int, what: str) -> tuple[torch.Tensor, ...]:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
    if t.dim() <= dim or t.shape[dim] % n:
        size = t.shape[dim] if t.dim() > dim else "no such dimension"
        raise ValueError(f"{what} of shape {tuple(t.shape)} does not split into {n} micro-batches along batch_dim "
                         f"{dim} (size {size}); use a batch size divisible by {n}")
    return t.chunk(n, dim)


def _check_layout(got: tuple[TensorSpec, ...], expected: tuple[TensorSpec, ...], what: str, reference: str,
                  fix: str) -> None:
    """Raise ValueError naming ``what`` and the first tensor whose shape, dtype or requires-grad flag differs."""
    if got == expected:
        return
    if len(got) != len(expected):
        where = f"{len(got)} tensors where {reference} layout has {len(expected)}"
    else:
        i = next(i for i, (g, e) in enumerate(zip(got, expected)) if g != e)
        where = f"tensor {i} is {got[i]}, expected {expected[i]} (as {reference})"
    raise ValueError(f"{what}: {where}. {fix}")


def _edge(t: torch.Tensor) -> GradientEdge:
    """Where ``t``'s gradient enters the graph; holding it instead of ``t`` lets ``t``'s memory go."""
    return GradientEdge(t.grad_fn, t.output_nr) if t.grad_fn is not None else get_gradient_edge(t)


class PipelineEngine(nn.Module):
    """Runs pipeline schedules on this rank's stage modules.

    ``stages``: this rank's stage modules, in the order of their stage numbers (for DualPipe and DualPipeV:
    the stage entered first, then the stage on the way back). ``schedule``: a kind name of
    :data:`dualflow.dualpipe.GENERATORS`, a callable ``(num_ranks, num_microbatches) -> Schedule``, or a
    fixed :class:`Schedule` (then ``num_chunks`` must match it).
    ``process_group`` and ``rank_mapping`` (group rank -> pipeline rank) as in DeepSeek's DualPipe.
    ``loss_reduction``: "sum" (gradients of the sum of micro-batch losses, the reference's behaviour) or
    "mean". ``checkpoint``: recompute the forward of the (selected) stages in backward. ``timeout``: seconds
    without progress before a step fails with :class:`PipelineStallError`.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        schedule: ScheduleSource,
        *,
        batch_dim: int = 0,
        process_group: dist.ProcessGroup | None = None,
        rank_mapping: Sequence[int] | None = None,
        loss_reduction: str = "sum",
        checkpoint: bool | Sequence[bool] = False,
        timeout: float = 300.0,
        stages_per_rank: int | None = None,
    ) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("the pipeline runtime needs torch.distributed: call init_process_group() first")
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        self.group = process_group or dist.group.WORLD
        self.num_ranks = dist.get_world_size(self.group)
        mapping = list(range(self.num_ranks)) if rank_mapping is None else list(rank_mapping)
        if sorted(mapping) != list(range(self.num_ranks)):
            raise ValueError(f"rank_mapping must be a permutation of 0..{self.num_ranks - 1} (group rank -> pipeline "
                             f"rank), got {mapping}")
        self.rank = mapping[dist.get_rank(self.group)]
        peers = [0] * self.num_ranks
        for group_rank, pp_rank in enumerate(mapping):
            peers[pp_rank] = dist.get_global_rank(self.group, group_rank)
        self._source = schedule
        self._options = {} if stages_per_rank is None else {"stages_per_rank": stages_per_rank}
        probe = self.schedule_for(2 * self.num_ranks * (stages_per_rank or 1))
        self.stage_ids = probe.stages_of(self.rank)
        if len(stages) != len(self.stage_ids):
            raise ValueError(f"pipeline rank {self.rank} of a {probe.name} schedule holds {len(self.stage_ids)} stages "
                             f"({', '.join(map(str, self.stage_ids))}) but {len(stages)} modules were given")
        for m in stages:
            if not isinstance(m, nn.Module):
                raise TypeError(f"stages must be nn.Modules, got {type(m).__name__}")
        self.module = nn.ModuleList(stages)
        flags = [checkpoint] * len(stages) if isinstance(checkpoint, bool) else list(checkpoint)
        if len(flags) != len(stages):
            raise ValueError(f"checkpoint has {len(flags)} flags for {len(stages)} stages")
        self.checkpoint_flags = flags
        self.batch_dim = batch_dim
        self.loss_reduction = loss_reduction
        tensors = [t for m in stages for t in (*m.parameters(), *m.buffers())]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        if any(t.device != self.device for t in tensors):
            raise ValueError("all stage parameters must be on one device; found "
                             f"{sorted({str(t.device) for t in tensors})}")
        cls = type(stages[0])
        self.overlapped = (len(stages) == 2 and type(stages[1]) is cls
                           and callable(getattr(cls, "overlapped_forward_backward", None)))
        self.transport = Transport(self.group, peers, self.device, timeout, self._describe)
        self._programs: dict[tuple[int, bool], tuple[Schedule, list[Op]]] = {}
        self._state: _StepState | None = None  # the step in progress, for stall reports
        self._broken: str | None = None  # why the engine refuses further steps (see step())
        self.last_stats: StepStats | None = None
        self._steps = 0

    # ---- schedule --------------------------------------------------------------------------------
    def schedule_for(self, num_chunks: int) -> Schedule:
        """The schedule this engine runs for ``num_chunks`` micro-batches (ValueError if impossible)."""
        if not isinstance(num_chunks, int) or isinstance(num_chunks, bool) or num_chunks < 1:
            raise ValueError(f"num_chunks must be a positive int (the number of micro-batches), got {num_chunks!r}")
        src = self._source
        if isinstance(src, Schedule):
            if src.num_ranks != self.num_ranks:
                raise ValueError(f"the schedule is for {src.num_ranks} ranks; the process group has {self.num_ranks}")
            return src
        return generate(src, self.num_ranks, num_chunks, **self._options) if isinstance(src, str) else \
            src(self.num_ranks, num_chunks)

    def _program(self, num_chunks: int, training: bool) -> tuple[Schedule, list[Op]]:
        key = (num_chunks, training)
        if key not in self._programs:
            s = self.schedule_for(num_chunks)
            if isinstance(self._source, Schedule) and s.num_microbatches != num_chunks:
                raise ValueError(f"num_chunks={num_chunks} but the fixed schedule has {s.num_microbatches} "
                                 "micro-batches")
            self._programs[key] = (s, programs(s if training else forward_only(s))[self.rank])
        return self._programs[key]

    # ---- step ------------------------------------------------------------------------------------
    def step(self, *inputs: torch.Tensor | None, num_chunks: int = 0,
             criterion: Callable[..., torch.Tensor] | None = None, labels: Sequence[torch.Tensor | None] = (),
             return_outputs: bool = False) -> tuple[Any, Any]:
        """One training step (or forward-only under ``torch.no_grad()``) over ``num_chunks`` micro-batches.

        ``inputs`` are needed on ranks where micro-batches enter, ``criterion`` and ``labels`` where they
        leave (called as ``criterion(*outputs, *labels)``). Returns ``(loss, outputs)``: on ranks where
        micro-batches leave, the per-micro-batch losses stacked (if a criterion was given) and, with
        ``return_outputs``, the outputs concatenated along ``batch_dim``; None elsewhere.
        """
        if self._broken is not None:
            raise RuntimeError(self._broken)
        training = torch.is_grad_enabled()
        schedule, program = self._program(num_chunks, training)
        self._steps += 1
        try:
            state = _StepState(self, schedule, inputs, criterion, labels, return_outputs, training)
        except (ValueError, TypeError) as exc:
            self._publish_failure(f"{type(exc).__name__}: {exc}")
            raise
        try:
            with self._checkpointing(training):
                state.run(program)
        except PipelineStallError as exc:
            self._refuse_if_pending("stalled")
            raise PipelineStallError(self._gather_reports(str(exc)) + self._rebuild_hint()) from None
        except Exception as exc:  # let the peers' stall reports say why this rank stopped
            self._publish_failure(f"{type(exc).__name__} at {self._op}: {exc}", before=False)
            self._refuse_if_pending(f"failed with {type(exc).__name__}")
            raise
        self._state = None
        if training:
            try:
                self.after_backward()
            except Exception as exc:  # its exchange with the peers may still be in flight
                self._refuse(f"failed after its last action with {type(exc).__name__}")
                raise
        self.last_stats = state.stats()
        return state.results()

    def _refuse_if_pending(self, what: str) -> None:
        """After a failed step: refuse further steps if any of its sends or receives may still be in flight.

        Posted point-to-point operations cannot be cancelled (gloo and NCCL have no such call); one left
        behind would match a message of the next step on the same group, so the engine cannot run again.
        A failure before the first send or receive leaves nothing behind, and the engine stays usable.
        """
        if self.transport.pending():
            self._refuse(what)

    def _refuse(self, what: str) -> None:
        self._broken = (f"this pipeline engine cannot run another step: step {self._steps} {what} while point-to-"
                        f"point operations on process group {self.group.group_name!r} were still in flight, and "
                        "they would match the next step's messages. Build a new engine on a new process group "
                        "(torch.distributed.new_group) on every rank of the pipeline, or restart the job")

    def _rebuild_hint(self) -> str:
        return f"\n{self._broken}" if self._broken is not None else ""

    def after_backward(self) -> None:
        """Called at the end of each training step; :class:`DualPipe` sums its duplicated stages here."""

    @contextlib.contextmanager
    def _checkpointing(self, training: bool) -> Iterator[None]:
        patched = []
        if training:
            for m, flag in zip(self.module, self.checkpoint_flags):
                if flag:
                    forward = m.forward
                    m.forward = functools.partial(torch.utils.checkpoint.checkpoint, forward, use_reentrant=False)
                    patched.append(m)
        try:
            yield
        finally:
            for m in patched:
                del m.forward

    # ---- stall reports ---------------------------------------------------------------------------
    @property
    def _op(self) -> str:
        """What this rank is doing, for stall reports."""
        state = self._state
        if state is None:
            return "no step"
        i, program, name = state.cursor, state.program, state.s.name
        if i >= len(program):
            return f"the end of the step ({len(program)} ops done, waiting for sends)"
        op = program[i]
        what = (f"step {op.index} ({op.step})" if op.what == "compute" else
                f"{op.what} of {op.message.kind}{op.message.stage}.{op.message.microbatch}")
        return f"op {i}/{len(program)} of {name}: {what}"

    def _describe(self) -> str:
        return f"pipeline rank {self.rank} (global rank {dist.get_rank()}) at {self._op}"

    def _store_key(self, rank: int) -> str:
        return f"dualflow/pipeline/{self.group.group_name}/{self._steps}/{rank}"

    def _store(self):
        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:  # a private API: without it reports stay local
            return None

    def _publish_failure(self, text: str, before: bool = True) -> None:
        store = self._store()
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(self._store_key(self.rank), f"failed{' before communicating' if before else ''}: {text}")

    def _gather_reports(self, mine: str, wait_s: float = 2.0) -> str:
        """This rank's stall report plus what the other ranks of the pipeline reported."""
        store = self._store()
        if store is None:
            return mine
        with contextlib.suppress(Exception):
            store.set(self._store_key(self.rank), mine)
        deadline, others = time.monotonic() + wait_s, {}
        while time.monotonic() < deadline and len(others) < self.num_ranks - 1:
            for r in range(self.num_ranks):
                key = self._store_key(r)
                if r != self.rank and r not in others and store.check([key]):
                    others[r] = store.get(key).decode()
            time.sleep(0.05)
        lines = [f"rank {r}: {others.get(r, 'no report (the process may have died or is still waiting)')}"
                 for r in range(self.num_ranks) if r != self.rank]
        return f"pipeline step stalled on rank {self.rank}: {mine}\nother ranks:\n  " + "\n  ".join(lines)


class _StepState:
    """Everything one ``step()`` needs, dropped when it returns (no state survives between steps)."""

    def __init__(self, engine: PipelineEngine, schedule: Schedule, inputs: Sequence[torch.Tensor | None],
                 criterion: Callable | None, labels: Sequence[torch.Tensor | None], return_outputs: bool,
                 training: bool) -> None:
        self.e, self.s, self.training, self.return_outputs = engine, schedule, training, return_outputs
        self.criterion = criterion
        place, r = schedule.placement, engine.rank
        self.modules = dict(zip(engine.stage_ids, engine.module))
        starts = [c for c, stages in enumerate(schedule.chains) if place[stages[0]] == r]
        ends = [c for c, stages in enumerate(schedule.chains) if place[stages[-1]] == r]
        self.inputs: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        given = [t for t in inputs if t is not None]
        for c in starts:
            n = schedule.microbatches[c]
            if not given:
                raise ValueError(f"pipeline rank {r} is where micro-batches enter ({schedule.name}, direction {c}) "
                                 "but step() got no inputs")
            parts = [_split(t, n, engine.batch_dim, f"input {i}") for i, t in enumerate(given)]
            self.inputs[c] = [tuple(p[m].detach() for p in parts) for m in range(n)]
        self.labels: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        for c in ends:
            n = schedule.microbatches[c]
            if criterion is None and training:
                raise ValueError(f"pipeline rank {r} computes the loss ({schedule.name}, direction {c}): a training "
                                 "step needs criterion=... (called as criterion(*outputs, *labels))")
            given_labels = [t for t in labels if t is not None]
            parts = [_split(t, n, engine.batch_dim, f"label {i}") for i, t in enumerate(given_labels)]
            self.labels[c] = [tuple(p[m] for p in parts) for m in range(n)]
        self.ends = ends
        self.scale = 1.0 / schedule.num_microbatches if engine.loss_reduction == "mean" else 1.0
        self.chunks: dict[tuple[int, int], _Chunk] = {}
        self.handoff: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}   # same-rank activations
        self.grads_in: dict[tuple[int, int], list[torch.Tensor]] = {}          # same-rank gradients
        self.outbox: dict[tuple[str, int, int], list[torch.Tensor]] = {}       # produced, not yet sent
        self.layouts: dict[int, tuple[TensorSpec, ...]] = {}                   # activation layout per stage
        self.announced: dict[int, tuple[int, tuple[TensorSpec, ...]]] = {}     # stage -> (micro-batch, its header)
        self.losses: dict[int, dict[int, torch.Tensor]] = {c: {} for c in ends}
        self.outputs: dict[int, dict[int, tuple[torch.Tensor, ...]]] = {c: {} for c in ends}
        self.live = self.peak = 0
        self.compute_s = 0.0
        self.actions = 0
        self.program: list[Op] = []
        self.cursor = 0
        self.t0 = time.perf_counter()

    # ---- driver ----------------------------------------------------------------------------------
    def run(self, program: list[Op]) -> None:
        e, t = self.e, self.e.transport
        t.progress()
        self.program = program
        e._state = self
        for i, op in enumerate(program):
            self.cursor = i
            if op.what == "compute":
                t0 = time.perf_counter()
                with nvtx.range(str(op.step)):
                    self.compute(op.step)
                self.compute_s += time.perf_counter() - t0
                self.actions += 1
                t.progress()
            elif op.what == "send":
                self.send(op.message)
            else:
                self.post(op.message)
        self.cursor = len(program)
        t.finish()

    def send(self, m: Message) -> None:
        tensors = self.outbox.pop((m.kind, m.stage, m.microbatch))
        header = m.kind == "F" and m.stage not in self.announced
        if header:
            self.announced[m.stage] = (m.microbatch, tuple(TensorSpec.of(t) for t in tensors))
        elif m.kind == "F":  # the receiver sizes this message from the header: it must match
            first, specs = self.announced[m.stage]
            _check_layout(tuple(TensorSpec.of(t) for t in tensors), specs,
                          f"stage {m.stage} (pipeline rank {self.e.rank}) output of micro-batch {m.microbatch}",
                          f"micro-batch {first}'s, announced to pipeline rank {m.dst} for this step",
                          "Every micro-batch of a step must have the same shapes and dtypes (the receiver sizes its "
                          "buffers from the first): split the batch into equal micro-batches and return outputs "
                          "whose layout does not depend on the data")
        self.e.transport.send(m, tensors, header)

    def post(self, m: Message) -> None:
        if m.kind == "F":
            self.layouts[m.stage] = self.e.transport.post(m, self.layouts.get(m.stage))
        else:  # gradients of the outputs this rank produced for the stage before m.stage
            consumer = self.s.topology.prev[m.stage]
            self.e.transport.post(m, self.chunks[(consumer, m.microbatch)].grad_specs)

    def compute(self, step: Step) -> None:
        if type(step) is Overlap:
            if self.training and self.e.overlapped and step.backward.kind == "B":
                self.overlapped(step.forward, step.backward)
                return
            self.compute(step.forward)
            self.compute(step.backward)
            return
        if step.kind == "F":
            self.forward(step)
        elif not self.training:
            return
        elif step.kind in ("B", "I"):
            self.backward(step, split=step.kind == "I")
        else:
            chunk = self.chunks.pop((step.stage, step.microbatch))
            chunk.weight()
            self.release()

    # ---- forward ---------------------------------------------------------------------------------
    def stage_inputs(self, a: Action) -> tuple[torch.Tensor, ...]:
        topo, place = self.s.topology, self.s.placement
        p = topo.prev[a.stage]
        if p < 0:
            return self.inputs[topo.chain[a.stage]][a.microbatch]
        if place[p] == self.e.rank:
            received = self.handoff.pop((a.stage, a.microbatch))
            return tuple(x.detach().requires_grad_(x.requires_grad and self.training) for x in received)
        m = Message("F", p, a.microbatch, place[p], self.e.rank)
        tensors = self.e.transport.take(m)
        specs = self.layouts[p]
        return tuple(x.requires_grad_(spec.requires_grad and self.training) for x, spec in zip(tensors, specs))

    def forward(self, a: Action, run: Callable[..., Any] | None = None) -> None:
        """F of ``a``; ``run(module, inputs, criterion, labels)`` replaces the module call (F&B protocol)."""
        inputs = self.stage_inputs(a)
        module = self.modules[a.stage]
        chain = self.s.topology.chain[a.stage]
        last = self.s.topology.next[a.stage] < 0
        use_loss = last and self.criterion is not None
        labels = self.labels[chain][a.microbatch] if use_loss else ()
        if run is None:
            outputs, loss = module(*inputs), None
        else:
            outputs, loss = run(module, list(inputs), self.criterion if use_loss else None, list(labels))
        outputs = self.check_outputs(outputs, inputs, a)
        if use_loss and loss is None:
            loss = self.criterion(*outputs, *labels)
        if use_loss:
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"criterion must return a one-element tensor, got "
                                f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
            self.losses[chain][a.microbatch] = loss.detach()
        if last and self.return_outputs:
            self.outputs[chain][a.microbatch] = tuple(o.detach() for o in outputs)
        if self.training:
            chunk = _Chunk(inputs=inputs)
            if last:
                chunk.loss = loss
            else:
                diff = [o for o in outputs if o.requires_grad]
                chunk.roots = diff if self.e.overlapped else [_edge(o) for o in diff]
                chunk.grad_specs = tuple(TensorSpec(tuple(o.shape), o.dtype, False) for o in diff)
            self.chunks[(a.stage, a.microbatch)] = chunk
            self.live += 1
            self.peak = max(self.peak, self.live)
        if not last:
            n = self.s.topology.next[a.stage]
            if self.s.placement[n] == self.e.rank:
                self.handoff[(n, a.microbatch)] = outputs
            else:
                self.outbox[("F", a.stage, a.microbatch)] = list(outputs)

    def check_outputs(self, out: Any, inputs: tuple[torch.Tensor, ...], a: Action) -> tuple[torch.Tensor, ...]:
        outputs = (out,) if isinstance(out, torch.Tensor) else tuple(out) if isinstance(out, (tuple, list)) else None
        if outputs is None or not outputs or not all(isinstance(o, torch.Tensor) for o in outputs):
            raise TypeError(f"stage {a.stage} must return a tensor or a non-empty tuple/list of tensors, got "
                            f"{type(out).__name__}" + (f" containing {[type(o).__name__ for o in out]}"
                                                        if isinstance(out, (tuple, list)) else ""))
        storages = {x.untyped_storage().data_ptr() for x in inputs if x.numel()}
        for i, o in enumerate(outputs):
            if o.numel() and o.untyped_storage().data_ptr() in storages:
                raise ValueError(f"stage {a.stage} output {i} is a view of (or the same tensor as) one of its inputs; "
                                 "stage outputs must own their memory (the runtime sends them and hands received "
                                 "buffers to autograd per micro-batch): return a new tensor, e.g. x.clone()")
        return outputs

    # ---- backward --------------------------------------------------------------------------------
    def output_grads(self, a: Action) -> list[torch.Tensor]:
        topo, place = self.s.topology, self.s.placement
        n = topo.next[a.stage]
        if place[n] == self.e.rank:
            return self.grads_in.pop((a.stage, a.microbatch))
        return self.e.transport.take(Message("B", n, a.microbatch, place[n], self.e.rank))

    def roots_and_grads(self, a: Action, chunk: _Chunk) -> tuple[list, list]:
        if self.s.topology.next[a.stage] < 0:
            return [chunk.loss], [torch.full_like(chunk.loss, self.scale)]
        return chunk.roots, self.output_grads(a)

    def backward(self, a: Action, split: bool) -> None:
        chunk = self.chunks[(a.stage, a.microbatch)]
        roots, grads = self.roots_and_grads(a, chunk)
        module = self.modules[a.stage]
        hook = getattr(type(module), "split_backward", None)
        if split and hook is not None:
            input_grads, chunk.weight = hook(module, roots, grads, chunk.inputs)
        elif split:
            input_grads, chunk.weight = backward_split(roots, grads, chunk.inputs)
        else:
            input_grads = backward_full(roots, grads, chunk.inputs)
        self.pass_gradients(a, chunk, input_grads)
        if not split:
            del self.chunks[(a.stage, a.microbatch)]
            self.release()

    def pass_gradients(self, a: Action, chunk: _Chunk, input_grads: Sequence[torch.Tensor | None]) -> None:
        """Hand the gradients of the stage's differentiable inputs to the stage before it."""
        topo, place = self.s.topology, self.s.placement
        p = topo.prev[a.stage]
        if p < 0:
            return
        grads = [g if g is not None else torch.zeros_like(x)
                 for x, g in zip(chunk.inputs, input_grads) if x.requires_grad]
        if place[p] == self.e.rank:
            self.grads_in[(p, a.microbatch)] = grads
        else:  # the receiver posted buffers shaped like the activations it sent
            _check_layout(tuple(TensorSpec(tuple(g.shape), g.dtype, False) for g in grads),
                          tuple(TensorSpec(tuple(x.shape), x.dtype, False) for x in chunk.inputs if x.requires_grad),
                          f"stage {a.stage} (pipeline rank {self.e.rank}) input gradients of micro-batch "
                          f"{a.microbatch}", "its inputs'",
                          "The stage before it receives into buffers shaped like the activations it sent: a "
                          "split_backward hook must return one gradient per input, of that input's shape and dtype")
            self.outbox[("B", a.stage, a.microbatch)] = grads
        chunk.inputs = ()  # the graph keeps what W still needs

    def release(self) -> None:
        self.live -= 1

    def overlapped(self, f: Action, b: Action) -> None:
        """F&B through the stage class's ``overlapped_forward_backward(module0, inputs0, criterion0, labels0,
        module1, loss1, outputs1, output_grads1) -> (outputs0, loss0)``."""
        chunk = self.chunks[(b.stage, b.microbatch)]
        roots, grads = self.roots_and_grads(b, chunk)
        last_b = self.s.topology.next[b.stage] < 0
        loss1 = roots[0] * self.scale if last_b and self.scale != 1.0 else roots[0] if last_b else None
        module1 = self.modules[b.stage]
        cls = type(module1)

        def run(module0, inputs0, criterion0, labels0):
            return cls.overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1,
                                                   None if last_b else list(roots), None if last_b else list(grads))

        self.forward(f, run)
        self.pass_gradients(b, chunk, [x.grad if x.requires_grad else None for x in chunk.inputs])
        del self.chunks[(b.stage, b.microbatch)]
        self.release()

    # ---- results ---------------------------------------------------------------------------------
    def results(self) -> tuple[Any, Any]:
        if not self.ends:
            return None, None
        c = self.ends[0]
        n = self.s.microbatches[c]
        loss = torch.stack([self.losses[c][m] for m in range(n)]) if self.criterion is not None else None
        outputs = None
        if self.return_outputs:
            per_mb = [self.outputs[c][m] for m in range(n)]
            outputs = tuple(torch.cat([o[i] for o in per_mb], self.e.batch_dim) for i in range(len(per_mb[0])))
            outputs = outputs[0] if len(outputs) == 1 else outputs
        return loss, outputs

    def stats(self) -> StepStats:
        expected = peak_activations(self.s.actions[self.e.rank]) if self.training else 0
        return StepStats(time.perf_counter() - self.t0, self.compute_s, self.actions, self.peak, expected)


class DualPipe(PipelineEngine):
    """DeepSeek-V3's bidirectional DualPipe, API-compatible with DeepSeek's ``DualPipe``.

    Rank r holds ``modules = (stage r, stage P-1-r)`` of a P-stage model. Inputs: on rank 0 the first half
    of the batch, on rank P-1 the second half; labels and losses: rank 0 has those of the micro-batches
    that entered at rank P-1 and rank P-1 those that entered at rank 0. After each training step the
    gradients of the two copies of every stage are summed (:meth:`sum_duplicated_grads`); pass
    ``sum_duplicated_grads=False`` to keep them apart, as DeepSeek's module does.
    """

    def __init__(self, modules: tuple[nn.Module, nn.Module], batch_dim: int = 0,
                 process_group: dist.ProcessGroup | None = None, rank_mapping: Sequence[int] | None = None, *,
                 sum_duplicated_grads: bool = True, **options: Any) -> None:
        group = process_group or (dist.group.WORLD if dist.is_initialized() else None)
        if group is not None and dist.get_world_size(group) % 2:
            P = dist.get_world_size(group)
            raise ValueError(f"DualPipe needs an even number of ranks (rank r pairs with rank P-1-r), got {P}; use "
                             f"{max(P - 1, 2)} or {P + 1} ranks, or DualPipeV, which takes any number")
        super().__init__(tuple(modules), "dualpipe", batch_dim=batch_dim, process_group=process_group,
                         rank_mapping=rank_mapping, **options)
        self.sum_duplicated = sum_duplicated_grads

    def after_backward(self) -> None:
        if self.sum_duplicated:
            self.sum_duplicated_grads()

    def sum_duplicated_grads(self) -> None:
        """Add to each stage's gradients those of its copy on rank P-1-r, so both copies hold the true gradient."""
        mirror = self.num_ranks - 1 - self.rank
        mine = [list(m.parameters()) for m in self.module]            # stage r, stage P-1-r
        theirs = [mine[1], mine[0]]                                   # the mirror holds them swapped
        send = [self._flat(ps) for ps in mine]
        recv = [torch.empty_like(send[1]), torch.empty_like(send[0])]  # the mirror's stages come swapped
        peer = self.transport.peers[mirror]
        ops = [dist.P2POp(dist.isend, t, peer, self.group) for t in send] + \
              [dist.P2POp(dist.irecv, t, peer, self.group) for t in recv]
        for work in dist.batch_isend_irecv(ops):
            self.transport._host_wait(work, f"the gradients of rank {mirror}'s stage copies")
        for params, flat in zip(theirs, recv):
            offset = 0
            for p in params:
                n = p.numel()
                g = flat[offset:offset + n].view_as(p).to(p.dtype)
                offset += n
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)

    def _flat(self, params: list[torch.Tensor]) -> torch.Tensor:
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        if not params:
            return torch.zeros(0, dtype=dtype, device=self.device)
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                          for p in params])


class DualPipeV(PipelineEngine):
    """DualPipeV ("cut-in-half" DualPipe), API-compatible with DeepSeek's ``DualPipeV``.

    Rank r holds ``modules = (stage r, stage 2P-1-r)`` of a 2P-stage model; inputs, labels and losses
    live on rank 0; any number of ranks.
    """

    def __init__(self, modules: tuple[nn.Module, nn.Module], batch_dim: int = 0,
                 process_group: dist.ProcessGroup | None = None, rank_mapping: Sequence[int] | None = None,
                 **options: Any) -> None:
        super().__init__(tuple(modules), "dualpipev", batch_dim=batch_dim, process_group=process_group,
                         rank_mapping=rank_mapping, **options)
