"""Multi-token prediction: against a plain reference, its gradients, its place in the pipeline (with expert
parallelism, against one process), its metrics, and inference without it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from dualflow.train.model import ModelConfig, Stage
from dualflow.train.mtp import Objective, drop_mtp, split_logits
from dualflow.train.stage import OverlappedStage
from dualflow.train.trainer import Trainer
from tests.dist import run_workers
from tests.train.helpers import tiny, train_worker, train_worker_overlap_counts
from tests.train.test_stage import _consumers

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

CFG = ModelConfig(dim=32, n_layers=3, n_dense_layers=1, n_heads=4, dense_hidden=48, expert_hidden=16,
                  n_routed_experts=4, top_k=2, mtp_depth=2, mtp_loss_weight=0.3)
MLA = dataclasses.replace(CFG, attention="mla", q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=6,
                          qk_rope_head_dim=4, v_head_dim=6)


def _model(cfg=CFG, seed=0, dtype=torch.float32, **kw):
    m = Stage(cfg, range(cfg.n_layers), first=True, last=True, compute_dtype=dtype, **kw)
    m.init_weights(seed)
    with torch.no_grad():  # larger than the initialisation, so that every term matters in the comparisons
        for p in m.parameters():
            p.mul_(4)
    return m.to(dtype)


def _window(b=3, s=10, seed=1):
    """Token windows of s + 1: inputs are the first s, labels the last s."""
    return torch.randint(0, CFG.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(seed))


def _rms(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w


def _run_layer(layer, x):
    s = {"x": x}
    for phase in layer.phases():
        s = phase.fn(s)
    return s["x"]


def _reference(m, tokens):
    """Main and per-depth logits written out from DeepSeek-V3's equations (21)-(23), depth by depth."""
    emb, head = m.embed.weight, m.head.weight if m.head is not None else m.embed.weight
    h = emb[tokens]
    for layer in m.layers.values():
        h = _run_layer(layer, h)
    out = [_rms(h, m.norm.weight) @ head.T]
    s = tokens.shape[1]
    for k, mod in m.mtp.items():
        k = int(k)
        e = emb[tokens[:, k:]]  # Emb(t_{i+k}) for i = 0 .. s-k-1
        x = torch.cat([_rms(e, mod.enorm.weight), _rms(h[:, :s - k], mod.hnorm.weight)], -1) @ mod.eh_proj.weight.T
        h = _run_layer(mod.layer, x)
        out.append(_rms(h, mod.norm.weight) @ head.T)
    return out


@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(MLA, tie_embeddings=True, mtp_depth=3)],
                         ids=["mha-2", "mla-tied-3"])
