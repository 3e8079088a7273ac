"""The FP8 engine's kernels as PyTorch custom operators, namespace ``dualflow`` (``torch.ops.dualflow.*``).

Each operator runs an unvalidated implementation of :mod:`~dualflow.fp8.quant`, :mod:`~dualflow.fp8.gemm`
or :mod:`~dualflow.fp8.moe` and has a fake implementation giving the exact shapes, dtypes and strides the
real one returns, so that ``torch.compile`` traces through them (they stay opaque nodes of the graph) and
CUDA graphs capture them. The public functions of those modules validate their arguments and call these.

=================================  ======================================================================
operator                           returns
=================================  ======================================================================
``quantize_1x128``                 ``q [R, C]``, ``s [R, C/128]``
``quantize_128x128``               ``q [R, C]``, ``s [R/128, C/128]``
``quantize_128x128_t``             ``q, s`` and per row group ``qt [G*C, R/G]``, ``st [G*C/128, R/G/128]``
``quantize_128x1``                 ``qt [C, R]``, ``st [C, R/128]``
``quantize_1x128_and_128x1``       ``q, s, qt, st``
``fp8_gemm``                       ``a @ b.T`` ``[M, N]`` in ``out_dtype``
``fp8_gemm_accumulate``            nothing; adds ``a @ b.T`` into ``out`` (mutated)
``fp8_grouped_gemm_contiguous``    ``[T, N]``; may write the error record ``errors`` (mutated)
``fp8_grouped_gemm_masked``        ``[G, M_max, N]``; may write ``errors`` (mutated)
``swiglu_quantize``                ``q, s, qt, st`` of ``silu(gate) * up``
``swiglu_backward_quantize``       ``q, s, qt, st`` of ``dh``
``grouped_wgrad``                  FP32 ``[G, N, M]``
=================================  ======================================================================

(``/128`` rounds up.) Backends are strings: the quantizers take ``reference``/``triton`` (anything else is
resolved on the tensors' device), the GEMMs a backend spec of :mod:`dualflow.fp8.gemm` (resolved inside,
with its fall-through). ``m_major_scales`` gives the 1x128 scales strides ``(1, rows)`` (see
:func:`dualflow.fp8.quant.empty_scales`).

Registration: ``torch.library.define`` + ``impl`` under ``CompositeExplicitAutograd``, not
``torch.library.custom_op``. Measured on a CPU (torch 2.13, 8x8 tensors, 20k calls) the dispatcher adds
about 4 us per call to a Python kernel registered this way and about 17 us through ``custom_op``, whose
call goes through Python wrappers of its own (autograd and inplace-view handling) before and after the
dispatcher: with eight operator calls per ``Fp8Linear`` step that is 100 us of host time. The autograd
of the FP8 layers is their own ``autograd.Function``, so nothing here needs ``custom_op``'s autograd.
"""

from __future__ import annotations

import torch

from dualflow.fp8.gemm import run_dense, run_dense_first, run_grouped
from dualflow.fp8.moe import run_grouped_wgrad, run_swiglu_backward_quantize, run_swiglu_quantize
from dualflow.fp8.quant import BLOCK, FP8_DTYPE, empty_scales, run_quantizer

# the registration of the namespace: made once, when this module is first imported (dualflow.fp8 imports it)
_LIB = torch.library.Library("dualflow", "DEF")


def _def(schema: str, impl, fake) -> None:
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"dualflow::{name}", fake, lib=_LIB)


