"""The phase-by-phase backward and the overlapped forward/backward against plain autograd, bitwise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dualflow.train.model import ModelConfig, Stage, cross_entropy
from dualflow.train.stage import OverlappedStage, _interleave
from tests.dist import progress, run_workers

CFG = ModelConfig(dim=32, n_layers=4, n_dense_layers=1, n_heads=4, dense_hidden=48, expert_hidden=16,
                  n_routed_experts=4, top_k=2)


def _consumers(root) -> dict:
    """How many autograd edges point at each (node, output) of the graph under ``root``."""
    count, seen, todo = {}, set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, idx in node.next_functions:
            if nxt is not None:
                count[(nxt, idx)] = count.get((nxt, idx), 0) + 1
                todo.append(nxt)
    return count


MLA = dataclasses.replace(CFG, attention="mla", q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=6,
                          qk_rope_head_dim=4, v_head_dim=10)


@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(CFG, tie_embeddings=True, n_shared_experts=2),
                                 dataclasses.replace(CFG, n_shared_experts=0, n_dense_layers=0), MLA,
                                 dataclasses.replace(MLA, q_lora_rank=0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_tensor_has_more_than_two_gradient_terms(cfg, dtype):
    # The property that makes a phase-by-phase backward equal to autograd's: addition of two terms does
    # not depend on their order. A tied weight is read twice, which is still two.
    m = Stage(cfg, range(cfg.n_layers), first=True, last=True, compute_dtype=dtype)
    m.init_weights(0)
    loss = cross_entropy(m(torch.randint(0, 256, (2, 8))), torch.randint(0, 256, (2, 8)))
    worst = max(_consumers(loss.grad_fn).values())
    assert worst <= 2


class _Fake:
    def __init__(self, tag, kinds, log):
        self.tag, self.kinds, self.log = tag, list(kinds), log

    def peek(self):
        return self.kinds[0] if self.kinds else None

    def run_next(self):
        self.log.append(f"{self.tag}.{self.kinds.pop(0)}")


def test_interleave_pairs_communication_with_computation_as_in_figure_4():
    log = []
    fwd = _Fake("F", ["compute", "comm", "compute", "comm"], log)  # attention, dispatch, MLP, combine
    bwd = _Fake("B", ["comm", "compute", "comm", "compute"], log)  # combine, MLP, dispatch, attention
    _interleave(fwd, bwd, None)
    assert log == ["B.comm", "F.compute", "F.comm", "B.compute", "B.comm", "F.compute", "F.comm", "B.compute"]
    log.clear()  # uneven sides (embedding first, head last, dense layers): every step still runs once
    _interleave(_Fake("F", ["compute"] * 3 + ["comm"], log), _Fake("B", ["comm", "compute"], log), None)
    assert sorted(log) == sorted(["F.compute"] * 3 + ["F.comm", "B.comm", "B.compute"])
    assert log.index("B.comm") < log.index("F.compute") + 1


def _pair(cfg, seed, last=True, **kw):
    """(module0, module1): two stages of one model; the second one last, or a middle stage."""
    a = Stage(cfg, range(0, 2), first=True, last=False, **kw)
    b = Stage(cfg, range(2, cfg.n_layers), first=False, last=last, **kw)
    for s in (a, b):
        s.init_weights(seed)
    return OverlappedStage(a), OverlappedStage(b)


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _run_both(cfg, setup=None, *, kw=None, rank=0, batch=3, last=True):
    """Backward of micro-batch 1 (plain autograd vs phase by phase) next to the forward of micro-batch 0."""
    kw = kw or {}
    results = []
    for overlapped in (False, True):
        m0, m1 = _pair(cfg, 7, last, **kw)
        if setup:
            setup(m0, m1)
        g = torch.Generator().manual_seed(100 + rank)
        x0 = torch.randint(0, 256, (batch, 8), generator=g)
        h1 = torch.randn(batch, 8, cfg.dim, generator=g).requires_grad_()
        labels1 = torch.randint(0, 256, (batch, 8), generator=g)
        grad1 = torch.randn(batch, 8, cfg.dim, generator=g)

        def loss_of(out, labels1=labels1, grad1=grad1):
            return cross_entropy(out, labels1) if last else (out * grad1).sum()

        # a first accumulation, so the phase backward adds to existing .grad as autograd does
        loss_of(m1(h1.detach().requires_grad_())).backward()
        out1 = m1(h1)
        if overlapped and last:
            outs0, _ = OverlappedStage.overlapped_forward_backward(m0, [x0], None, [], m1, loss_of(out1), None, None)
        elif overlapped:
            outs0, _ = OverlappedStage.overlapped_forward_backward(m0, [x0], None, [], m1, None, [out1], [grad1])
        else:
            outs0 = [m0(x0)]
            loss_of(out1).backward()
        results.append((outs0[0].detach(), h1.grad.clone(), _grads(m1), _grads(m0)))
    return results


def _assert_bitwise(results):
    # Bitwise on any CPU: both paths run the same operations on the same shapes and inputs in one process
    # (the phase-by-phase backward calls autograd's own backward functions, and a sum of two gradient
    # terms does not depend on their order); only the order of independent operations changes.
    (o_a, h_a, g1_a, g0_a), (o_b, h_b, g1_b, g0_b) = results
    assert torch.equal(o_a, o_b)
    assert torch.equal(h_a, h_b)
    assert g1_a.keys() == g1_b.keys() and len(g1_a) > 10 and not g0_a and not g0_b
    for name in g1_a:
        assert torch.equal(g1_a[name], g1_b[name]), name


@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(CFG, n_shared_experts=2, top_k=3),
                                 dataclasses.replace(CFG, tie_embeddings=False, n_dense_layers=3), MLA])
def test_overlapped_step_equals_plain_autograd_bitwise(cfg):
    _assert_bitwise(_run_both(cfg))


def test_overlapped_step_bf16_bitwise():
    _assert_bitwise(_run_both(CFG, kw=dict(compute_dtype=torch.bfloat16)))


def test_overlapped_step_of_a_middle_stage_bitwise():
    _assert_bitwise(_run_both(CFG, last=False))


def test_unrecorded_forward_falls_back_to_autograd():
    m0, m1 = _pair(CFG, 1)
    h1 = torch.randn(2, 8, CFG.dim, requires_grad=True)
    loss1 = cross_entropy(m1.stage(h1), torch.randint(0, 256, (2, 8)))  # not recorded: autograd's backward runs
    OverlappedStage.overlapped_forward_backward(m0, [torch.randint(0, 256, (2, 8))], None, [], m1, loss1,
                                              None, None)
    assert h1.grad is not None and h1.grad.abs().sum() > 0


def _ep_worker(rank, world, fp8):
    from dualflow.train.ep import ExpertParallelExchange

    cfg = dataclasses.replace(CFG, dim=128, n_heads=4) if fp8 else CFG
    exchange = ExpertParallelExchange(None, cfg.dim, cfg.n_routed_experts, fp8=fp8)
    experts = range(rank * 2, rank * 2 + 2)

    def setup(m0, m1):
        for m in (m0, m1):
            m.stage.set_exchange(exchange)
        if fp8:
            from dualflow.fp8 import convert_to_fp8

            for m in (m0, m1):
                convert_to_fp8(m.stage)

    progress("both paths")
    results = _run_both(cfg, setup, kw=dict(expert_ids=experts), rank=rank, batch=2)
    _assert_bitwise(results)
    return True


@pytest.mark.parametrize("fp8", [False, True])
def test_overlapped_step_with_expert_parallel_all_to_all_bitwise(fp8):
    assert run_workers(_ep_worker, 2, fp8, timeout=120) == [True, True]


def test_records_are_released_after_a_plain_backward():
    m = OverlappedStage(Stage(CFG, range(CFG.n_layers), first=True, last=True))
    m.stage.init_weights(0)
    x = torch.randint(0, 256, (2, 8))
    for _ in range(3):
        out = m(x)
        cross_entropy(out, x).backward()
        del out
    assert not m._records  # the runtime ran autograd itself: the records went with their outputs


def test_overlapped_step_with_fp8_latent_attention_bitwise():
    from dualflow.fp8 import Fp8Linear, convert_to_fp8

    converted = []

    def setup(m0, m1):
        for m in (m0, m1):
            convert_to_fp8(m.stage)
            converted.extend(type(getattr(m.stage.layers[k].attn, name)) for k in m.stage.layers
                             for name in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo"))

    # every projection width a multiple of 16, so that all of them convert
    cfg = dataclasses.replace(MLA, dim=128, n_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                              qk_rope_head_dim=16, v_head_dim=16)
    _assert_bitwise(_run_both(cfg, setup))
    assert converted and all(t is Fp8Linear for t in converted)  # the latent projections run in FP8