def test_logits_and_loss_match_a_plain_reference(cfg):
    m = _model(cfg, dtype=torch.float64)
    w = _window()
    x, y = w[:, :-1], w[:, 1:]
    logits = m(x)
    parts = split_logits(logits, x.shape[1], cfg.mtp_depth)
    ref = _reference(m, x)
    assert [p.shape[1] for p in parts] == [10 - k for k in range(cfg.mtp_depth + 1)]
    for got, want in zip(parts, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the loss, position by position: depth k at position i predicts token i + k + 1 of the window
    loss, main = Objective(cfg)(logits, y)
    per_depth = []
    for k, part in enumerate(ref):
        n = part.shape[1]
        terms = [-F.log_softmax(part[b, i], -1)[w[b, i + k + 1]] for b in range(w.shape[0]) for i in range(n)]
        per_depth.append(torch.stack(terms).mean())
    torch.testing.assert_close(main, per_depth[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(loss, per_depth[0] + cfg.mtp_loss_weight * torch.stack(per_depth[1:]).mean(),
                               rtol=1e-10, atol=0)


def test_accuracy_counts_the_right_next_next_tokens():
    cfg = dataclasses.replace(CFG, mtp_depth=1)
    y = torch.tensor([[5, 6, 7, 8]])
    logits = torch.zeros(1, 4 + 3, cfg.vocab_size)
    # depth-1 positions 0..2 predict labels 1..3 (6, 7, 8): right, wrong, right
    for i, token in enumerate([6, 9, 8]):
        logits[0, 4 + i, token] = 1.0
    objective = Objective(cfg)
    with torch.no_grad():
        objective(logits, y)
        objective(logits, y)
    _, accuracies = objective.take()
    assert accuracies == pytest.approx([2 * 2 / 3])  # summed over the two calls
    assert objective.take() == ([0.0], [0.0])  # taken: nothing left
    with torch.enable_grad():
        objective(logits, y)
    assert objective.take()[1] == [0.0]  # accuracies are measured without gradients only (validation)
    with pytest.raises(ValueError, match="mtp_depth"):
        Objective(dataclasses.replace(cfg, mtp_depth=2))(logits, y)


@pytest.mark.parametrize("param", ["mtp.1.eh_proj.weight", "mtp.2.layer.attn.wkv_b.weight", "embed.weight",
                                   "mtp.1.hnorm.weight"])
def test_objective_gradient_matches_finite_difference(param):
    m = _model(MLA, dtype=torch.float64)
    w = _window(2, 7)
    p = m.get_parameter(param)
    objective = Objective(MLA)
    objective(m(w[:, :-1]), w[:, 1:])[0].backward()
    eps, direction = 1e-6, torch.randn_like(p)
    with torch.no_grad():
        p += eps * direction
        up = objective(m(w[:, :-1]), w[:, 1:])[0]
        p -= 2 * eps * direction
        down = objective(m(w[:, :-1]), w[:, 1:])[0]
    torch.testing.assert_close((up - down) / (2 * eps), (p.grad * direction).sum(), rtol=1e-5, atol=1e-9)


def test_pipeline_slices_equal_the_whole_model_bitwise():
    whole = _model(MLA)
    a = Stage(MLA, range(0, 1), first=True, last=False)
    b = Stage(MLA, range(1, 2), first=False, last=False)
    c = Stage(MLA, range(2, 3), first=False, last=True, tied_embed=a.embed)
    state = whole.state_dict()
    for s in (a, b, c):
        s.load_state_dict({k: state[k] for k in s.state_dict()})
    x = _window()[:, :-1]
    hidden, ids = a(x)
    assert torch.equal(ids, x) and ids.data_ptr() != x.data_ptr()  # the ids travel, as a copy
    assert torch.equal(whole(x), c(*b(hidden, ids)))
    with pytest.raises(ValueError, match="token ids"):
        c(hidden)
    with pytest.raises(ValueError, match="mtp_depth"):
        Stage(MLA, range(2, 3), first=False, last=True)  # no embedding for the tokens ahead


@pytest.mark.parametrize("cfg", [dataclasses.replace(CFG, mtp_depth=1), dataclasses.replace(MLA, tie_embeddings=True)],
                         ids=["untied-1", "tied-2"])
def test_no_tensor_has_more_than_two_gradient_terms(cfg):
    # as for the model without MTP (test_stage.py): what keeps a phase-by-phase backward bitwise
    whole = _model(cfg)
    first = Stage(cfg, range(0, 2), first=True, last=False)
    last = Stage(cfg, range(2, 3), first=False, last=True, tied_embed=first.embed)
    w = _window()
    objective = Objective(cfg)
    h = torch.randn(3, 10, cfg.dim, requires_grad=True)
    for logits in (whole(w[:, :-1]), last(h, w[:, :-1])):
        assert max(_consumers(objective(logits, w[:, 1:])[0].grad_fn).values()) <= 2


def _grads(*modules):
    return {n: p.grad.clone() for m in modules for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cfg", [dataclasses.replace(CFG, mtp_depth=1), dataclasses.replace(MLA, tie_embeddings=True)],
                         ids=["untied-1", "tied-2"])
def test_overlapped_step_equals_plain_autograd_bitwise(cfg):
    results = []
    for overlapped in (False, True):
        a = Stage(cfg, range(0, 2), first=True, last=False)
        b = Stage(cfg, range(2, 3), first=False, last=True, tied_embed=a.embed)
        for s in (a, b):
            s.init_weights(7)
        m0, m1 = OverlappedStage(a), OverlappedStage(b)
        g = torch.Generator().manual_seed(5)
        x0, w1 = torch.randint(0, 256, (3, 8), generator=g), torch.randint(0, 256, (3, 9), generator=g)
        h1 = torch.randn(3, 8, cfg.dim, generator=g).requires_grad_()
        objective = Objective(cfg)
        objective(m1(h1.detach().requires_grad_(), w1[:, :-1]), w1[:, 1:])[0].backward()  # .grad already there
        loss1 = objective(m1(h1, w1[:, :-1]), w1[:, 1:])[0]
        if overlapped:
            outs0, _ = OverlappedStage.overlapped_forward_backward(m0, [x0], None, [], m1, loss1, None, None)
            assert m1.interleaved == 1 and m1.fallbacks == 0
        else:
            outs0 = list(m0(x0))
            loss1.backward()
        results.append((outs0, h1.grad.clone(), _grads(m1, m0)))
    (o_a, h_a, g_a), (o_b, h_b, g_b) = results
    assert len(o_a) == len(o_b) == 2 and all(torch.equal(u, v) for u, v in zip(o_a, o_b))
    assert torch.equal(h_a, h_b)
    assert g_a.keys() == g_b.keys() and "stage.embed.weight" in g_a and "stage.mtp.1.eh_proj.weight" in g_a
    for name in g_a:
        assert torch.equal(g_a[name], g_b[name]), name


def _relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _mtp_metrics(run_dir):
    return {r["step"]: r["mtp_loss_1"] for r in _records(run_dir) if "mtp_loss_1" in r}


def test_dualpipev_with_expert_parallel_matches_one_process(tmp_path):
    # 2 pipeline ranks x 2 expert-parallel ranks, overlapped F&B: the MTP module (a MoE layer, its experts
    # spread over the expert-parallel ranks) lives on pipeline rank 0 with the embedding and the head.
    model = dict(mtp_depth=1)
    reference = Trainer(tiny(tmp_path / "one", model=model)).train().losses
    results = run_workers(train_worker_overlap_counts, 4, tiny(tmp_path / "pp", model=model,
                                                               parallel=dict(pp=2, dp=2)), timeout=240)
    assert all(interleaved > 0 and fallbacks == 0 for _, interleaved, fallbacks in results)
    # the reduction-order bound of the runs without MTP (test_pipeline.py)
    assert _relative(results[0][0], reference) < 1e-5
    assert _relative(_mtp_metrics(tmp_path / "pp"), _mtp_metrics(tmp_path / "one")) < 1e-5
    assert results[0][0] != Trainer(tiny(tmp_path / "plain")).train().losses  # MTP changes the training


def test_dualpipe_with_tied_embeddings_matches_one_process(tmp_path):
    # DualPipe: each end's last stage borrows the embedding of the stage 0 copy on its own rank
    model = dict(mtp_depth=2, tie_embeddings=True)
    reference = Trainer(tiny(tmp_path / "one", model=model)).train().losses
    results = run_workers(train_worker, 2, tiny(tmp_path / "pp", model=model,
                                                parallel=dict(pp=2, schedule="dualpipe")), timeout=240)
    assert _relative(results[0][0], reference) < 1e-5


def test_metrics_and_checkpoint_carry_the_mtp_modules(tmp_path):
    cfg = tiny(tmp_path, model=dict(mtp_depth=2), train=dict(steps=2, val_every=1))
    trainer = Trainer(cfg)
    assert set(trainer.routers) == {1, 2, 3, 4, 5}  # the MTP layers' routers take part in balancing
    trainer.train()
    records = _records(tmp_path)
    steps = [r for r in records if "loss" in r]
    for r in steps:
        assert r["mtp_loss_1"] > 0 and r["mtp_loss_2"] > 0
    for r in records:  # validation: each depth's loss and its accuracy of the token k + 1 ahead
        assert 0 <= r["val_mtp_acc_1"] <= 1 and 0 <= r["val_mtp_acc_2"] <= 1 and r["val_mtp_loss_2"] > 0
    from dualflow.train.checkpoint import read_model_state

    saved = read_model_state(trainer.last_checkpoint)
    assert any(k.startswith("mtp.2.layer.moe.experts.") for k in saved)
    assert (trainer.last_checkpoint / "model.toml").read_text().count("mtp_depth = 2") == 1


def test_modules_can_be_dropped_for_inference():
    m = _model(MLA)
    cfg, state = drop_mtp(MLA, m.state_dict())
    plain = Stage(cfg, range(cfg.n_layers), first=True, last=True)
    plain.load_state_dict(state)  # strict: nothing missing, nothing left over
    x = _window()[:, :-1]
    # one head GEMM over more rows with MTP: equal to FP32 rounding, not bitwise (the CPU GEMM's blocking
    # depends on the row count)
    torch.testing.assert_close(plain(x), split_logits(m(x), x.shape[1], MLA.mtp_depth)[0])
    assert plain.mtp is None and sum(p.numel() for p in plain.parameters()) == cfg.num_params()


def test_num_params_counts_the_mtp_modules():
    for cfg in (CFG, MLA, dataclasses.replace(MLA, tie_embeddings=True, n_dense_layers=3)):
        assert cfg.num_params() == sum(p.numel() for p in _model(cfg).parameters())


@pytest.mark.parametrize("change, match", [
    (dict(model=dict(mtp_depth=1), parallel=dict(pp=2, schedule="1f1b")), "mtp_depth needs the embedding"),
    (dict(model=dict(mtp_depth=16)), "seq_len=16"),
    (dict(model=dict(mtp_depth=-1)), "model.mtp_depth: expected int >= 0"),
    (dict(model=dict(mtp_depth=1, mtp_loss_weight=0.0)), "mtp_loss_weight"),
])
def test_invalid_settings_are_named(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        tiny(tmp_path, **change)
