"""Differentiable dispatch/combine, and the per-rank arithmetic on received rows that both share.

Combine first reduces, on each rank, the rows of every received token to one contribution row (local
step, plain torch, identical for every backend), then the backend returns contributions to their source
ranks and adds them in FP32 in ascending rank order. With ``weights`` (a received ``[N, k]`` top-k
weight matrix) the contribution of received row n is::

    standard layout:     (sum_j w[n, j] over local slots j) * y[n]      (FP32, then y's dtype)
    expert-major layout: sum_j w[n, j] * y[position[n, j]]              (FP32 in ascending j, then y's dtype)

and without weights the same with w = 1. The backward of dispatch is a combine of the gradients; the
backward of combine is a dispatch of the output gradient followed by the adjoint of the local step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dualflow.comm.buffer import Buffer, DispatchHandle


def _local_mask(handle: DispatchHandle) -> torch.Tensor:
    return handle.recv_topk_idx >= 0


def contributions(y: torch.Tensor, handle: DispatchHandle, weights: torch.Tensor | None) -> torch.Tensor:
    """One row per received token: the local step of combine (see the module docstring)."""
    em = handle.expert_layout
    local = _local_mask(handle)
    if em is None:
        if weights is None:
            return y
        return (y.float() * _local_weight_sum(weights, local)[:, None]).to(y.dtype)
    acc = torch.zeros(local.shape[0], y.shape[1], dtype=torch.float32, device=y.device)
    for j in range(local.shape[1]):
        rows = local[:, j].nonzero()[:, 0]
        term = y.index_select(0, em.position[rows, j]).float()
        if weights is not None:
            term = term * weights[rows, j, None]
        acc[rows] += term
    return acc.to(y.dtype)


def expand(grad: torch.Tensor, handle: DispatchHandle, weights: torch.Tensor | None) -> torch.Tensor:
    """Adjoint of :func:`contributions` with respect to ``y``: received-token gradients -> ``y``'s layout."""
    em = handle.expert_layout
    local = _local_mask(handle)
    if em is None:
        if weights is None:
            return grad
        return (grad.float() * _local_weight_sum(weights, local)[:, None]).to(grad.dtype)
    out = grad.new_zeros(em.num_rows, grad.shape[1])
    for j in range(local.shape[1]):
        rows = local[:, j].nonzero()[:, 0]
        term = grad.index_select(0, rows)
        if weights is not None:
            term = (term.float() * weights[rows, j, None]).to(grad.dtype)
        out[em.position[rows, j]] = term
    return out


def weight_grads(y: torch.Tensor, grad: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Adjoint of :func:`contributions` with respect to the weights: ``<y row of (n, j), grad[n]>``."""
    em = handle.expert_layout
    local = _local_mask(handle)
    out = torch.zeros(local.shape, dtype=torch.float32, device=grad.device)
    g = grad.float()
    if em is None:
        dots = (y.float() * g).sum(-1, keepdim=True)
        return torch.where(local, dots, out)
    for j in range(local.shape[1]):
        rows = local[:, j].nonzero()[:, 0]
        out[rows, j] = (y.index_select(0, em.position[rows, j]).float() * g[rows]).sum(-1)
    return out


def _local_weight_sum(weights: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(weights.shape[0], dtype=torch.float32, device=weights.device)
    for j in range(weights.shape[1]):  # ascending slot order, the same on every backend
        total = total + torch.where(local[:, j], weights[:, j], 0.0)
    return total


class DispatchFn(torch.autograd.Function):
    """``Buffer.dispatch`` with autograd: the backward is a combine of the gradients."""

    @staticmethod
    def forward(ctx, buffer: Buffer, call: dict[str, Any], x: torch.Tensor, topk_weights: torch.Tensor | None):
        recv_x, recv_idx, recv_w, counts, handle, work = buffer._dispatch_raw(x=x, topk_weights=topk_weights, **call)
        ctx.buffer, ctx.handle, ctx.fp8 = buffer, handle, call["scales"] is not None
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w, counts, handle, work

    @staticmethod
    def backward(ctx, grad_x, _idx, grad_w, *_):
        handle = ctx.handle
        want_x = ctx.needs_input_grad[2] and not ctx.fp8  # an FP8 payload is not differentiable
        want_w = ctx.needs_input_grad[3]
        # Zero-width rows when only the weights need a gradient: the same collectives, no payload.
        rows = grad_x if want_x else torch.empty(handle.num_rows, 0, device=handle.recv_topk_idx.device)
        gx, gw, _ = ctx.buffer._combine_raw(rows, handle, None, grad_w if want_w else None, async_op=False)
        return None, None, gx if want_x else None, gw


class CombineFn(torch.autograd.Function):
    """``Buffer.combine`` with autograd."""

    @staticmethod
    def forward(ctx, buffer: Buffer, handle: DispatchHandle, async_op: bool, y: torch.Tensor,
                topk_weights: torch.Tensor | None):
        out, out_w, work = buffer._combine_raw(y, handle, topk_weights, topk_weights, async_op=async_op)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.save_for_backward(y, topk_weights)
        return out, out_w, work

    @staticmethod
    def backward(ctx, grad_out, grad_out_w, _work):
        buffer, handle = ctx.buffer, ctx.handle
        y, weights = ctx.saved_tensors
        want_y, want_w = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        g_recv, _, g_w, *_ = buffer._dispatch_raw(
            x=grad_out, scales=None, topk_idx=None, topk_weights=grad_out_w if want_w else None,
            num_experts=handle.num_experts, layout=None, handle=handle,
            expert_alignment=handle.expert_alignment, expert_major=False, async_op=False)
        gy = expand(g_recv, handle, weights) if want_y else None
        gw = weight_grads(y, g_recv, handle) + g_w if want_w else None
        return None, None, None, gy, gw
