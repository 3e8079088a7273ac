"""Grouped experts (stacked weights, device-side permutation, grouped GEMMs) against the per-expert loop."""

from __future__ import annotations

import pytest
import torch

from dualflow.train.experts import GroupedExperts, per_expert_views, plan_routes, routed_reference


def _experts(n=5, dim=32, hidden=16, ids=None, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    e = GroupedExperts(dim, hidden, ids if ids is not None else range(n))
    with torch.no_grad():
        e.w13.normal_(0, 0.2)
        e.w2.normal_(0, 0.2)
    return e.to(dtype)


def _routing(rows, k, n_experts, seed, nowhere=0.0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(rows)]) if rows else \
        torch.zeros(0, k, dtype=torch.int64)
    if nowhere:  # expert parallelism: slots whose expert lives on another rank
        idx[torch.rand(rows, k, generator=gen) < nowhere] = -1
    w = torch.rand(rows, k, generator=gen)
    return idx, w


def test_plan_places_each_expert_in_an_aligned_block():
    idx = torch.tensor([[2, 0], [2, -1], [-1, -1], [0, 2], [4, 2]])
    for align in (1, 4, 128):
        plan = plan_routes(idx, 5, align)
        flat = idx.flatten()
        assert plan.dest.unique().numel() == flat.numel()  # one row per pair
        ends = [0, *plan.ends.tolist()]
        counts = torch.bincount(flat[flat >= 0], minlength=5).tolist()
        for e in range(5):
            lo, hi = ends[e], ends[e + 1]
            assert lo % align == 0 and hi - lo == -(-counts[e] // align) * align
            rows = plan.dest[flat == e]
            assert rows.tolist() == list(range(lo, lo + counts[e]))  # stable: token order kept
        parked = plan.dest[flat < 0]
        assert (parked >= ends[-1]).all() and (parked < plan.rows).all()
        assert plan.rows == -(-(flat.numel() + 5 * (align - 1)) // align) * align


@pytest.mark.parametrize("case", ["random", "one-expert", "nowhere", "empty-experts", "top8", "k1", "no-rows"])
def test_grouped_matches_per_expert_loop_forward_and_backward(case):
    n, dim, rows, k, nowhere = 6, 32, 37, 2, 0.0
    if case == "top8":
        n, k = 9, 8
    if case == "k1":
        k = 1
    if case == "nowhere":
        nowhere = 0.5
    if case == "no-rows":  # expert parallelism: a rank that received nothing
        rows = 0
    # float64: the grouped GEMMs and the loop's sum in orders the CPU's kernels choose (row counts, AVX2 or
    # AVX-512), so FP32 results agree only to a rounding bound that depends on the machine; in float64 the
    # orders' difference is ~1e-15 of the magnitudes, and a misplaced or dropped token is off by O(1)
    experts = _experts(n, dim, dtype=torch.float64)
    idx, w = _routing(rows, k, n, seed=1, nowhere=nowhere)
    w = w.double()
    if case == "one-expert":
        idx = torch.full((rows, 1), 3)
        w = w[:, :1]
    if case == "empty-experts":
        idx = idx % 2  # experts 2..5 receive nothing
        idx[:, 1] = 1 - idx[:, 0]
    x = torch.randn(rows, dim, dtype=torch.float64) * 3
    if case == "nowhere":
        idx[0] = -1  # a received row with no local slot at all
    g = torch.randn(rows, dim, dtype=torch.float64)
    if rows == 0:  # nothing received: an empty output, and zero gradients for every expert
        out = experts(x.requires_grad_(True), idx, w.requires_grad_(True))
        out.backward(g)
        assert out.shape == (0, dim) and torch.all(experts.w13.grad == 0) and torch.all(experts.w2.grad == 0)
        return
    grads = []
    for fn in (lambda *a: experts(*a, all_local=False), lambda *a: routed_reference(experts, *a)):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        out = fn(xx, idx, ww)
        out.backward(g)
        grads.append((out.detach(), xx.grad, ww.grad, experts.w13.grad.clone(), experts.w2.grad.clone()))
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if case == "nowhere":
        assert torch.all(grads[0][0][0] == 0) and torch.all(grads[0][1][0] == 0)


def test_all_local_shortcut_equals_the_masked_path():
    experts = _experts()
    idx, w = _routing(20, 2, 5, seed=3)
    x = torch.randn(20, 32)
    torch.testing.assert_close(experts(x, idx, w, all_local=True), experts(x, idx, w, all_local=False),
                               rtol=0, atol=0)  # same ops on the same rows: identical


def test_bf16_grouped_experts_close_to_float64():
    experts = _experts()
    idx, w = _routing(64, 2, 5, seed=4)
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = experts(x.bfloat16(), idx, w)
    ref = routed_reference(experts.double(), x.double(), idx, w.double())
    assert got.dtype == torch.bfloat16
    assert ((got.double() - ref).norm() / ref.norm()) < 2e-2


def test_parked_rows_cannot_leak_non_finite_values():
    # the grouped GEMM leaves rows after the last expert block undefined: nothing may read them unmasked
    experts = _experts()
    idx, w = _routing(16, 2, 5, seed=5, nowhere=0.5)
    x = torch.randn(16, 32, requires_grad=True)
    out = experts(x, idx, w)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_state_dict_is_per_expert_with_global_ids_and_round_trips():
    a = _experts(ids=(4, 5, 6))
    sd = a.state_dict()
    assert sorted(sd) == sorted(f"{e}.{w}.weight" for e in (4, 5, 6) for w in ("w13", "w2"))
    assert sd["5.w13.weight"].shape == (32, 32) and sd["5.w2.weight"].shape == (32, 16)
    assert torch.equal(sd["6.w2.weight"], a.w2[2])
    b = _experts(ids=(4, 5, 6), seed=9)
    b.load_state_dict(sd)
    assert torch.equal(b.w13, a.w13) and torch.equal(b.w2, a.w2)
    c = _experts(ids=(0, 1, 2))
    with pytest.raises(RuntimeError, match="Missing key"):
        c.load_state_dict(sd)


def test_per_expert_views_split_any_stacked_tensor():
    moments = torch.randn(3, 8, 4)
    views = per_expert_views("layers.2.moe.experts.w13", moments, (6, 7, 8))
    assert list(views) == [f"layers.2.moe.experts.{e}.w13.weight" for e in (6, 7, 8)]
    views["layers.2.moe.experts.7.w13.weight"].fill_(1.0)  # views: writes land in the stacked tensor
    assert torch.all(moments[1] == 1.0)
    assert per_expert_views("layers.2.attn.wo.weight", moments, ()) == {"layers.2.attn.wo.weight": moments}
    with pytest.raises(ValueError, match="3 stacked experts"):
        per_expert_views("layers.2.moe.experts.w2", moments, (1, 2))


@pytest.mark.gpu
def test_grouped_experts_on_gpu_match_the_loop_in_bf16():
    experts = _experts(8, 256, 128).cuda()
    idx, w = _routing(1000, 4, 8, seed=6, nowhere=0.3)
    x = torch.randn(1000, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = experts(x.bfloat16(), idx.cuda(), w.cuda())
        ref = routed_reference(experts, x.bfloat16(), idx.cuda(), w.cuda())
    assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
