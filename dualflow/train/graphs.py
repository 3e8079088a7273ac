"""A one-GPU training step replayed as a CUDA graph: the host issues one launch instead of thousands.

:class:`GraphedEngine` wraps a :class:`~dualflow.train.engine.LocalEngine` whose forward and backward make
no host synchronisation and have static shapes (one GPU, no expert-parallel exchange). Its first
``warmup`` steps run eagerly (Triton compilation, library handles, the FP8 backends' one-time probes);
the next one is captured into a CUDA graph, with the inputs copied into static buffers, and every later
step replays it. What the capture relies on:

- gradients: every parameter's ``.grad`` is None when the capture starts, so the captured backward
  writes the first micro-batch's gradients fresh and adds the others: each replay recomputes them from
  scratch into the same tensors. The caller must therefore leave ``.grad`` in place between steps
  (``keeps_grads``), which the optimizer may divide in place (clipping);
- weights and buffers are updated in place between replays (the optimizer, the router biases), so the
  graph reads their current values; the FP8 weight copies are remade inside the graph at every replay,
  as the eager step remakes them after every optimizer step, or (``train.fp8_weight_snapshots``) are
  rewritten in place into the storage the graph reads, after every optimizer step;
- autocast runs without its weight-cast cache (``Stage.autocast``), which would hold tensors from the
  capture.

If the capture fails, the engine logs one line and stays eager.
"""

from __future__ import annotations

import torch

from dualflow.train.engine import LocalEngine
from dualflow.utils.logging import get_logger

_log = get_logger("dualflow.train")


class GraphedEngine:
    """``inner.step`` captured once after ``warmup`` eager steps, then replayed (see the module docstring)."""

    def __init__(self, inner: LocalEngine, warmup: int = 2, on_fallback=None) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 eager step before the capture, got {warmup}")
        self.inner, self.warmup = inner, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None
        self.captures = self.replays = 0
        self._eager_steps = 0
        self._static: tuple[torch.Tensor, torch.Tensor] | None = None
        self._total: torch.Tensor | None = None
        self._on_fallback = on_fallback or _log.warning

    @property
    def keeps_grads(self) -> bool:
        """True once the step is a graph: ``.grad`` tensors belong to it and must not be replaced."""
        return self.graph is not None

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.graph is None and (self.failed or self._eager_steps < self.warmup):
            self._eager_steps += 1
            return self.inner.step(inputs, labels)
        if self.graph is None:
            self._capture(inputs, labels)
            if self.graph is None:
                return self.inner.step(inputs, labels)
        x, y = self._static
        if inputs.shape != x.shape or labels.shape != y.shape:
            raise ValueError(f"a captured step has static shapes: inputs {tuple(x.shape)}, labels "
                             f"{tuple(y.shape)}; got {tuple(inputs.shape)} and {tuple(labels.shape)}")
        x.copy_(inputs, non_blocking=True)
        y.copy_(labels, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self._total, self.inner.chunks

    def evaluate(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self.inner.evaluate(inputs, labels)

    def _capture(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        params = list(self.inner.stage.parameters())
        stale = [p for p in params if p.grad is not None]
        if stale:
            raise RuntimeError(f"{len(stale)} parameter(s) still hold gradients before the capture; the caller "
                               "must drop them (p.grad = None) after every eager step")
        x, y = inputs.clone(), labels.clone()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks back to the device: the graph has its own pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                total, _ = self.inner.step(x, y)
        except Exception as exc:
            torch.cuda.synchronize()
            for p in params:
                p.grad = None
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self._on_fallback(f"CUDA graph capture of the training step failed, steps stay eager: {self.failed}")
            return
        self.graph, self._static, self._total = graph, (x, y), total
        self.captures += 1
