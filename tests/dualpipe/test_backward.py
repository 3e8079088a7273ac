"""The I/W split of a stage's backward against an unsplit backward, on graphs of several shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dualflow.dualpipe.backward import backward_full, backward_split


class MLP(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(3 * d, d)

    def forward(self, x):
        return (x + self.down(F.gelu(self.up(self.norm(x)))),)


class Tied(MLP):
    """One weight used by two matmuls (tied embeddings do this)."""

    def forward(self, x):
        h = self.up(x)
        return (F.linear(h, self.down.weight) + F.linear(torch.tanh(h), self.down.weight),)


class SharedBias(MLP):
    """A parameter added in two places: its gradient edge has two feeders on the input path (computed in I)."""

    def __init__(self, d=8):
        super().__init__(d)
        self.b = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return (self.down(F.gelu(self.up(x + self.b))) * self.b + self.b,)


class OutsideUse(SharedBias):
    """A parameter fed from the input path and from a parameter-only output: a full backward in I."""

    def forward(self, x):
        return self.down(F.gelu(self.up(x + self.b))), self.b * 3


class Attention(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = self.norm(x)
        return (x + self.attn(h, h, h, need_weights=False)[0],)


class Checkpointed(MLP):
    def forward(self, x):
        return checkpoint(super().forward, x, use_reentrant=False)


class TwoInputs(MLP):
    """Takes a second input that does not require gradients, returns two outputs."""

    def forward(self, x, ids):
        h = super().forward(x)[0] + ids.float().unsqueeze(-1)
        return h, self.up(h).sum(-1)


MODULES = [MLP, Tied, SharedBias, OutsideUse, Attention, Checkpointed, TwoInputs]


def _run(cls, split: bool):
    torch.manual_seed(0)
    m = cls()
    torch.manual_seed(1)
    x = (torch.randn(2, 5, 8) * 3).requires_grad_()  # adversarial scale; not zeros
    inputs = (x, torch.randint(0, 4, (2, 5))) if cls is TwoInputs else (x,)
    outs = m(*inputs)
    torch.manual_seed(2)
    grads = [torch.randn_like(o) for o in outs]
    if split:
        gin, weight = backward_split(list(outs), grads, inputs)
        after_i = {n: p.grad is not None for n, p in m.named_parameters()}
        weight()
    else:
        gin, after_i = backward_full(list(outs), grads, inputs), {}
    return m, gin, after_i


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_split_gives_exactly_the_unsplit_gradients(cls):
    ref, ref_gin, _ = _run(cls, split=False)
    m, gin, after_i = _run(cls, split=True)
    # Bitwise on any CPU: the split runs autograd's own backward functions on the same shapes and inputs,
    # in another order; each gradient gets the same terms (two at most, whose sum is order-free).
    assert torch.equal(gin[0], ref_gin[0])
    assert all(g is None for g in gin[1:])  # integer inputs get no gradient
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name
    deferred = [n for n, has in after_i.items() if not has and dict(m.named_parameters())[n].grad is not None]
    if cls is OutsideUse:
        assert not deferred  # fell back to a full backward in I
    else:
        assert "up.weight" in deferred or "attn.in_proj_weight" in deferred  # weight gradients waited for W


def test_w_does_not_recompute_input_gradients():
    """I computes only input-gradient matmuls, W only weight-gradient ones: 2 + 2 for two linears."""
    from torch.profiler import ProfilerActivity, profile

    def count(split: bool) -> int:
        torch.manual_seed(0)
        m = MLP()
        x = torch.randn(4, 8).requires_grad_()
        (out,) = m(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if split:
                backward_split([out], [torch.ones_like(out)], [x])[1]()
            else:
                backward_full([out], [torch.ones_like(out)], [x])
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))

    assert count(split=True) == count(split=False) == 4


def test_first_stage_defers_everything_and_unreached_roots_wait_for_w():
    torch.manual_seed(0)
    m = MLP()
    ref = copy.deepcopy(m)
    x = torch.randn(3, 8)                       # data: no gradient wanted
    (out,) = m(x)
    g = torch.randn_like(out)
    gin, weight = backward_split([out], [g], [x])
    assert gin == [None] and all(p.grad is None for p in m.parameters())
    weight()
    (r,) = ref(x)
    r.backward(g)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(m.parameters(), ref.parameters()))


def test_nothing_to_do_when_no_gradient_arrives():
    m = MLP()
    x = torch.randn(3, 8).requires_grad_()
    (out,) = m(x)
    gin, weight = backward_split([out], [None], [x])
    weight()
    assert gin == [None] and all(p.grad is None for p in m.parameters())
