"""FP8 training modules: ``Fp8Linear`` (drop-in ``nn.Linear``) and ``Fp8GroupedLinear`` (MoE experts).

All three GEMMs of a linear layer run in FP8 with FP32 accumulation (DeepSeek-V3 recipe):

    forward       y  = x  @ W.T     x 1x128 (along in_features), W 128x128
    input grad    dx = dy @ W       dy 1x128 (along out_features), W.T 128x128 (the same blocks, transposed)
    weight grad   dW = dy.T @ x     dy.T and x.T 1x128 along the tokens (128x1 quantization of dy and x)

The forward quantizes ``x`` once into both layouts and keeps only the 128x1 one (FP8 + scales, about half
of ``x`` in BF16) for the weight gradient. The FP8 copy of the weight (and its transpose, made at the
first backward) is cached per module and rebuilt when the weight changes: the cache key holds the
parameter's version counter, which in-place updates (``copy_``, foreach optimizers) advance, its storage,
and the number of ``torch.optim`` steps taken in the process, because fused optimizers (``fused=True``)
update parameters without advancing their version counters. All micro-batches of one optimizer step
share one quantization. ``invalidate_fp8_cache()`` (or :func:`invalidate_fp8_caches` on a model) drops it
explicitly, for weights changed by other means under ``torch.no_grad()`` that bypass both.

Under ``torch.compile`` the layers trace without graph breaks (every kernel is a ``torch.ops.dualflow``
operator) and quantize their weights inside the graph at every call: the cache's Python state cannot be
traced. In eager mode ``Fp8Linear`` resolves its backends once per device and calls the kernels directly
(:mod:`dualflow.fp8.ops`); inputs it cannot take that way go through the validated public functions.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from dualflow.fp8.gemm import ENV_BACKEND, BackendUnavailable, fp8_gemm, fp8_grouped_gemm, resolve_backend
from dualflow.fp8.ops import gemm_entry, quantize_entry
from dualflow.fp8.quant import (
    BLOCK,
    TRITON_QUANT_BACKENDS,
    quantize_1x128,
    quantize_1x128_and_128x1,
    quantize_128x1,
    quantize_128x128,
    quantize_128x128_transposed,
    resolve_quant_backend,
)
from dualflow.fp8.recipe import Fp8Recipe

_GEMM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class _Fp8Weight:
    """One FP8 quantization of a weight ([out, in] or [G, out, in]) and of its transpose: the one the
    quantizer wrote in the same pass, or else one made from it on demand."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, qt: torch.Tensor | None = None,
                 scales_t: torch.Tensor | None = None) -> None:
        self.q, self.scales = q, scales
        self._t: tuple[torch.Tensor, torch.Tensor] | None = (qt, scales_t) if qt is not None else None

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        # 128x128 blocks of W.T are the blocks of W transposed: same scales, same bytes
        if self._t is None:
            self._t = (self.q.transpose(-1, -2).contiguous(), self.scales.transpose(-1, -2).contiguous())
        return self._t


class _OptimizerSteps:
    """Counts ``torch.optim`` steps taken in this process (a global post-step hook, registered once).

    The one piece of process-wide state of the FP8 layers, and deliberately so: an optimizer step is the
    only event that reveals a fused optimizer's update. Another model's optimizer stepping costs at most
    one extra quantization of a weight that did not change; it never serves a stale one.
    """

    count = 0
    handle = None

    @classmethod
    def current(cls) -> int:
        if cls.handle is None:
            cls.handle = register_optimizer_step_post_hook(cls._bump)
        return cls.count

    @classmethod
    def _bump(cls, *_args) -> None:
        cls.count += 1