def _cdiv(n: int) -> int:
    return -(-n // BLOCK)


def _fp8(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return x.new_empty((rows, cols), dtype=FP8_DTYPE)


# ----------------------------------------------------------------------------------------------------------
# quantizers
# ----------------------------------------------------------------------------------------------------------
def _q1x128(x, pow2_scales, backend, m_major_scales):
    q, s, _, _ = run_quantizer(x, True, False, False, pow2_scales, backend, m_major_scales)
    return q, s


def _q1x128_fake(x, pow2_scales, backend, m_major_scales):
    rows, cols = x.shape
    return _fp8(x, rows, cols), empty_scales(rows, _cdiv(cols), x.device, m_major_scales)


def _q128x128(x, pow2_scales, backend):
    q, s, _, _ = run_quantizer(x, False, False, True, pow2_scales, backend)
    return q, s


def _q128x128_fake(x, pow2_scales, backend):
    rows, cols = x.shape
    return _fp8(x, rows, cols), empty_scales(_cdiv(rows), _cdiv(cols), x.device)


def _q128x128_t(x, pow2_scales, backend, groups):
    return run_quantizer(x, False, False, True, pow2_scales, backend, transposed_groups=groups)


def _q128x128_t_fake(x, pow2_scales, backend, groups):
    rows, cols = x.shape
    group_rows = rows // groups
    return (*_q128x128_fake(x, pow2_scales, backend), _fp8(x, groups * cols, group_rows),
            empty_scales(groups * _cdiv(cols), _cdiv(group_rows), x.device))


def _q128x1(x, pow2_scales, backend, m_major_scales):
    _, _, qt, st = run_quantizer(x, False, True, False, pow2_scales, backend, m_major_scales)
    return qt, st


def _q128x1_fake(x, pow2_scales, backend, m_major_scales):
    rows, cols = x.shape
    return _fp8(x, cols, rows), empty_scales(cols, _cdiv(rows), x.device, m_major_scales)


def _qboth(x, pow2_scales, backend, m_major_scales):
    return run_quantizer(x, True, True, False, pow2_scales, backend, m_major_scales)


def _qboth_fake(x, pow2_scales, backend, m_major_scales):
    return (*_q1x128_fake(x, pow2_scales, backend, m_major_scales),
            *_q128x1_fake(x, pow2_scales, backend, m_major_scales))


_QUANT_ARGS = "bool pow2_scales, str backend"
_def(f"quantize_1x128(Tensor x, {_QUANT_ARGS}, bool m_major_scales) -> (Tensor, Tensor)",
     _q1x128, _q1x128_fake)
_def(f"quantize_128x128(Tensor x, {_QUANT_ARGS}) -> (Tensor, Tensor)", _q128x128, _q128x128_fake)
_def(f"quantize_128x128_t(Tensor x, {_QUANT_ARGS}, int groups) -> (Tensor, Tensor, Tensor, Tensor)",
     _q128x128_t, _q128x128_t_fake)
_def(f"quantize_128x1(Tensor x, {_QUANT_ARGS}, bool m_major_scales) -> (Tensor, Tensor)",
     _q128x1, _q128x1_fake)
_def(f"quantize_1x128_and_128x1(Tensor x, {_QUANT_ARGS}, bool m_major_scales) "
     "-> (Tensor, Tensor, Tensor, Tensor)", _qboth, _qboth_fake)


# ----------------------------------------------------------------------------------------------------------
# GEMMs
# ----------------------------------------------------------------------------------------------------------
def _gemm(a, a_scales, b, b_scales, out_dtype, b_rowwise, backend):
    return run_dense(a, a_scales, b, b_scales, out_dtype, None, b_rowwise, backend)


def _gemm_fake(a, a_scales, b, b_scales, out_dtype, b_rowwise, backend):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def _gemm_acc(a, a_scales, b, b_scales, out, b_rowwise, backend):
    run_dense(a, a_scales, b, b_scales, torch.float32, out, b_rowwise, backend)


def _gemm_acc_fake(a, a_scales, b, b_scales, out, b_rowwise, backend):
    return None


def _grouped(op):
    def impl(a, a_scales, b, b_scales, index, out_dtype, backend, check, errors):
        return run_grouped(op, a, a_scales, b, b_scales, index, out_dtype, backend, check, errors)
    return impl


def _grouped_fake(a, a_scales, b, b_scales, index, out_dtype, backend, check, errors):
    return a.new_empty((*a.shape[:-1], b.shape[1]), dtype=out_dtype)


_GEMM_ARGS = "Tensor a, Tensor a_scales, Tensor b, Tensor b_scales"
_def(f"fp8_gemm({_GEMM_ARGS}, ScalarType out_dtype, bool b_rowwise, str backend) -> Tensor", _gemm, _gemm_fake)
_def(f"fp8_gemm_accumulate({_GEMM_ARGS}, Tensor(a!) out, bool b_rowwise, str backend) -> ()",
     _gemm_acc, _gemm_acc_fake)
for _op in ("contiguous", "masked"):
    _def(f"fp8_grouped_gemm_{_op}({_GEMM_ARGS}, Tensor index, ScalarType out_dtype, str backend, bool check, "
         "Tensor(a!)? errors) -> Tensor", _grouped(_op), _grouped_fake)


# ----------------------------------------------------------------------------------------------------------
# MoE expert block
# ----------------------------------------------------------------------------------------------------------
def _swiglu_fake(h, pow2_scales, fused, quant_backend, end):
    rows, hidden = h.shape[0], h.shape[1] // 2
    return (_fp8(h, rows, hidden), empty_scales(rows, _cdiv(hidden), h.device),
            _fp8(h, hidden, rows), empty_scales(hidden, _cdiv(rows), h.device))


def _swiglu_bwd_fake(h, da, pow2_scales, fused, quant_backend, end):
    rows, cols = h.shape
    return (_fp8(h, rows, cols), empty_scales(rows, _cdiv(cols), h.device),
            _fp8(h, cols, rows), empty_scales(cols, _cdiv(rows), h.device))


def _wgrad_fake(aq, a_scales, bq, b_scales, offsets, backend):
    return aq.new_empty((offsets.shape[0] - 1, aq.shape[0], bq.shape[0]), dtype=torch.float32)


_SWIGLU_OUT = "(Tensor, Tensor, Tensor, Tensor)"
_def(f"swiglu_quantize(Tensor h, bool pow2_scales, bool fused, str quant_backend, Tensor? end) -> {_SWIGLU_OUT}",
     run_swiglu_quantize, _swiglu_fake)
_def("swiglu_backward_quantize(Tensor h, Tensor da, bool pow2_scales, bool fused, str quant_backend, Tensor? end) "
     f"-> {_SWIGLU_OUT}", run_swiglu_backward_quantize, _swiglu_bwd_fake)
_def("grouped_wgrad(Tensor aq, Tensor a_scales, Tensor bq, Tensor b_scales, Tensor offsets, str backend) -> Tensor",
     run_grouped_wgrad, _wgrad_fake)


# ----------------------------------------------------------------------------------------------------------
# entries of the FP8 layers' inner loop: the operator while torch.compile traces, its implementation
# otherwise. In eager mode the dispatcher adds nothing the layers use (their autograd is their own and
# their operands are valid by construction) but its ~4 us per call, so they call the kernels directly.
# ----------------------------------------------------------------------------------------------------------
def quantize_entry(x: torch.Tensor, colwise: bool, pow2_scales: bool, backend: str,
                   m_major: bool) -> tuple[torch.Tensor | None, ...]:
    """``(q, s, qt, st)``: 1x128 and (with ``colwise``) 128x1 of a valid ``x``; ``qt, st`` None otherwise."""
    if torch.compiler.is_compiling():
        if colwise:
            return torch.ops.dualflow.quantize_1x128_and_128x1(x, pow2_scales, backend, m_major)
        return (*torch.ops.dualflow.quantize_1x128(x, pow2_scales, backend, m_major), None, None)
    return run_quantizer(x, True, colwise, False, pow2_scales, backend, m_major)


def gemm_entry(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
               out_dtype: torch.dtype, b_rowwise: bool, backend: str, first: str | None) -> torch.Tensor:
    """``a @ b.T`` of valid operands; ``first`` (when known) is the backend ``backend`` resolves to on
    their device, called without resolving again (see :func:`dualflow.fp8.gemm.run_dense_first`)."""
    if torch.compiler.is_compiling():
        return torch.ops.dualflow.fp8_gemm(a, a_scales, b, b_scales, out_dtype, b_rowwise, backend)
    return run_dense_first(first, a, a_scales, b, b_scales, out_dtype, b_rowwise, backend)
