"""Expert-parallel token exchange over ``dualflow.comm.Buffer`` (the :class:`~dualflow.train.exchange.Exchange`
of a MoE layer whose experts are spread over a process group).

Dispatch sends each token once to every rank hosting one of its experts, with its routing weights
(differentiable: the router learns through them); the layer weights and sums its local experts' outputs
per received token, and combine returns those sums to the source, added in FP32 in ascending rank order.

With ``fp8=True`` the tokens travel as FP8 E4M3 with 1x128 power-of-two scales (DeepSeek-V3's dispatch
recipe) and are dequantized on arrival; the gradient flows straight through the quantization, and the
backward (a combine of the received rows' gradients) stays in the activations' precision, like combine.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dualflow.comm import Buffer
from dualflow.fp8 import dequantize, quantize_1x128
from dualflow.train.exchange import Received


class _Fp8Arrival(torch.autograd.Function):
    """Forward: the dequantized received rows. Backward: the rows' gradients combined back to ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, arrived: torch.Tensor, buffer: Buffer, handle: Any) -> torch.Tensor:
        ctx.buffer, ctx.handle = buffer, handle
        return arrived

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with torch.no_grad():
            gx, _, _ = ctx.buffer.combine(grad.contiguous(), ctx.handle)
        return gx, None, None, None


class ExpertParallelExchange:
    """Dispatch/combine of one expert-parallel group; ``n_experts`` global experts split evenly over it."""

    def __init__(self, group: dist.ProcessGroup | None, hidden: int, n_experts: int, *, fp8: bool = False,
                 backend: str = "auto", checks: str = "collective") -> None:
        self.buffer = Buffer(group, hidden, backend=backend, checks=checks)
        self.n_experts, self.fp8 = n_experts, fp8

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> Received:
        if not self.fp8:
            recv_x, recv_idx, recv_w, _, handle, _ = self.buffer.dispatch(x, topk_idx, topk_weights, self.n_experts)
            return Received(recv_x, recv_idx, recv_w, handle)
        payload = quantize_1x128(x.detach(), pow2_scales=True)
        (q, scales), recv_idx, recv_w, _, handle, _ = self.buffer.dispatch(payload, topk_idx, topk_weights,
                                                                          self.n_experts)
        arrived = dequantize(q, scales, 1).to(x.dtype)
        return Received(_Fp8Arrival.apply(x, arrived, self.buffer, handle), recv_idx, recv_w, handle)

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        out, _, _ = self.buffer.combine(y, handle)
        return out
