"""AdamW: torch's fused kernel against the update written out parameter by parameter."""

from __future__ import annotations

import pytest
import torch

from dualflow.train.optim import AdamW, OptimConfig, learning_rate


def _params(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"layers.0.attn.wo.weight": (16, 8), "layers.0.attn_norm.weight": (8,), "experts.w13": (3, 6, 8),
              "frozen.weight": (4, 4)}
    return {n: torch.nn.Parameter(torch.randn(s, generator=gen)) for n, s in shapes.items()}


@pytest.mark.skipif(not hasattr(torch, "_fused_adamw_"), reason="this torch has no fused AdamW kernel")
def test_fused_step_equals_the_reference_update():
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1)
    a, b = _params(0), _params(0)
    fused, ref = AdamW(a, cfg), AdamW(b, cfg)
    assert fused.fused_usable()
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        for name in a:
            if name == "frozen.weight":
                continue  # a parameter without a gradient is left alone by both
            g = torch.randn(a[name].shape, generator=gen) * (10.0 if step == 2 else 1.0)
            a[name].grad, b[name].grad = g.clone(), g.clone()
        lr = learning_rate(step, 5, cfg)
        fused.step(lr)
        ref.steps += 1
        ref.reference_step(lr)
        for name in a:  # FP32 arithmetic in another order: rounding, not bits
            torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(fused.exp_avg_sq[name], ref.exp_avg_sq[name], rtol=1e-6, atol=1e-9)
    assert torch.equal(a["frozen.weight"], _params(0)["frozen.weight"])
    assert not torch.equal(a["layers.0.attn_norm.weight"], _params(0)["layers.0.attn_norm.weight"])


@pytest.mark.skipif(not hasattr(torch, "_fused_adamw_"), reason="this torch has no fused AdamW kernel")
@pytest.mark.parametrize("fused", [True, False])
def test_clipping_divisor_equals_dividing_the_gradients_first(fused):
    # the divisor is applied as the optimizer reads the gradients: the same update as dividing them first
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1)
    a, b = _params(3), _params(3)
    opt_a, opt_b = AdamW(a, cfg), AdamW(b, cfg)
    gen = torch.Generator().manual_seed(4)
    for step in range(3):
        divisor = 1.0 + 7.3 * step
        for name in a:
            g = torch.randn(a[name].shape, generator=gen)
            a[name].grad = g.clone()
            b[name].grad = g / torch.tensor(divisor, dtype=torch.float32)
        for opt, kw in ((opt_a, {"grad_divisor": divisor}), (opt_b, {})):
            if fused:
                opt.step(1e-2, **kw)
            else:
                opt.steps += 1
                opt.reference_step(1e-2, **kw)
        for name in a:  # same FP32 operations in the same order: equal bits
            assert torch.equal(a[name], b[name]), name
            assert torch.equal(a[name].grad, b[name].grad), name  # the divided gradient is left behind


def test_vectors_are_not_decayed_and_bf16_moments_take_the_reference_path():
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.5, moments_dtype="bfloat16")
    params = _params(2)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = AdamW(params, cfg)
    assert not opt.fused_usable()
    for p in params.values():
        p.grad = torch.zeros_like(p)  # a zero gradient: only the decay moves a parameter
    opt.step(1e-2)
    torch.testing.assert_close(params["layers.0.attn.wo.weight"], before["layers.0.attn.wo.weight"] * (1 - 1e-2 * 0.5))
    assert torch.equal(params["layers.0.attn_norm.weight"], before["layers.0.attn_norm.weight"])