def _split(w: torch.Tensor) -> tuple[bool, int]:
    """How the quantizer takes weight ``w``: ``(stacked, groups)``. A matrix is one piece of one row group.
    Stacked experts whose rows fill whole 128-row blocks (or no experts) are one matrix of all their rows,
    one row group per expert, so that no 128x128 block spans two experts: one launch. Other stacks go
    expert by expert."""
    stacked = w.dim() == 3 and (w.shape[1] % BLOCK == 0 or w.shape[0] == 0)
    return stacked, max(w.shape[0], 1) if stacked else 1


def _pieces(t: torch.Tensor, stacked: bool) -> list[torch.Tensor]:
    """The 2-D pieces of a weight, or of one of its FP8 outputs, as :func:`_split` says the quantizer takes
    them (views where ``t`` is contiguous)."""
    if t.dim() == 2:
        return [t]
    return [t.reshape(-1, t.shape[-1])] if stacked else list(t.unbind(0))


def quantize_weight(weight: torch.Tensor, recipe: Fp8Recipe, transposed: bool = False) -> tuple[torch.Tensor, ...]:
    """128x128 blocks of ``weight`` ([out, in] or stacked experts [G, out, in]; a block never spans two
    experts): ``(q, scales)``, and with ``transposed`` also ``(qt, scales_t)`` of ``weight.T`` (of each
    expert's) written by the same pass, the input gradient's operand. What :class:`Fp8WeightCache` keeps,
    and what a traced layer computes at every call."""
    # autocast off: it has no rule for stacking FP8 tensors (and nothing here should be recast)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        w = weight.detach()
        kw = dict(pow2_scales=recipe.pow2_scales, backend=recipe.quant_backend)
        stacked, groups = _split(w)
        parts = [quantize_128x128_transposed(x, groups=groups, **kw) if transposed else quantize_128x128(x, **kw)
                 for x in _pieces(w, stacked)]
        if w.dim() == 2:
            return parts[0]
        if not stacked:
            return tuple(torch.stack(p) for p in zip(*parts))
        experts, rows, cols = w.shape
        rb, cb = -(-rows // BLOCK), -(-cols // BLOCK)
        shapes = ((experts, rows, cols), (experts, rb, cb), (experts, cols, rows), (experts, cb, rb))
        return tuple(t.view(shape) for t, shape in zip(parts[0], shapes))


class Fp8WeightCache:
    """The FP8 copy of one weight, remade only when the weight's version, storage or recipe changes."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._entry: _Fp8Weight | None = None
        self.builds = 0  # how many times a quantization was made (what the tests and users can check)

    def get(self, weight: torch.Tensor, recipe: Fp8Recipe, transposed: bool = False) -> _Fp8Weight:
        """The FP8 weight; ``transposed``: its transpose will be wanted too (written by the same pass when
        the copy is made now; an entry made without it makes it from ``q`` on demand)."""
        key = (weight._version, _OptimizerSteps.current(), weight.data_ptr(), weight.device, weight.dtype,
               tuple(weight.shape), recipe.pow2_scales, recipe.quant_backend)
        if key != self._key:
            self._entry, self._key = _Fp8Weight(*quantize_weight(weight, recipe, transposed)), key
            self.builds += 1
        return self._entry

    def invalidate(self) -> None:
        self._key = self._entry = None


class Fp8WeightSnapshot:
    """A weight's FP8 copy and its transpose's (:func:`quantize_weight` with ``transposed``) in storage
    that stays put: :meth:`refresh` rewrites it in place.

    What a compiled FP8 layer reads instead of quantizing its weight at every call (traced code cannot
    consult :class:`Fp8WeightCache`'s keys, and a CUDA graph replays fixed addresses), so that the
    micro-batches of a step share one quantization, as eager calls share the cache's. Whoever changes the
    weight refreshes the snapshot before the next compiled call (the trainer: after every optimizer step
    and checkpoint load, under ``train.fp8_weight_snapshots``; see :func:`enable_fp8_snapshots`); eager
    calls never read it.
    """

    def __init__(self) -> None:
        self.tensors: tuple[torch.Tensor, ...] | None = None
        self.refreshes = 0  # how many times it was written (what the tests and users can check)

    def refresh(self, weight: torch.Tensor, recipe: Fp8Recipe) -> None:
        """Quantize ``weight`` into the snapshot. Its storage is made once and then rewritten in place (a
        CUDA graph that read it reads the new values): by the Triton kernel directly, by the reference
        through a copy. Only a weight of another shape or device gets new storage."""
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            w = weight.detach()
            if self.tensors is None or not self._fits(w):
                self.tensors = quantize_weight(w, recipe, transposed=True)
            elif resolve_quant_backend(recipe.quant_backend, w.device) in TRITON_QUANT_BACKENDS:
                self._write(w, recipe)
            else:
                for mine, fresh in zip(self.tensors, quantize_weight(w, recipe, transposed=True)):
                    mine.copy_(fresh)
        self.refreshes += 1

    def _fits(self, w: torch.Tensor) -> bool:
        q, _, qt, _ = self.tensors
        return q.shape == w.shape and q.device == w.device and qt.shape == (*w.shape[:-2], w.shape[-1], w.shape[-2])

    def _write(self, w: torch.Tensor, recipe: Fp8Recipe) -> None:
        from dualflow.fp8.kernels.quant import quantize as _triton

        if w.numel() == 0:  # nothing to write (and an empty piece's views need not line up)
            return
        # the pieces quantize_weight quantizes, written into the matching views of the snapshot
        stacked, groups = _split(w)
        outs = zip(*(_pieces(t, stacked) for t in self.tensors))
        for x, out in zip(_pieces(w, stacked), outs):
            _triton(x, rowwise=False, colwise=False, blockwise=True, pow2_scales=recipe.pow2_scales,
                    transposed_groups=groups, out=out)


def enable_fp8_snapshots(model: nn.Module, where: Callable[[nn.Module], bool] | None = None) -> int:
    """Give every FP8 module of ``model`` (one with an ``enable_fp8_snapshot()`` method: :class:`Fp8Linear`,
    MoE experts holding stacked weights) for which ``where`` holds (default: all) :class:`Fp8WeightSnapshot`
    storage for its compiled calls, and fill it; returns how many. From then on
    :func:`refresh_fp8_snapshots` must run after every change of the weights and before the next compiled
    call, or those calls compute with the old weights."""
    count = 0
    for module in model.modules():
        enable = getattr(module, "enable_fp8_snapshot", None)
        if callable(enable) and (where is None or where(module)) and enable():
            count += 1
    refresh_fp8_snapshots(model)
    return count


def refresh_fp8_snapshots(model: nn.Module) -> int:
    """Rewrite every FP8 weight snapshot of ``model`` from the current weights; returns how many."""
    count = 0
    for module in model.modules():
        if getattr(module, "fp8_snapshot", None) is not None:
            module.refresh_fp8_snapshot()
            count += 1
    return count


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if x.dtype not in _GEMM_DTYPES:
        raise TypeError(f"FP8 layers take float32, bfloat16 or float16 inputs, got {x.dtype}")
    return x.dtype


def _grad_dtype_of(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _GEMM_DTYPES else torch.float32


def _in_layer(layer: str, what: str, exc: Exception) -> Exception:
    """``exc`` again (same class) with the layer and the call it failed in ahead of its message, so that an
    error from deep in a quantizer or GEMM backend says which layer of the model met it."""
    if type(exc) in (ValueError, TypeError, BackendUnavailable):
        return type(exc)(f"{layer}, {what}: {exc}")
    return exc


class _Plan(NamedTuple):
    """What a layer's recipe resolves to on a device, worked out once instead of at every call."""

    quant: str  # the quantization backend: "reference", "triton" or "cuda"
    gemm: str | None  # the dense GEMM backend tried first (None: every call resolves recipe.backend itself)
    m_major: bool  # 1x128 scales quantized straight into the layout torch's scaled matmul reads


def _plan_of(device: torch.device, quant_backend: str, gemm_backend: str) -> _Plan:
    quant = resolve_quant_backend(quant_backend, device)
    try:
        gemm = resolve_backend(gemm_backend, device, "dense")
    except (BackendUnavailable, ValueError):
        gemm = None  # the first GEMM raises the full error, from inside the layer
    return _Plan(quant, gemm, gemm == "torch")


def _resolve_plan(device: torch.device, recipe: Fp8Recipe) -> _Plan:
    return _plan_of(device, recipe.quant_backend, recipe.backend)


def _quantize(x2: torch.Tensor, colwise: bool, recipe: Fp8Recipe, plan: _Plan | None) -> tuple:
    """``(q, s, qt, st)`` of ``x2`` (``qt, st`` None without ``colwise``): through the planned kernels, or with no
    plan through the public quantizers, which check their input (inputs the planned path does not take)."""
    if plan is not None:
        return quantize_entry(x2, colwise, recipe.pow2_scales, plan.quant, plan.m_major)
    kw = dict(pow2_scales=recipe.pow2_scales, backend=recipe.quant_backend)
    if colwise:
        (q, s), (qt, st) = quantize_1x128_and_128x1(x2, **kw)
        return q, s, qt, st
    return (*quantize_1x128(x2, **kw), None, None)


def _gemm(a, a_scales, b, b_scales, out_dtype: torch.dtype, b_rowwise: bool, recipe: Fp8Recipe,
          plan: _Plan | None) -> torch.Tensor:
    """``a @ b.T``: through the planned backend, or with no plan through :func:`fp8_gemm`, which checks it all."""
    if plan is not None:
        return gemm_entry(a, a_scales, b, b_scales, out_dtype, b_rowwise, recipe.backend, plan.gemm)
    return fp8_gemm(a, a_scales, b, b_scales, out_dtype=out_dtype, backend=recipe.backend,
                    b_block="1x128" if b_rowwise else "128x128")


# Under torch.compile the plan is a constant of the graph: worked out once while tracing, like the shapes.
# Its arguments must be constants too: strings, not the recipe (torch 2.11's compiler cannot make a
# constant of a frozen dataclass with a __post_init__, and the phase then fails to compile).
_traced_plan = torch.compiler.assume_constant_result(_plan_of)


class _Fp8LinearFn(torch.autograd.Function):
    """The three FP8 GEMMs of a linear layer. Eager (``cache`` given): the FP8 weight comes from the layer's
    :class:`Fp8WeightCache` and the kernels are called directly as ``plan`` says, or, with no plan (an input
    the planned path does not take: empty, an unusual dtype), through the public functions, which check
    every argument. Traced by ``torch.compile`` (``cache`` None): the weight is quantized inside the graph
    at every call (the cache's Python state, keyed on version counters and optimizer steps, cannot be
    traced), with its transpose from the same pass when the input gradient needs it, and every kernel is
    a ``torch.ops.dualflow`` operator. ``out_dtype`` None: worked out after the input is quantized (whose
    checks speak first). ``wgrad``/``dgrad``: the weight's and the input's gradients will be asked for.
    ``quantized``: ``x``'s ``(q, s, qt, st)`` made by the caller, shared by layers reading the same input
    (:meth:`Fp8Linear.shared_input`; ``qt, st`` present where ``wgrad``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, cache: Fp8WeightCache | None, recipe: Fp8Recipe, plan: _Plan | None,
                out_dtype: torch.dtype | None, wgrad: bool, dgrad: bool, layer: str | None,
                snapshot: tuple[torch.Tensor, ...] | None, quantized: tuple[torch.Tensor | None, ...] | None = None):
        pow2 = recipe.pow2_scales
        x2 = x.reshape(-1, x.shape[-1])
        # the 128x1 layout of x is only needed for the weight gradient
        xq, xs, xtq, xts = quantized if quantized is not None else _quantize(x2, wgrad, recipe, plan)
        out_dtype = out_dtype or _out_dtype(x)
        w_t = ()
        if cache is not None:
            w8 = cache.get(weight, recipe, transposed=dgrad)
            wq, ws = w8.q, w8.scales
            # the FP8 weight is owned by the cache for the whole step: held here, not saved as an activation
            ctx.w8 = w8
        elif snapshot is not None:  # traced, the step's quantization (Fp8WeightSnapshot)
            wq, ws, *w_t = snapshot
            w_t = w_t if dgrad else ()
            ctx.w8 = None
        elif dgrad:  # the transpose for the input gradient from the same pass; only it is saved
            wq, ws, *w_t = torch.ops.dualflow.quantize_128x128_t(weight.detach(), pow2, plan.quant, 1)
            ctx.w8 = None
        else:
            wq, ws = torch.ops.dualflow.quantize_128x128(weight.detach(), pow2, plan.quant)
            ctx.w8 = None
        out = _gemm(xq, xs, wq, ws, out_dtype, False, recipe, plan)
        if bias is not None:
            out = out + bias.to(out.dtype)
        saved = (xtq, xts) if wgrad else ()
        ctx.save_for_backward(*saved, *w_t)
        ctx.recipe, ctx.plan, ctx.layer, ctx.x_shape, ctx.x_dtype = recipe, (recipe, plan), layer, x.shape, x.dtype
        ctx.w_dtype, ctx.b_dtype = weight.dtype, bias.dtype if bias is not None else None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        if ctx.layer is None:  # traced: errors surface while tracing, from the operators' checks
            return _Fp8LinearFn._backward(ctx, dy)
        try:
            return _Fp8LinearFn._backward(ctx, dy)
        except (ValueError, TypeError, BackendUnavailable) as exc:
            raise _in_layer(ctx.layer, f"backward of an output gradient of shape {tuple(dy.shape)} ({dy.dtype})",
                            exc) from exc

    @staticmethod
    def _backward(ctx, dy):
        recipe, (planned_for, plan) = ctx.recipe, ctx.plan
        if plan is not None and recipe is not planned_for:  # the backward follows ctx.recipe, given another one
            plan = _resolve_plan(dy.device, recipe)
        saved = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_dw or need_dx:
            gq, gs, gtq, gts = _quantize(dy2, need_dw, recipe, plan)
        if need_dw:
            xtq, xts = saved[:2]
            dw = _gemm(gtq, gts, xtq, xts, _grad_dtype_of(ctx.w_dtype), True, recipe, plan)
        if need_dx:
            if ctx.w8 is not None:
                wtq, wts = ctx.w8.transposed()
            else:  # traced: the transposed weight's quantization is the last pair saved
                wtq, wts = saved[-2:]
            dx = _gemm(gq, gs, wtq, wts, _grad_dtype_of(ctx.x_dtype), False, recipe, plan)
            dx = dx.view(ctx.x_shape)
        if need_db and ctx.b_dtype is not None:
            db = dy2.float().sum(0).to(ctx.b_dtype)
        return dx, dw, db, None, None, None, None, None, None, None, None, None


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose forward, input-gradient and weight-gradient GEMMs run in FP8 (see module doc).

    Parameters, ``state_dict`` and initialization are those of ``nn.Linear``; ``in_features`` and
    ``out_features`` must be multiples of 16.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 recipe: Fp8Recipe | None = None) -> None:
        if in_features % 16 or out_features % 16:
            raise ValueError(f"Fp8Linear needs in_features and out_features divisible by 16, got "
                             f"{in_features} x {out_features}; keep this layer in nn.Linear")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe or Fp8Recipe()
        self.fp8_cache = Fp8WeightCache()
        self.fp8_snapshot: Fp8WeightSnapshot | None = None  # read by compiled calls (enable_fp8_snapshots)
        self.fp8_name = ""  # the qualified name in its model, set by convert_to_fp8 (for error messages)
        self._fp8_plan: tuple[tuple, _Plan] | None = None

    def describe(self) -> str:
        """How errors name this layer: ``Fp8Linear 'layers.1.attn.wo' (in 128, out 256)``."""
        name = f" {self.fp8_name!r}" if self.fp8_name else ""
        return f"Fp8Linear{name} (in {self.in_features}, out {self.out_features})"

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Fp8Recipe | None = None) -> Fp8Linear:
        """An ``Fp8Linear`` sharing ``linear``'s parameter objects (optimizers holding them stay valid)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  recipe=recipe)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def invalidate_fp8_cache(self) -> None:
        self.fp8_cache.invalidate()

    def enable_fp8_snapshot(self) -> bool:
        self.fp8_snapshot = Fp8WeightSnapshot()
        return True

    def refresh_fp8_snapshot(self) -> None:
        self.fp8_snapshot.refresh(self.weight, self.recipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self._forward(x, self._plan_for(x), None)

    @staticmethod
    def shared_input(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
        """``[layer(x) for layer in layers]`` with ``x`` quantized once for all of them, where they are
        ``Fp8Linear`` layers of one recipe and ``x`` takes the planned kernels (else one call each, the same
        thing). The outputs and every gradient are those of the separate calls, bit for bit; the backward
        saves ``x``'s 128x1 layout once instead of once per layer. Attention's projections of one input
        (MLA's query and key/value latents) take it."""
        first = layers[0] if layers else None
        if len(layers) < 2 or any(type(layer) is not Fp8Linear or layer.recipe != first.recipe
                                  or layer.in_features != first.in_features or layer.weight.dtype != first.weight.dtype
                                  for layer in layers):
            return [layer(x) for layer in layers]
        first._check_input(x)
        plan = first._plan_for(x)
        if plan is None:  # an input the planned kernels do not take: the checking path, layer by layer
            return [layer(x) for layer in layers]
        wgrad = torch.is_grad_enabled() and any(layer.weight.requires_grad for layer in layers)
        try:
            with torch.no_grad():  # FP8 bytes and scales: nothing to differentiate (each layer's backward does)
                quantized = _quantize(x.detach().reshape(-1, x.shape[-1]), wgrad, first.recipe, plan)
        except (ValueError, TypeError, BackendUnavailable) as exc:
            raise _in_layer(first.describe(), f"forward of an input of shape {tuple(x.shape)} ({x.dtype})",
                            exc) from exc
        return [layer._forward(x, plan, quantized) for layer in layers]

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self.describe()}: the input must end in {self.in_features} features, got shape "
                             f"{tuple(x.shape)}")

    def _plan_for(self, x: torch.Tensor) -> _Plan | None:
        """The kernels' plan for ``x``; None for an input the planned kernels do not take (empty, an unusual
        dtype), which goes through the public functions, whose checks name what is wrong."""
        if torch.compiler.is_compiling():
            # traced: the checks the planless (checking) path makes at every call are made once here, while
            # tracing, on the input's dtype (the shapes were checked before)
            return _traced_plan(x.device, self.recipe.quant_backend, self.recipe.backend)
        planned = x.numel() > 0 and x.dtype in _GEMM_DTYPES and self.weight.dtype in _GEMM_DTYPES
        return self._plan(x.device) if planned else None

    def _forward(self, x: torch.Tensor, plan: _Plan | None, quantized: tuple | None) -> torch.Tensor:
        wgrad = torch.is_grad_enabled() and self.weight.requires_grad
        dgrad = torch.is_grad_enabled() and x.requires_grad
        if torch.compiler.is_compiling():  # traced: no weight cache (see _Fp8LinearFn)
            snapshot = self.fp8_snapshot.tensors if self.fp8_snapshot is not None else None
            return _Fp8LinearFn.apply(x, self.weight, self.bias, None, self.recipe, plan, _out_dtype(x), wgrad, dgrad,
                                      None, snapshot, quantized)
        try:
            return _Fp8LinearFn.apply(x, self.weight, self.bias, self.fp8_cache, self.recipe, plan,
                                      _out_dtype(x) if plan is not None else None, wgrad, dgrad, self.describe(), None,
                                      quantized)
        except (ValueError, TypeError, BackendUnavailable) as exc:
            raise _in_layer(self.describe(), f"forward of an input of shape {tuple(x.shape)} ({x.dtype})",
                            exc) from exc

    def _plan(self, device: torch.device) -> _Plan:
        # resolved once per device and recipe; the two environment variables that steer the resolution
        # are part of the key, so that changing them takes effect as it does for the public functions
        key = (device, self.recipe, os.environ.get(ENV_BACKEND), os.environ.get("TRITON_INTERPRET"))
        if self._fp8_plan is None or self._fp8_plan[0] != key:
            self._fp8_plan = (key, _resolve_plan(device, self.recipe))
        return self._fp8_plan[1]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pow2_scales={self.recipe.pow2_scales}, backend={self.recipe.backend!r}"


class _Fp8GroupedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, sizes: list[int], offsets: torch.Tensor, cache: Fp8WeightCache, recipe: Fp8Recipe,
                wgrad: bool):
        kw = dict(pow2_scales=recipe.pow2_scales, backend=recipe.quant_backend)
        aligned = all(n % BLOCK == 0 for n in sizes)
        saved = ()
        if wgrad and aligned:  # one pass gives both layouts; 128x1 tiles cannot mix experts' tokens
            (xq, xs), (xtq, xts) = quantize_1x128_and_128x1(x, **kw)
            saved = (xtq, xts)
        else:
            xq, xs = quantize_1x128(x, **kw)
            if wgrad:  # per-expert 128x1 tiles: a tile never mixes two experts' tokens
                bounds = list(itertools.pairwise(itertools.accumulate(sizes, initial=0)))
                saved = tuple(t for lo, hi in bounds for t in quantize_128x1(x[lo:hi], **kw))
        # traced by torch.compile (no cache): the weight quantized in the graph, saved like an activation
        w8 = (cache.get(weight, recipe, transposed=ctx.needs_input_grad[0]) if cache is not None
              else _Fp8Weight(*quantize_weight(weight, recipe)))
        ctx.save_for_backward(*saved, *((w8.q, w8.scales) if cache is None else ()))
        out = fp8_grouped_gemm(xq, xs, w8.q, w8.scales, group_offsets=offsets, out_dtype=_out_dtype(x),
                               backend=recipe.backend)
        ctx.w8 = w8 if cache is not None else None
        ctx.recipe, ctx.sizes, ctx.offsets, ctx.aligned = recipe, sizes, offsets, aligned
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        from dualflow.fp8.moe import grouped_wgrad

        recipe = ctx.recipe
        kw = dict(pow2_scales=recipe.pow2_scales, backend=recipe.quant_backend)
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dx = dw = None
        dy = dy.contiguous()
        saved = ctx.saved_tensors
        w8 = ctx.w8
        if w8 is None:  # traced: the weight's quantization is the last pair saved
            w8, saved = _Fp8Weight(*saved[-2:]), saved[:-2]
        if need_dw and ctx.aligned:
            (gq, gs), gt = quantize_1x128_and_128x1(dy, **kw)
        else:
            gq, gs = quantize_1x128(dy, **kw)
        if need_dx:
            wtq, wts = w8.transposed()
            dx = fp8_grouped_gemm(gq, gs, wtq, wts, group_offsets=ctx.offsets, out_dtype=_grad_dtype_of(ctx.x_dtype),
                                  backend=recipe.backend)
        if need_dw and ctx.aligned:  # one GEMM for all experts, grouped along the tokens
            offsets = ctx.offsets.to(dy.device, non_blocking=True)
            dw = grouped_wgrad(gt, tuple(saved), offsets, recipe).to(_grad_dtype_of(ctx.w_dtype))
        elif need_dw:
            groups, n_out = w8.q.shape[:2]
            dw = torch.zeros(groups, n_out, w8.q.shape[2], dtype=_grad_dtype_of(ctx.w_dtype), device=dy.device)
            lo = 0
            for g, size in enumerate(ctx.sizes):
                if size:
                    gtq, gts = quantize_128x1(dy[lo:lo + size], **kw)
                    dw[g] = fp8_gemm(gtq, gts, saved[2 * g], saved[2 * g + 1], out_dtype=dw.dtype,
                                     backend=recipe.backend)
                lo += size
        return dx, dw, None, None, None, None, None


class Fp8GroupedLinear(nn.Module):
    """Per-expert linear layers ``y[rows of g] = x[rows of g] @ weight[g].T`` in FP8 (MoE experts).

    ``x`` holds the tokens of all experts back to back (the contiguous layout of
    :func:`dualflow.fp8.fp8_grouped_gemm`); ``tokens_per_expert`` says how many rows each expert owns and
    must sum to ``x.shape[0]`` (a tensor is read back to the host: one synchronization). When every count
    is a multiple of 128 the weight gradient is one GEMM grouped along the tokens, otherwise one per
    expert. ``weight`` is ``[num_experts, out_features, in_features]``; for the fused SwiGLU expert block
    without any host synchronisation see :func:`dualflow.fp8.fp8_grouped_mlp`.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, device=None, dtype=None,
                 recipe: Fp8Recipe | None = None) -> None:
        super().__init__()
        if in_features % 16 or out_features % 16:
            raise ValueError(f"Fp8GroupedLinear needs in_features and out_features divisible by 16, got "
                             f"{in_features} x {out_features}")
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, device=device, dtype=dtype))
        self.recipe = recipe or Fp8Recipe()
        self.fp8_cache = Fp8WeightCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.in_features ** -0.5  # nn.Linear's default (kaiming_uniform with a = sqrt(5)) per expert
        nn.init.uniform_(self.weight, -bound, bound)

    def invalidate_fp8_cache(self) -> None:
        self.fp8_cache.invalidate()

    def forward(self, x: torch.Tensor, tokens_per_expert: Sequence[int] | torch.Tensor) -> torch.Tensor:
        sizes = [int(v) for v in (tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert)
                                  else tokens_per_expert)]
        if len(sizes) != self.num_experts or sum(sizes) != x.shape[0] or min(sizes, default=0) < 0:
            raise ValueError(f"tokens_per_expert must hold {self.num_experts} non-negative counts summing to "
                             f"x.shape[0] = {x.shape[0]}, got {sizes}")
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must be [tokens, {self.in_features}], got {tuple(x.shape)}")
        # host offsets (well formed by the check above): the grouped GEMMs copy them up without a synchronisation
        offsets = torch.tensor(list(itertools.accumulate(sizes, initial=0)), dtype=torch.int32)
        wgrad = torch.is_grad_enabled() and self.weight.requires_grad
        cache = None if torch.compiler.is_compiling() else self.fp8_cache  # see _Fp8LinearFn
        return _Fp8GroupedFn.apply(x, self.weight, sizes, offsets, cache, self.recipe, wgrad)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}"


def invalidate_fp8_caches(model: nn.Module) -> int:
    """Drop the FP8 weight copies of every module of ``model`` that keeps some (any module with an
    ``invalidate_fp8_cache()`` method: the FP8 layers here, and other libraries' modules that follow the
    same convention, such as MoE experts holding stacked weights); returns how many were dropped."""
    count = 0
    for module in model.modules():
        drop = getattr(module, "invalidate_fp8_cache", None)
        if callable(drop):
            drop()
            count += 1
    return count
