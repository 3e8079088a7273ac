"""FP8 MoE experts: a SwiGLU expert block over expert-contiguous rows, every GEMM block-scaled FP8.

``fp8_grouped_mlp(x, w13, w2, offsets, recipe)`` computes, for each expert block ``g`` of rows
``offsets[g]:offsets[g+1]`` of ``x [T, D]``::

    h = x @ w13[g].T          (w13 [E, 2H, D]; h = [gate | up])
    a = silu(gate) * up
    y = a @ w2[g].T           (w2 [E, D, H])

in the layout of DeepSeek-V3's recipe: ``x``, ``a`` and the output gradients quantized 1x128, the
weights 128x128 (cached per optimizer step, like ``Fp8Linear``), the weight gradients from 128x1
quantizations (1x128 along the tokens) with one GEMM grouped along the tokens for all experts. SwiGLU
is fused with the quantization of its output, and its backward with the quantization of ``dh``.

Contract: ``offsets`` is an int32/int64 device tensor ``[E + 1]``, non-decreasing from 0, every entry a
multiple of 128 (no 128-row tile spans two experts); it is never read on the host. Rows after the last
block are neither read nor written meaningfully: their outputs and input gradients are undefined.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dualflow.fp8.gemm import BackendUnavailable, available_backends, backend_names, fp8_grouped_gemm, run_dense
from dualflow.fp8.groups import Fp8ErrorFlag
from dualflow.fp8.quant import (
    BLOCK,
    TRITON_QUANT_BACKENDS,
    Quantized,
    quantize_1x128_and_128x1,
    resolve_quant_backend,
    run_quantizer,
)
from dualflow.fp8.recipe import Fp8Recipe


def _backend_and_kernels(x: torch.Tensor, recipe: Fp8Recipe) -> tuple[str, bool]:
    """The resolved quantization backend (resolved once: the operators take it so) and whether the fused
    kernels run under it (Triton's or the CUDA library's, as for the quantizers)."""
    backend = resolve_quant_backend(recipe.quant_backend, x.device)
    return backend, backend in TRITON_QUANT_BACKENDS


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    # FP32 arithmetic, the value rounded to h's dtype before it is quantized (what the fused kernel does)
    gate, up = h.float().chunk(2, dim=-1)
    return (gate / (1.0 + torch.exp(-gate)) * up).to(h.dtype)


def swiglu_quantize(h: torch.Tensor, recipe: Fp8Recipe, fused: bool | None = None,
                    end: torch.Tensor | None = None) -> tuple[Quantized, Quantized]:
    """``silu(gate) * up`` of ``h = [gate | up]`` (FP32 arithmetic, rounded to ``h``'s dtype), quantized 1x128 and
    128x1 (see quantize_1x128_and_128x1).

    ``end`` (a device scalar) lets the fused kernel skip the rows from ``end`` on (left undefined).
    """
    backend, usable = _backend_and_kernels(h, recipe)
    if fused is None:
        fused = usable
    q, s, qt, st = torch.ops.dualflow.swiglu_quantize(h, recipe.pow2_scales, fused, backend, end)
    return (q, s), (qt, st)


def run_swiglu_quantize(h: torch.Tensor, pow2_scales: bool, fused: bool, quant_backend: str,
                        end: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``(q, s, qt, st)`` of :func:`swiglu_quantize` (what the ``dualflow::swiglu_quantize`` operator runs)."""
    if fused:
        from dualflow.fp8.kernels.swiglu import swiglu_forward

        return swiglu_forward(h, pow2_scales, end, quant_backend)
    return run_quantizer(_swiglu(h), True, True, False, pow2_scales, quant_backend)


def swiglu_backward_quantize(h: torch.Tensor, da: torch.Tensor, recipe: Fp8Recipe, fused: bool | None = None,
                             end: torch.Tensor | None = None) -> tuple[Quantized, Quantized]:
    """The gradient of :func:`swiglu_quantize`'s input, ``dh [T, 2H]``, quantized 1x128 and 128x1."""
    hidden = h.shape[1] // 2
    backend, usable = _backend_and_kernels(h, recipe)
    if fused is None:
        fused = usable and hidden % BLOCK == 0
    q, s, qt, st = torch.ops.dualflow.swiglu_backward_quantize(h, da, recipe.pow2_scales, fused, backend, end)
    return (q, s), (qt, st)


def run_swiglu_backward_quantize(h: torch.Tensor, da: torch.Tensor, pow2_scales: bool, fused: bool,
                                 quant_backend: str, end: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``(q, s, qt, st)`` of :func:`swiglu_backward_quantize` (the ``dualflow::swiglu_backward_quantize``
    operator)."""
    if fused:
        from dualflow.fp8.kernels.swiglu import swiglu_backward

        return swiglu_backward(h, da, pow2_scales, end, quant_backend)
    gate, up = h.float().chunk(2, dim=-1)
    sig = 1.0 / (1.0 + torch.exp(-gate))
    d = da.float()
    dh = torch.cat([d * up * (sig * (1.0 + gate * (1.0 - sig))), d * (gate * sig)], dim=-1).to(h.dtype)
    return run_quantizer(dh, True, True, False, pow2_scales, quant_backend)


def wgrad_backend(recipe: Fp8Recipe, device: torch.device | str) -> str:
    """The kernel of the experts' weight gradient under ``recipe`` on ``device``: ``recipe.wgrad_backend``
    when it names one (``cutlass`` refused with the reason where it cannot run); for ``auto``, whichever of
    ``cutlass`` and ``triton`` the GEMM backend order names first (CUTLASS's when it names neither: torch
    has no grouped kernel), with Triton's where CUTLASS cannot run. The default order puts CUTLASS first:
    on V2-Lite's step on an H200 it took 16 ms a step less than Triton's (benchmarks/NOTES_gpu.md row 15).
    """
    device = torch.device(device)
    wanted = recipe.wgrad_backend
    if wanted == "auto":  # asked at every call: the availability only where the order makes it matter
        named = [n for n in backend_names(recipe.backend, device) if n in ("cutlass", "triton")]
        wanted = named[0] if named else "cutlass"
    if wanted == "triton":
        return "triton"
    why_not = available_backends(device, "contiguous")["cutlass"]
    if why_not is None:
        return "cutlass"
    if recipe.wgrad_backend == "auto":
        return "triton"
    raise BackendUnavailable(f"wgrad_backend='cutlass' cannot run on {device}: {why_not}")


def grouped_wgrad(a: Quantized, b: Quantized, offsets: torch.Tensor, recipe: Fp8Recipe,
                  fused: bool | None = None) -> torch.Tensor:
    """FP32 ``out[g] = a[:, block g] @ b[:, block g].T`` for 128x1-quantized ``a [N, T]``, ``b [M, T]``.

    The kernels read ``offsets`` on the device (:func:`wgrad_backend` picks CUTLASS's or Triton's); the
    reference (``fused=False``, or quantization not on Triton) loops over the experts on the host.
    """
    (aq, as_), (bq, bs) = a, b
    if fused is None:
        fused = _backend_and_kernels(aq, recipe)[1]
    backend = wgrad_backend(recipe, aq.device) if fused else "reference"
    return torch.ops.dualflow.grouped_wgrad(aq, as_, bq, bs, offsets, backend)


def run_grouped_wgrad(aq: torch.Tensor, as_: torch.Tensor, bq: torch.Tensor, bs: torch.Tensor, offsets: torch.Tensor,
                      backend: str) -> torch.Tensor:
    """The ``dualflow::grouped_wgrad`` operator: :func:`grouped_wgrad` of unpacked operands on ``backend``
    (``triton``, ``cutlass`` or ``reference``)."""
    if backend == "cutlass":
        from dualflow.fp8.cutlass import kgrouped_wgrad as cutlass_kgrouped_wgrad

        return cutlass_kgrouped_wgrad(aq, as_, bq, bs, offsets)
    groups = offsets.numel() - 1
    out = torch.empty(groups, aq.shape[0], bq.shape[0], dtype=torch.float32, device=aq.device)
    if backend == "triton":
        from dualflow.fp8.kernels.grouped_wgrad import kgrouped_wgrad

        return kgrouped_wgrad(aq, as_, bq, bs, offsets, out)
    if backend != "reference":
        raise ValueError(f"grouped_wgrad: backend must be 'triton', 'cutlass' or 'reference', got {backend!r}")
    bounds = offsets.tolist()
    for g in range(groups):
        lo, hi = bounds[g], bounds[g + 1]
        if lo % BLOCK or hi % BLOCK:
            raise ValueError(f"expert block {g} spans rows {lo}:{hi}; grouped weight gradients need offsets that "
                             f"are multiples of {BLOCK}")
        kb0, kb1 = lo // BLOCK, hi // BLOCK
        out[g] = run_dense(aq[:, lo:hi], as_[:, kb0:kb1], bq[:, lo:hi], bs[:, kb0:kb1], torch.float32, None, True,
                           "reference") if hi > lo else 0
    return out


class _Fp8GroupedMLPFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w13, w2, offsets, recipe: Fp8Recipe, caches, errors, backward: bool, dgrad: bool, fp8):
        # a backward will run (w2's transpose is needed), and x's gradient will be asked for (w13's too)
        from dualflow.fp8.nn import _Fp8Weight, quantize_weight

        kw = dict(pow2_scales=recipe.pow2_scales, backend=recipe.quant_backend)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        if caches is not None:
            w13_8, w2_8 = caches[0].get(w13, recipe, transposed=dgrad), caches[1].get(w2, recipe, transposed=backward)
            weights = ()
        else:  # traced by torch.compile: the snapshots' FP8 weights (fp8: w13's four tensors, w2's four), or
            # quantized in the graph with the transposes the backward needs from the same pass; the
            # transposes are saved for the backward like activations
            if fp8 is not None:
                w13_8, w2_8 = _Fp8Weight(*fp8[:4]), _Fp8Weight(*fp8[4:])
            else:
                w13_8 = _Fp8Weight(*quantize_weight(w13, recipe, transposed=dgrad))
                w2_8 = _Fp8Weight(*quantize_weight(w2, recipe, transposed=backward))
            weights = (*(w2_8.transposed() if backward else ()), *(w13_8.transposed() if dgrad else ()))
        (xq, xs), xt = quantize_1x128_and_128x1(x, **kw)
        h = fp8_grouped_gemm(xq, xs, w13_8.q, w13_8.scales, group_offsets=offsets, out_dtype=torch.bfloat16,
                             backend=recipe.backend, errors=errors)
        (aq, as_), at = swiglu_quantize(h, recipe, end=offsets[-1:])
        y = fp8_grouped_gemm(aq, as_, w2_8.q, w2_8.scales, group_offsets=offsets, out_dtype=out_dtype,
                             backend=recipe.backend, errors=errors)
        ctx.save_for_backward(h, xt[0], xt[1], at[0], at[1], offsets, *weights)
        ctx.weights = (w13_8, w2_8) if caches is not None else None
        ctx.recipe, ctx.x_dtype, ctx.errors = recipe, x.dtype, errors
        return y

    @staticmethod
    def backward(ctx, dy):
        h, xtq, xts, atq, ats, offsets, *weights = ctx.saved_tensors
        recipe = ctx.recipe
        if ctx.weights is not None:
            w13_8, w2_8 = ctx.weights
            (w2tq, w2ts), w13_t = w2_8.transposed(), None
        else:  # traced: the transposed weights the forward saved, w2's, then w13's if x needs a gradient
            (w2tq, w2ts), w13_t = weights[:2], weights[2:]
        (gq, gs), gt = quantize_1x128_and_128x1(dy.contiguous(), pow2_scales=recipe.pow2_scales,
                                                backend=recipe.quant_backend)
        da = fp8_grouped_gemm(gq, gs, w2tq, w2ts, group_offsets=offsets, out_dtype=torch.bfloat16,
                              backend=recipe.backend, errors=ctx.errors)
        dw2 = grouped_wgrad(gt, (atq, ats), offsets, recipe) if ctx.needs_input_grad[2] else None
        (dhq, dhs), dht = swiglu_backward_quantize(h, da, recipe, end=offsets[-1:])
        dx = dw13 = None
        if ctx.needs_input_grad[0]:
            w13tq, w13ts = w13_8.transposed() if w13_t is None else w13_t
            dx = fp8_grouped_gemm(dhq, dhs, w13tq, w13ts, group_offsets=offsets,
                                  out_dtype=ctx.x_dtype if ctx.x_dtype != torch.float64 else torch.float32,
                                  backend=recipe.backend, errors=ctx.errors)
        if ctx.needs_input_grad[1]:
            dw13 = grouped_wgrad(dht, (xtq, xts), offsets, recipe)
        return dx, dw13, dw2, None, None, None, None, None, None, None


def fp8_grouped_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor,
                    recipe: Fp8Recipe | None = None, caches=None, errors: Fp8ErrorFlag | None = None,
                    snapshots=None) -> torch.Tensor:
    """The SwiGLU experts of the module docstring, forward and backward in FP8.

    ``caches`` is a pair of :class:`~dualflow.fp8.Fp8WeightCache` (for ``w13`` and ``w2``) that keeps the
    weights' FP8 copies between eager calls; without it they are quantized on every call. While
    ``torch.compile`` traces it the caches are not read: ``snapshots``, a pair of
    :class:`~dualflow.fp8.nn.Fp8WeightSnapshot` of ``w13`` and ``w2`` kept fresh by the caller, gives the
    weights' FP8 copies instead, else they are quantized in the graph at every call. ``errors``: where the
    grouped GEMMs record malformed device ``offsets`` without a host synchronisation (see
    :func:`dualflow.fp8.fp8_grouped_gemm`); without one, device offsets are read back and checked per GEMM.
    """
    from dualflow.fp8.nn import Fp8WeightCache

    recipe = recipe or Fp8Recipe()
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"fp8_grouped_mlp takes x [T, D], w13 [E, 2H, D], w2 [E, D, H]; got x {tuple(x.shape)}, "
                         f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    experts, two_h, dim = w13.shape
    if w2.shape != (experts, dim, two_h // 2) or two_h % 2 or x.shape[1] != dim:
        raise ValueError(f"fp8_grouped_mlp: w13 [E, 2H, D] = {tuple(w13.shape)} needs w2 [E, D, H] = "
                         f"{(experts, dim, two_h // 2)} and x [T, {dim}]; got w2 {tuple(w2.shape)}, x {tuple(x.shape)}")
    if dim % 16 or (two_h // 2) % 16:
        raise ValueError(f"fp8_grouped_mlp needs dim and hidden multiples of 16 (FP8 GEMM alignment), got dim={dim}, "
                         f"hidden={two_h // 2}")
    if offsets.shape != (experts + 1,) or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be int32/int64 of shape ({experts + 1},), got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    fp8 = None
    if torch.compiler.is_compiling():  # the caches' Python state cannot be traced: see Fp8Linear
        caches = None
        if snapshots is not None:
            fp8 = (*snapshots[0].tensors, *snapshots[1].tensors)
    else:
        caches = caches or (Fp8WeightCache(), Fp8WeightCache())
    grad = torch.is_grad_enabled()
    backward = grad and (x.requires_grad or w13.requires_grad or w2.requires_grad)
    return _Fp8GroupedMLPFn.apply(x, w13, w2, offsets, recipe, caches, errors, backward, grad and x.requires_grad,
                                  fp8)


def grouped_mlp_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The same block-by-block SwiGLU in the input's precision (FP32 accumulation), for the tests."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=x.dtype, device=x.device)
    bounds = offsets.tolist()
    for g in range(w13.shape[0]):
        lo, hi = bounds[g], bounds[g + 1]
        gate, up = F.linear(x[lo:hi], w13[g].to(x.dtype)).chunk(2, dim=-1)
        out[lo:hi] = F.linear(F.silu(gate) * up, w2[g].to(x.dtype))
    return out
