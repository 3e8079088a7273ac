"""The model: each part against a plain reference, and any slicing of it equal to the whole."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dualflow.train.model import LatentAttention, ModelConfig, RMSNorm, Rotary, Router, Stage, cross_entropy, rotary

CFG = ModelConfig(dim=32, n_layers=4, n_dense_layers=1, n_heads=4, dense_hidden=48, expert_hidden=16,
                  n_routed_experts=6, top_k=2)
# multi-head latent attention, without and with a query latent (odd widths on purpose)
MLA = dataclasses.replace(CFG, attention="mla", kv_lora_rank=24, qk_nope_head_dim=6, qk_rope_head_dim=4,
                          v_head_dim=10)
MLA_Q = dataclasses.replace(MLA, q_lora_rank=20)


def _model(cfg=CFG, seed=0, **kw):
    m = Stage(cfg, range(cfg.n_layers), first=True, last=True, **kw)
    m.init_weights(seed)
    return m


def _tokens(b=3, s=10, seed=1):
    return torch.randint(0, CFG.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def test_rmsnorm_matches_formula():
    norm = RMSNorm(8, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(5, 8) * 100  # large values: the normalisation must not overflow or lose scale
    expected = x / torch.sqrt((x.double() ** 2).mean(-1, keepdim=True) + 1e-6).float() * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_on_relative_position_only():
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 12, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 12, 16)
    qr, kr = rotary(q.contiguous(), 10000.0), rotary(k.contiguous(), 10000.0)
    scores = (qr[0, 0] @ kr[0, 0].T).double()
    for offset in (0, 1, 5):
        diag = torch.diagonal(scores, offset)
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-4)
    assert not torch.allclose(scores[0, 0], scores[0, 3])  # and it does depend on the distance
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))  # a rotation


def test_rotary_module_with_its_tables_matches_the_formula_and_computes_longer_sequences():
    module = Rotary(16, 500.0, max_seq=12)
    assert not dict(module.state_dict())  # the tables are not checkpointed
    for seq in (5, 12, 20):  # inside, at and beyond the tables (20: computed at the call)
        x = torch.randn(2, 3, seq, 16) * 10
        # float64 formula: each output is a*cos - b*sin of FP32 values, so a few FP32 ulps of |x| apart
        pos = torch.arange(seq, dtype=torch.float64)[:, None]
        ang = pos * 500.0 ** (-torch.arange(8, dtype=torch.float64) / 8)
        a, b = x.double().unflatten(-1, (8, 2)).unbind(-1)
        want = torch.stack((a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()), -1).flatten(-2)
        bound = 8 * 2.0**-24 * (pos.abs() + 1) * x.abs().amax()  # angles of FP32 positions x frequencies
        got = module(x)
        assert ((got.double() - want).abs() <= bound).all()
        # [b, s, heads, d] along dim 1, as the attention modules rotate: the same reference; and the same
        # products and sums per element as along -2, so the same bits on any CPU
        along_1 = module(x.transpose(1, 2).contiguous(), seq_dim=1).transpose(1, 2)
        assert ((along_1.double() - want).abs() <= bound).all()
        torch.testing.assert_close(along_1, got, rtol=0, atol=0)
        # MLA's key part [b, s, d]: positions at -2 whichever way they are named
        torch.testing.assert_close(module(x[:, 0], seq_dim=1), got[:, 0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="seq_dim must not be the channel dimension"):
        module(torch.randn(2, 4, 8), seq_dim=-1)


def test_router_selects_with_bias_but_weights_ignore_it():
    cfg = dataclasses.replace(CFG, routed_scale=2.5)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(20, cfg.dim)
    scores = torch.sigmoid(x @ router.weight.T)
    idx, w = router(x)
    # the router computes the same matmul and sigmoid on the same [20, dim] input: the same bits anywhere
    assert torch.equal(idx, scores.topk(cfg.top_k, -1).indices)
    router.bias[4] = 10.0  # expert 4 always selected, but its weight is its affinity share, not boosted
    idx, w = router(x)
    assert (idx == 4).any(-1).all()
    chosen = scores.gather(-1, idx)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True) * 2.5)
    torch.testing.assert_close(w.sum(-1), torch.full((20,), 2.5))


def test_router_counts_load_in_training_and_bias_moves_toward_balance():
    router = Router(CFG)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(50, CFG.dim)
    idx, _ = router(x)
    load = torch.bincount(idx.flatten(), minlength=CFG.n_routed_experts).float()
    assert torch.equal(router.load, load)
    with torch.no_grad():
        router(x)
    assert torch.equal(router.load, load)  # no counting outside training forwards
    router.update_bias(load)
    expected = CFG.bias_update_speed * torch.sign(load.mean() - load)
    assert torch.equal(router.bias, expected) and expected.abs().sum() > 0
    assert router.load.sum() == 0


def _dense_moe_reference(moe, x):
    """Per token: shared(x) + sum over its top-k experts of weight * expert(x), looping token by token."""
    idx, w = moe.gate(x)
    out = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1], dtype=torch.float64)
        for k in range(idx.shape[1]):
            y += w[t, k].double() * moe.experts.expert(int(idx[t, k]), x[t:t + 1])[0].double()
        out.append(y)
    return torch.stack(out)


def test_routed_experts_match_token_by_token_reference():
    m = _model()
    moe = m.layers["2"].moe
    x = torch.randn(40, CFG.dim)
    idx, w = moe.gate(x)
    got = moe.routed(x, idx, w)
    torch.testing.assert_close(got.double(), _dense_moe_reference(moe, x), rtol=1e-5, atol=1e-6)


def test_all_tokens_to_one_expert():
    m = _model()
    moe = m.layers["3"].moe
    moe.gate.bias[2] = 100.0
    moe.gate.bias[5] = 50.0
    x = torch.randn(17, CFG.dim)
    idx, w = moe.gate(x)
    assert (idx[:, 0] == 2).all() and (idx[:, 1] == 5).all()
    torch.testing.assert_close(moe.routed(x, idx, w).double(), _dense_moe_reference(moe, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [CFG, MLA_Q], ids=["mha", "mla-q"])
def test_slices_equal_the_whole_model_bitwise(cfg):
    whole = _model(cfg, seed=3)
    a = Stage(cfg, range(0, 1), first=True, last=False)
    b = Stage(cfg, range(1, 3), first=False, last=False)
    c = Stage(cfg, range(3, 4), first=False, last=True)
    for s in (a, b, c):
        s.init_weights(3)
    params = dict(whole.named_parameters())
    for s in (a, b, c):
        for name, p in s.named_parameters():
            assert torch.equal(p, params[name]), name
    x = _tokens()
    # Bitwise on any CPU: the slices run the same operations on the same shapes and inputs as the whole
    # model (the same tokens route the same rows to every expert), in one process and thread setting.
    assert torch.equal(whole(x), c(b(a(x))))


def test_expert_shard_holds_its_global_experts():
    shard = Stage(CFG, range(CFG.n_layers), first=True, last=True, expert_ids=range(3, 6))
    shard.init_weights(0)
    whole = _model()
    assert shard.layers["1"].moe.experts.expert_ids == (3, 4, 5)
    assert torch.equal(shard.layers["1"].moe.experts.w13[1], whole.layers["1"].moe.experts.w13[4])
    assert torch.equal(shard.state_dict()["layers.1.moe.experts.4.w2.weight"],
                       whole.state_dict()["layers.1.moe.experts.4.w2.weight"])


@pytest.mark.parametrize("cfg", [CFG, MLA, MLA_Q], ids=["mha", "mla", "mla-q"])
def test_attention_is_causal(cfg):
    # In float64 and within a bound, not bitwise: other later tokens change how many rows each expert's
    # GEMM multiplies, and the CPU's BLAS blocks a GEMM by its row count and by the machine (AVX2 or
    # AVX-512, Intel or AMD), so earlier positions can differ in the last bits (in FP32 enough to flip a
    # top-k choice a layer later). In float64 they stay near 1e-16 relative, a top-k flips only on an exact
    # tie, and any leak of a later token moves the outputs by many orders more than the bound.
    m = _model(cfg, compute_dtype=torch.float64).double()
    x = _tokens()
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % CFG.vocab_size
    out_x, out_y = m(x), m(y)
    assert out_x.dtype == torch.float64
    bound = 1e6 * torch.finfo(torch.float64).eps
    torch.testing.assert_close(out_x[:, :6], out_y[:, :6], rtol=bound, atol=bound)
    assert not torch.allclose(out_x[:, 6:], out_y[:, 6:])


@pytest.mark.parametrize("base, param", [(CFG, "moe.experts.w13"), (MLA_Q, "attn.wkv_a.weight"),
                                         (MLA_Q, "attn.wq_a.weight")], ids=["mha-expert", "mla-kv", "mla-q"])
def test_whole_model_gradient_matches_finite_difference(base, param):
    cfg = dataclasses.replace(base, n_layers=2)
    m = _model(cfg, compute_dtype=torch.float64).double()
    x = _tokens(2, 6)
    labels = _tokens(2, 6, seed=2)
    p = m.layers["1"].get_parameter(param)
    loss = cross_entropy(m(x), labels)
    loss.backward()
    # Routing is piecewise constant, so a small step along the gradient changes the loss linearly.
    eps = 1e-6
    direction = torch.randn_like(p)
    with torch.no_grad():
        p += eps * direction
        up = cross_entropy(m(x), labels)
        p -= 2 * eps * direction
        down = cross_entropy(m(x), labels)
    fd = (up - down) / (2 * eps)
    torch.testing.assert_close(fd, (p.grad * direction).sum(), rtol=1e-5, atol=1e-9)


def test_tied_head_uses_the_embedding():
    cfg = dataclasses.replace(CFG, tie_embeddings=True)
    m = _model(cfg)
    assert m.head is None
    x = _tokens()
    logits = m(x)
    cross_entropy(logits, _tokens(seed=5)).backward()
    assert m.embed.weight.grad is not None
    # The gradient reaches rows the input never used: only the head can have put it there.
    unused = torch.ones(cfg.vocab_size, dtype=torch.bool)
    unused[x.flatten()] = False
    assert m.embed.weight.grad[unused].abs().sum() > 0
    first = Stage(cfg, range(2), first=True, last=False)
    with pytest.raises(ValueError, match="tie_embeddings"):
        Stage(cfg, range(2, 4), first=False, last=True)
    last = Stage(cfg, range(2, 4), first=False, last=True, tied_embed=first.embed)
    assert "embed.weight" not in dict(last.named_parameters())


def test_bf16_compute_keeps_fp32_master_weights_and_is_close():
    m32 = _model()
    m16 = _model(compute_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    x = _tokens()
    a, b = m32(x), m16(x)
    assert b.dtype == torch.float32  # logits leave the head in FP32 for the loss
    assert (a - b).norm() / a.norm() < 0.05


@pytest.mark.parametrize("bad", [dict(dim=30, n_heads=4), dict(n_dense_layers=5), dict(top_k=7),
                                 dict(dense_hidden=0), dict(attention="gqa"),
                                 dict(attention="mla", qk_rope_head_dim=3), dict(attention="mla", kv_lora_rank=0),
                                 dict(attention="mla", q_lora_rank=-1)])
def test_invalid_config_names_the_problem(bad):
    with pytest.raises(ValueError, match="invalid model config"):
        dataclasses.replace(CFG, **bad)


def test_num_params_counts_the_modules():
    for cfg in (CFG, dataclasses.replace(CFG, tie_embeddings=True, n_shared_experts=2), MLA, MLA_Q):
        assert cfg.num_params() == sum(p.numel() for p in _model(cfg).parameters())
    m = _model()
    per_expert = sum(p[0].numel() for p in m.layers["1"].moe.experts.parameters())
    assert CFG.num_params() - CFG.num_params(active=True) == 3 * (CFG.n_routed_experts - CFG.top_k) * per_expert


def _mla_reference(attn: LatentAttention, x: torch.Tensor) -> torch.Tensor:
    """MLA written out head by head: explicit latents, per-head slices, masked softmax, no SDPA."""
    s = x.shape[1]
    h, nope, rope, vd = attn.n_heads, attn.nope, attn.rope, attn.vdim
    if attn.q_rank:
        q_lat = x @ attn.wq_a.weight.T
        q_lat = q_lat / torch.sqrt((q_lat ** 2).mean(-1, keepdim=True) + 1e-6) * attn.q_norm.weight
        q = q_lat @ attn.wq_b.weight.T
    else:
        q = x @ attn.wq.weight.T
    kv_a = x @ attn.wkv_a.weight.T
    latent, k_rope = kv_a[..., :attn.kv_rank], kv_a[..., attn.kv_rank:]
    latent = latent / torch.sqrt((latent ** 2).mean(-1, keepdim=True) + 1e-6) * attn.kv_norm.weight
    kv = latent @ attn.wkv_b.weight.T
    k_rope = rotary(k_rope[:, None], attn.rotary.theta)[:, 0]  # [b, s, rope], shared by the heads
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    heads = []
    for i in range(h):
        qi = q[..., i * (nope + rope):(i + 1) * (nope + rope)]
        qi = torch.cat([qi[..., :nope], rotary(qi[:, None, :, nope:], attn.rotary.theta)[:, 0]], dim=-1)
        kvi = kv[..., i * (nope + vd):(i + 1) * (nope + vd)]
        ki, vi = torch.cat([kvi[..., :nope], k_rope], dim=-1), kvi[..., nope:]
        scores = (qi @ ki.transpose(1, 2)) / (nope + rope) ** 0.5
        heads.append(scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vi)
    return torch.cat(heads, dim=-1) @ attn.wo.weight.T


@pytest.mark.parametrize("cfg", [MLA, MLA_Q], ids=["mla", "mla-q"])
def test_latent_attention_matches_a_head_by_head_reference(cfg):
    attn = LatentAttention(cfg).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    x = torch.randn(2, 9, cfg.dim, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _mla_reference(attn, x), rtol=1e-10, atol=1e-10)
    assert attn.wkv_b.weight.shape == (cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
