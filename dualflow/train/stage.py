"""The pipeline's stage module: a model :class:`~dualflow.train.model.Stage` whose forward is recorded phase
by phase, so that a forward of one micro-batch and the backward of another can be interleaved.

``overlapped_forward_backward`` (the pipeline runtime calls it for every F&B pair when both modules are
of this class) follows DeepSeek-V3's Figure 4: each layer's forward is attention -> dispatch -> MLP ->
combine and its backward the reverse, and a communication phase of one micro-batch is always paired
with a computation phase of the other::

    B combine  || F attention
    F dispatch || B MLP
    B dispatch || F MLP
    F combine  || B attention

On CUDA the communication phase runs on a side stream while the computation is issued on the current
one; on the CPU the pair runs one after the other, communication first, in the same order on every
rank of the expert-parallel group.

The backward of a recorded forward runs phase by phase (``torch.autograd.grad`` over each phase's
piece of the graph, parameter gradients accumulated as autograd accumulates them). Because no tensor of
the model has more than two gradient contributions (see model.py), this is bitwise equal to the plain
autograd backward the runtime runs for a non-overlapped B.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from dualflow.train.model import Phase, Stage, State
from dualflow.utils import nvtx


def _differentiable(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.requires_grad


class _Record:
    """One micro-batch's forward: per phase, its (boundary -> source) inputs and its output state.

    The stage output itself is not held (its memory goes when the runtime drops it), only where its
    gradient enters the graph (``output``).
    """

    def __init__(self, inputs: tuple[torch.Tensor, ...]) -> None:
        # the stage inputs: leaves when the stage before is elsewhere (or on another chunk); the hidden state
        # first, then, with multi-token prediction, the token ids
        self.inputs = inputs
        self.steps: list[tuple[Phase, list[tuple[torch.Tensor, torch.Tensor]], State]] = []
        self.output: GradientEdge | None = None
        self.hook: Any = None


class _Backward:
    """Runs a recorded forward's backward one phase at a time, last phase first.

    Each phase read its differentiable inputs through fresh views (the boundaries), so
    ``torch.autograd.grad(phase outputs, boundaries + phase parameters)`` covers exactly that phase's piece
    of the graph. Parameter gradients are summed over the phases and accumulated once at the end, as
    autograd's AccumulateGrad does for one backward.
    """

    def __init__(self, record: _Record, grad: torch.Tensor) -> None:
        self.steps = list(record.steps)
        self.final: tuple[GradientEdge, torch.Tensor] | None = (record.output, grad)  # the last phase's output
        # id -> (tensor, gradient); the tensor is held so that its id cannot be reused meanwhile
        self.grads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.param_grads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.inputs = [t for t in record.inputs if _differentiable(t)]

    @staticmethod
    def _add(store: dict, t: torch.Tensor, g: torch.Tensor | None) -> None:
        if g is None:
            return
        if id(t) in store:
            g = store[id(t)][1] + g
        store[id(t)] = (t, g)

    def peek(self) -> str | None:
        return self.steps[-1][0].kind if self.steps else None

    def run_next(self) -> list[torch.Tensor]:
        """Run the next phase's backward; return the gradients it produced (the caller may fence them)."""
        phase, bounds, out = self.steps.pop()
        ins = [b for b, _ in bounds]
        outs: list = []
        gouts, through = [], {}
        if self.final is not None:
            outs.append(self.final[0])
            gouts.append(self.final[1])
            self.final = None
        for t in out.values():
            if not _differentiable(t) or id(t) not in self.grads:
                continue  # not differentiable, or read by nothing downstream
            g = self.grads.pop(id(t))[1]
            if any(t is b for b in ins):
                through[id(t)] = g  # passed through unchanged: its gradient goes straight to the input
            else:
                outs.append(t)
                gouts.append(g)
        params = [p for m in phase.modules for p in m.parameters() if p.requires_grad]
        got: Sequence[torch.Tensor | None] = [None] * (len(ins) + len(params))
        if outs:
            with nvtx.range(f"B.{phase.name}"):
                got = torch.autograd.grad(outs, ins + params, gouts, allow_unused=True)
        for (b, src), g in zip(bounds, got[:len(ins)]):
            if id(b) in through:
                g = through[id(b)] if g is None else g + through[id(b)]
            self._add(self.grads, src, g)
        for p, g in zip(params, got[len(ins):]):
            self._add(self.param_grads, p, g)
        return [g for g in got if g is not None]

    def finish(self) -> None:
        """Accumulate parameter gradients, and the stage inputs' gradients into their ``.grad`` (leaves)."""
        leaves = [p for p, _ in self.param_grads.values()] + self.inputs
        grads = [g for _, g in self.param_grads.values()] + [self.grads.pop(id(t), (None, None))[1]
                                                             for t in self.inputs]
        with torch.no_grad():
            for p, g in zip(leaves, grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad += g


class _Forward:
    """Runs a stage's forward one phase at a time, recording it when gradients are on."""

    def __init__(self, stage: Stage, inputs: tuple[torch.Tensor, ...], record: _Record | None) -> None:
        self.stage, self.record = stage, record
        self.phases = deque(stage.phases())
        self.state: State = stage.input_state(*inputs)
        self.device = inputs[0].device

    def peek(self) -> str | None:
        return self.phases[0].kind if self.phases else None

    def run_next(self) -> list[torch.Tensor]:
        """Run the next phase; return the tensors of its output state."""
        phase = self.phases.popleft()
        bounds = []
        inp = dict(self.state)
        if self.record is not None:  # each differentiable input enters the phase through its own view
            for k, v in self.state.items():
                if _differentiable(v):
                    inp[k] = v.view_as(v)
                    bounds.append((inp[k], v))
        with nvtx.range(f"F.{phase.name}"), self.stage.autocast(self.device):
            self.state = phase.fn(inp)
        if self.record is not None:
            self.record.steps.append((phase, bounds, self.state))
        return [v for v in self.state.values() if isinstance(v, torch.Tensor)]

    @property
    def output(self) -> Any:
        return self.stage.output(self.state)


class PipelineStage(nn.Module):
    """What the pipeline runtime holds for one stage without overlap: the model stage, run whole."""

    def __init__(self, stage: Stage) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.stage(*inputs)


class OverlappedStage(PipelineStage):
    """A stage whose forwards are recorded phase by phase, with the runtime's F&B hook (module docstring)."""

    def __init__(self, stage: Stage) -> None:
        super().__init__(stage)
        self._records: dict[Any, _Record] = {}  # by the autograd node that produced the output
        self.comm_stream: Any = None  # on CUDA, set by the engine: where communication phases run
        self.interleaved = self.fallbacks = 0  # F&B pairs run phase by phase / with autograd's backward

    def forward(self, *inputs: torch.Tensor) -> Any:
        fwd = self.start_forward(*inputs)
        while fwd.peek() is not None:
            fwd.run_next()
        return self.finish_forward(fwd)

    def start_forward(self, *inputs: torch.Tensor) -> _Forward:
        return _Forward(self.stage, inputs, _Record(inputs) if torch.is_grad_enabled() else None)

    def finish_forward(self, fwd: _Forward) -> Any:
        output = fwd.output
        out = output[0] if isinstance(output, tuple) else output  # the differentiable one (then token ids)
        record = fwd.record
        if record is not None and out.requires_grad:
            phase, bounds, state = record.steps[-1]
            record.steps[-1] = (phase, bounds, {k: v for k, v in state.items() if v is not out})
            record.output = get_gradient_edge(out)
            node = record.output.node
            records = self._records

            def drop(_grads: Any, node: Any = node) -> None:
                # autograd reached the output: the runtime runs this backward itself, the record is not needed
                records.pop(node, None)

            record.hook = node.register_prehook(drop)
            records[node] = record
        return output

    def _take_record(self, node: Any) -> _Record | None:
        record = self._records.pop(node, None)
        if record is not None:
            record.hook.remove()
        return record

    def _record_under(self, loss: torch.Tensor, depth: int = 8) -> _Record | None:
        """The record of the output that ``loss`` was computed from (a short walk up the loss's graph)."""
        frontier = [loss.grad_fn]
        for _ in range(depth):
            for node in frontier:
                if node in self._records:
                    return self._take_record(node)
            frontier = [c for node in frontier if node is not None for c, _ in node.next_functions if c is not None]
        return None

    @classmethod
    def overlapped_forward_backward(
        cls,
        module0: OverlappedStage,
        inputs0: Sequence[torch.Tensor],
        criterion0: Callable[..., torch.Tensor] | None,
        labels0: Sequence[torch.Tensor],
        module1: OverlappedStage,
        loss1: torch.Tensor | None,
        outputs1: Sequence[torch.Tensor] | None,
        output_grads1: Sequence[torch.Tensor] | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Forward of micro-batch 0 on ``module0`` interleaved with the backward of micro-batch 1 on ``module1``.

        ``loss1`` is given when ``module1`` is a last stage (its backward starts from the loss), else
        ``output_grads1`` holds the gradients of ``outputs1``. Parameter gradients accumulate in place and
        the gradients of micro-batch 1's stage input land in its ``.grad``. Returns (outputs0, loss0).
        """
        if loss1 is not None:
            record = module1._record_under(loss1)
            grad = torch.autograd.grad(loss1, record.output)[0] if record is not None else None
        else:
            outputs1, output_grads1 = list(outputs1 or ()), list(output_grads1 or ())
            single = len(outputs1) == 1 and outputs1[0].grad_fn is not None
            record = module1._take_record(outputs1[0].grad_fn) if single else None
            grad = output_grads1[0] if record is not None else None
        fwd = module0.start_forward(*inputs0)
        if record is None:  # not recorded phase by phase: forward, then autograd's own backward
            module1.fallbacks += 1
            while fwd.peek() is not None:
                fwd.run_next()
            if loss1 is not None:
                loss1.backward()
            else:
                torch.autograd.backward(outputs1, output_grads1)
        else:
            module1.interleaved += 1
            bwd = _Backward(record, grad)
            _interleave(fwd, bwd, module0.comm_stream)
            bwd.finish()
        out0 = module0.finish_forward(fwd)
        outputs0 = list(out0) if isinstance(out0, tuple) else [out0]
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        return outputs0, loss0


def _interleave(fwd: _Forward, bwd: _Backward, comm_stream: Any) -> None:
    """Pair each communication phase of one side with the next computation phase of the other."""
    while fwd.peek() is not None or bwd.peek() is not None:
        f, b = fwd.peek(), bwd.peek()
        if b == "comm" and f != "comm":
            _overlap(bwd.run_next, fwd.run_next if f else None, comm_stream)
        elif f == "comm" and b != "comm":
            _overlap(fwd.run_next, bwd.run_next if b else None, comm_stream)
        elif f is not None:  # both compute or both communicate: the forward goes first
            fwd.run_next()
        else:
            bwd.run_next()


def _overlap(comm: Callable[[], list[torch.Tensor]], compute: Callable[[], object] | None, stream: Any) -> None:
    """Run ``comm`` (on ``stream`` when given, a CUDA side stream) and ``compute`` on the current stream."""
    if stream is None:
        comm()
        if compute is not None:
            compute()
        return
    current = torch.cuda.current_stream()
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        produced = comm()
    if compute is not None:
        compute()
    current.wait_stream(stream)
    for t in produced:  # made on the side stream, used and freed on this one: keep the allocator from reusing it early
        t.record_stream(current)
