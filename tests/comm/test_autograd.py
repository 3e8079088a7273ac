"""Gradients of a tiny MoE layer built on dispatch/combine against a dense single-process reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dualflow.comm import Buffer
from tests.comm.cases import gather
from tests.dist import progress, run_workers

HIDDEN, K, PER_RANK = 128, 3, 2


def _dense(xs, idxs, ws, probes, weights):
    """sum_s <probe_s, sum_j w[t, j] * x[t] @ W[idx[t, j]]> in one process."""
    loss = 0.0
    for x, idx, w, probe in zip(xs, idxs, ws, probes):
        out = torch.zeros_like(x)
        for j in range(idx.shape[1]):
            valid = idx[:, j] >= 0
            rows = torch.einsum("th,thg->tg", x[valid], weights[idx[valid, j]])
            out = out.index_add(0, valid.nonzero()[:, 0], w[valid, j, None] * rows)
        loss = loss + (out * probe).sum()
    return loss


def _experts(recv_x, recv_idx, recv_w, handle, local_w, layout):
    """This rank's experts on the received rows, in the dispatch's layout."""
    if layout == "expert_major":
        offsets = handle.expert_offsets
        return torch.cat([recv_x[offsets[e]:offsets[e + 1]] @ local_w[e] for e in range(PER_RANK)])
    y = torch.zeros_like(recv_x)
    for e in range(PER_RANK):  # standard layout: the rank weights its own experts, combine only adds
        scale = torch.where(recv_idx == e, recv_w, 0.0).sum(-1, keepdim=True)
        y = y + scale * (recv_x @ local_w[e])
    return y


def _worker(rank, world, layout):
    torch.manual_seed(1234)  # same expert weights everywhere
    num_experts = PER_RANK * world
    weights = torch.randn(num_experts, HIDDEN, HIDDEN) / HIDDEN ** 0.5
    g = torch.Generator().manual_seed(rank)
    num_tokens = 3 + 2 * rank
    idx = torch.randint(-1, num_experts, (num_tokens, K), generator=g)
    x = torch.randn(num_tokens, HIDDEN, generator=g)
    if layout == "fp8":  # FP8 payload: only the router weights and expert weights get gradients
        x = x.to(torch.float8_e4m3fn).float()
    w = torch.rand(num_tokens, K, generator=g)
    probe = torch.randn(num_tokens, HIDDEN, generator=g)
    buffer = Buffer(None, HIDDEN, backend="torch")

    x_leaf = x.clone().requires_grad_(layout != "fp8")
    w_leaf = w.clone().requires_grad_()
    local_w = weights[rank * PER_RANK:(rank + 1) * PER_RANK].clone().requires_grad_()
    progress("distributed forward/backward")
    if layout == "fp8":
        payload = (x.to(torch.float8_e4m3fn), torch.ones(num_tokens, HIDDEN // 128))
        recv = buffer.dispatch(payload, idx, w_leaf, num_experts, expert_major=True, expert_alignment=4)
        recv_x = recv[0][0].float() * recv[0][1].repeat_interleave(128, dim=1)
        y = _experts(recv_x, recv[1], recv[2], recv[4], local_w, "expert_major")
    else:
        em = layout == "expert_major"
        recv = buffer.dispatch(x_leaf, idx, w_leaf, num_experts, expert_major=em, expert_alignment=4)
        y = _experts(recv[0], recv[1], recv[2], recv[4], local_w, layout)
    out = buffer.combine(y, recv[4], recv[2] if layout != "standard" else None)[0]
    (out * probe).sum().backward()

    progress("dense reference")
    everyone = gather((x, idx, w, probe))
    xs = [e[0].clone().requires_grad_() for e in everyone]
    ws = [e[2].clone().requires_grad_() for e in everyone]
    ref_weights = weights.clone().requires_grad_()
    _dense(xs, [e[1] for e in everyone], ws, [e[3] for e in everyone], ref_weights).backward()

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp(min=1e-30))

    errors = {"w": rel(w_leaf.grad, ws[rank].grad),
              "experts": rel(local_w.grad, ref_weights.grad[rank * PER_RANK:(rank + 1) * PER_RANK])}
    if layout != "fp8":
        errors["x"] = rel(x_leaf.grad, xs[rank].grad)
    dist.barrier()
    return errors


@pytest.mark.parametrize("layout", ["standard", "expert_major", "fp8"])
def test_moe_layer_gradients_match_dense_reference(layout):
    for rank, errors in enumerate(run_workers(_worker, 3, layout, timeout=120)):
        for name, err in errors.items():
            assert err < 1e-6, f"rank {rank}: relative error of d/d{name} is {err:.3g}"
