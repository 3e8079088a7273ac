"""``train.compile``: ``torch.compile`` of a stage's compute phases, one phase at a time.

A stage's forward is a list of phases (:class:`~dualflow.train.model.Phase`). :class:`PhaseCompiler`
replaces the function of each compute phase whose shapes are the same at every step (``Phase.static``:
attention with its norms and router, a dense MLP, the routed experts when one process holds them all,
the head; not the embedding lookup) by its compiled version, so that the elementwise work between the
GEMMs (norms, rotary embeddings, casts, SwiGLU, the experts' permutation) runs as fused kernels. The
layers of a stage share their compiled code: the compiler treats a module's parameters as inputs, so
eight identical layers compile once.

- Shapes are static (``dynamic=False``): a step's micro-batches all have one shape; the experts of an
  expert-parallel rank receive a different number of rows at every step, so that phase stays eager.
- Only phases run with gradients are compiled; validation (``torch.no_grad``) runs the eager functions
  rather than compiling a second, inference-only version of every phase for a few batches.
- FP8 layers trace through their custom operators; compiled, they quantize their weights inside the
  graph at every call, or (``train.fp8_weight_snapshots``) read their FP8 copies from snapshots the
  trainer rewrites after every optimizer step (``dualflow.fp8.nn.Fp8WeightSnapshot``), so that a step's
  micro-batches share one quantization, as eager calls share the weight caches'.
- A phase whose compilation fails stays eager for the rest of the run; one line is logged per distinct
  failure (torch 2.11-2.13 cannot trace the float32 grouped GEMM of the experts, for one). A real error
  of the phase itself is raised again by the eager run.

The overlapped pipeline step runs the backward of compiled phases piece by piece as it does for eager
ones (``torch.autograd.grad`` over each phase), and a CUDA-graph capture of the step (``train/graphs.py``)
records the compiled kernels like any others once the eager warm-up steps have compiled them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dualflow.train.model import Phase, State
from dualflow.utils.logging import get_logger

_log = get_logger("dualflow.train")


def eager_reason(phase: Phase) -> str | None:
    """Why ``phase`` is not compiled (None: it is): communication, data-dependent shapes, the embedding."""
    if phase.kind != "compute":
        return "a communication phase"
    if not phase.static:
        return "its row count changes from step to step (expert parallelism)"
    if phase.name == "embed":
        # a lookup, nothing to fuse; compiled, its backward sums the rows of repeated tokens in another
        # order (with atomics on a GPU: run to run differences)
        return "the embedding lookup (nothing to fuse; its compiled backward is not deterministic)"
    return None


def _reason(exc: Exception) -> str:
    """One line: the compiler's exception and, where it wraps one, the error underneath."""
    root = exc
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None and inner is not root:
        root = inner
    text = f"{type(exc).__name__}: {exc}" if root is exc else f"{type(exc).__name__} ({type(root).__name__}: {root})"
    return " ".join(text.split())[:300]


class _CompiledFn:
    """``fn`` compiled, or ``fn`` itself after a failed first call (reported) and without gradients."""

    def __init__(self, name: str, fn: Callable[[State], State], backend: Any, on_fallback: Callable[[str], Any]):
        self.name, self.fn, self.on_fallback = name, fn, on_fallback
        self.compiled: Callable[[State], State] | None = torch.compile(fn, backend=backend, dynamic=False)
        self.proven = False  # the compiled function has run once
        self.failed: str | None = None

    def __call__(self, state: State) -> State:
        if self.compiled is None or not torch.is_grad_enabled():
            return self.fn(state)
        if self.proven:
            return self.compiled(state)
        try:
            out = self.compiled(state)
        except Exception as exc:  # any compiler failure; a real error of the phase recurs in the eager run
            self.compiled, self.failed = None, _reason(exc)
            self.on_fallback(self.name, self.failed)
            return self.fn(state)
        self.proven = True
        return out


class PhaseCompiler:
    """Compiled versions of a stage's phases, made once per phase name (see the module docstring)."""

    def __init__(self, backend: Any = "inductor", on_fallback: Callable[[str], Any] | None = None) -> None:
        self.backend = backend  # a torch.compile backend: a name or a callable
        self.log = on_fallback or _log.warning
        self._fns: dict[str, _CompiledFn] = {}
        self.eager: dict[str, str] = {}  # phase name -> why it is not compiled
        self._reported: set[str] = set()

    def _failed(self, name: str, why: str) -> None:
        # one line per distinct failure: the layers share their code and fail alike
        if why not in self._reported:
            self._reported.add(why)
            self.log(f"torch.compile of phase {name} failed, it (and any phase failing alike) stays eager: {why}")

    def wrap(self, phase: Phase) -> Phase:
        """``phase`` with its function compiled, or unchanged where :func:`eager_reason` says so."""
        fn = self._fns.get(phase.name)
        if fn is None:
            why = self.eager.get(phase.name) or eager_reason(phase)
            if why is not None:
                self.eager[phase.name] = why
                return phase
            fn = self._fns[phase.name] = _CompiledFn(phase.name, phase.fn, self.backend, self._failed)
        return phase._replace(fn=fn)

    def compiled_names(self) -> list[str]:
        """The phases running compiled (those whose compilation failed excluded)."""
        return [name for name, fn in self._fns.items() if fn.failed is None]

    def summary(self) -> str:
        """One line: how many phases are (still) to be compiled, and which stay eager and why."""
        reasons: dict[str, list[str]] = {}
        for name, why in self.eager.items():
            reasons.setdefault(why, []).append(name)
        for name, fn in self._fns.items():
            if fn.failed is not None:
                reasons.setdefault(f"compilation failed ({fn.failed})", []).append(name)
        kept = "; ".join(f"{', '.join(names)}: {why}" for why, names in reasons.items())
        backend = self.backend if isinstance(self.backend, str) else getattr(self.backend, "__name__", "custom")
        return (f"compile: {len(self.compiled_names())} phase(s) to compile with torch.compile "
                f"(backend {backend})" + (f"; eager: {kept}" if kept else ""))


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why ``train.compile = "auto"`` leaves compilation off on ``device`` (None: it turns it on)."""
    if device.type != "cuda":
        return (f"the device is {device.type}: compiling costs minutes of CPU time for little gain there "
                "(train.compile = 'on' forces it)")
    try:
        import triton  # noqa: F401 - inductor's GPU kernels are Triton kernels
    except ImportError:
        return "triton is not installed (inductor generates Triton kernels for GPUs)"
    return None
