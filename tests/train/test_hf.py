"""transformers interoperability (dualflow.train.hf, hf_io): exact round trips, logits against transformers'
DeepseekV3ForCausalLM, a checkpoint of a 2 x 2 (pipeline x expert) run exported and loaded by transformers,
and training initialised from a transformers directory.

transformers is imported by the tests that compare against it (a few seconds, once); they skip with the
reason where it is missing (``make test`` installs it through the ``hf`` extra)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dualflow.launcher.config import save_config
from dualflow.train.checkpoint import read_model_state
from dualflow.train.hf import from_hf, to_hf
from dualflow.train.model import ModelConfig, Stage
from dualflow.train.mtp import split_logits
from tests.dist import run_workers
from tests.train.helpers import tiny, train_worker

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _needs(module: str):
    return pytest.importorskip(module, reason=f"needs {module}: pip install 'dualflow[hf]' (make test installs it)")


MLA = ModelConfig(vocab_size=320, dim=32, n_layers=3, n_dense_layers=1, n_heads=4, dense_hidden=48, expert_hidden=16,
                  n_routed_experts=8, top_k=3, routed_scale=2.5, attention="mla", q_lora_rank=0, kv_lora_rank=24,
                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
CASES = {
    # no query latent, all experts in one group
    "mla": MLA,
    # query latent, 4 groups of 2 experts (2 kept), multi-token prediction exported as layer 3
    "q-latent-groups-mtp": dataclasses.replace(MLA, q_lora_rank=16, n_group=4, topk_group=2, mtp_depth=1),
    # tied head, two dense layers, two shared experts, 2 groups (1 kept), wider rotary part
    "tied-dense-shared": dataclasses.replace(MLA, tie_embeddings=True, n_dense_layers=2, n_shared_experts=2,
                                             n_group=2, topk_group=1, top_k=2, qk_rope_head_dim=6),
}


def _model(cfg: ModelConfig, seed: int = 0) -> Stage:
    m = Stage(cfg, range(cfg.n_layers), first=True, last=True)
    m.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():  # larger than the initialisation, so that every term shows in the logits
            p.mul_(4)
        for router in m.moe_routers().values():  # a non-zero balancing bias of both signs
            router.bias.copy_((torch.rand(router.bias.shape, generator=g) - 0.5) * 0.6)
    return m


def _stacked(hf: dict) -> dict:
    """transformers' own in-memory layout of the experts (what its save_pretrained may write)."""
    out, layers = {}, {}
    for k, v in hf.items():
        if ".mlp.experts." in k:
            layer, rest = k.split(".mlp.experts.")
            e, name = rest.split(".", 1)
            layers.setdefault(layer, {}).setdefault(int(e), {})[name] = v
        else:
            out[k] = v
    for layer, experts in layers.items():
        ids = sorted(experts)
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj.weight"], experts[e]["up_proj.weight"]]) for e in ids])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([experts[e]["down_proj.weight"] for e in ids])
    return out


@pytest.mark.parametrize("interleave", [True, False], ids=["pairs", "halves"])
@pytest.mark.parametrize("name", list(CASES))
def test_from_hf_inverts_to_hf_exactly(name, interleave):
    cfg = dataclasses.replace(CASES[name], bias_update_speed=0.02, mtp_loss_weight=0.1)
    state = _model(cfg).state_dict()
    config, hf = to_hf(cfg, state, rope_interleave=interleave)
    assert config["rope_interleave"] is interleave and config["q_lora_rank"] == (cfg.q_lora_rank or None)
    for weights in (hf, _stacked(hf)):
        back_cfg, back = from_hf(json.loads(json.dumps(config)), weights)
        assert back_cfg == cfg
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    if cfg.mtp_depth:  # DeepSeek's checkpoint layout: the module is layer num_hidden_layers, with copies
        assert torch.equal(hf["model.layers.3.embed_tokens.weight"], state["embed.weight"])
        assert torch.equal(hf["model.layers.3.shared_head.head.weight"], state["head.weight"])
        assert "model.layers.3.eh_proj.weight" in hf and "model.layers.3.mlp.experts.7.up_proj.weight" in hf
    rotary = hf["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"][-cfg.qk_rope_head_dim:]
    ours = state["layers.0.attn.wkv_a.weight"][-cfg.qk_rope_head_dim:]
    assert torch.equal(rotary, ours) is interleave  # halves: the rotary rows are reordered


def test_what_cannot_be_mapped_is_named():
    with pytest.raises(ValueError, match="latent attention only"):
        to_hf(ModelConfig(), {})
    with pytest.raises(ValueError, match=r"'layers\.0\.attn\.wkv_b\.weight' is missing"):
        state = _model(MLA).state_dict()
        del state["layers.0.attn.wkv_b.weight"]
        to_hf(MLA, state)
    config, hf = to_hf(MLA, _model(MLA).state_dict())
    bad = dict(config, hidden_act="gelu", norm_topk_prob=False, rope_scaling={"type": "yarn", "factor": 40})
    with pytest.raises(ValueError, match=r"hidden_act='gelu'.*norm_topk_prob=False.*'yarn'"):
        from_hf(bad, hf)
    with pytest.raises(ValueError, match=r"missing.*q_proj"):
        from_hf(config, {k: v for k, v in hf.items() if "layers.1.self_attn.q_proj" not in k})
    with pytest.raises(ValueError, match="quantized"):
        from_hf(dict(config, quantization_config={"quant_method": "fp8"}), hf)


def _bound(logits: torch.Tensor) -> float:
    # The same arithmetic in another order (fused projections, grouped experts, SDPA): FP32 rounding, some
    # ulps of the largest logit here (7-14 measured), bounded at 64. A wrong layout is off by O(1).
    return 64 * torch.finfo(torch.float32).eps * float(logits.abs().max())


@pytest.mark.parametrize("interleave", [True, False], ids=["pairs", "halves"])
@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_transformers(tmp_path, name, interleave):
    transformers = _needs("transformers")
    from dualflow.train.hf_io import save_hf

    cfg = CASES[name]
    m = _model(cfg)
    config, hf = to_hf(cfg, m.state_dict(), rope_interleave=interleave)
    save_hf(tmp_path, config, hf)
    theirs_model = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, cfg.vocab_size, (3, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = split_logits(m(x), 17, cfg.mtp_depth)[0]
        theirs = theirs_model(x).logits
    assert (ours - theirs).abs().max() <= _bound(theirs)
    # the check sees the layout: the same weights read with the other rotary convention disagree
    flipped = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(flipped, rope_interleave=not interleave)))
    with torch.no_grad():
        wrong = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()(x).logits
    assert (ours - wrong).abs().max() > 100 * _bound(theirs)


def test_export_of_a_pipeline_and_expert_parallel_checkpoint(tmp_path):
    transformers = _needs("transformers")
    from dualflow.cli import main

    model = dict(attention="mla", q_lora_rank=16, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4,
                 v_head_dim=8, n_group=2, topk_group=1, mtp_depth=1)
    cfg = tiny(tmp_path / "run", model=model, parallel=dict(pp=2, dp=2), train=dict(steps=3))
    run_workers(train_worker, 4, cfg, timeout=240)
    root = tmp_path / "run" / "checkpoints"
    out = tmp_path / "hf"
    assert main(["export-hf", str(root), str(out), "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    # our model in one process from the same checkpoint (every pipeline stage and expert shard assembled)
    step = max(root.glob("step-*"))
    state = read_model_state(step)
    assert any(state[f"layers.{i}.moe.gate.bias"].abs().sum() > 0 for i in (1, 2, 3))  # trained biases
    ours = Stage(cfg.model, range(cfg.model.n_layers), first=True, last=True)
    ours.load_state_dict(state)
    theirs, info = transformers.DeepseekV3ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert info["unexpected_keys"] and all(k.startswith("model.layers.4.") for k in info["unexpected_keys"])
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = split_logits(ours(x), 16, 1)[0]
        b = theirs.eval()(x).logits
    assert (a - b).abs().max() <= _bound(b)
    assert main(["export-hf", str(tmp_path / "nothing"), str(out)]) == 2


def test_training_starts_from_a_transformers_directory(tmp_path, capsys):
    _needs("safetensors")
    from dualflow.cli import main
    from dualflow.train.hf_io import load_for_training, save_hf
    from dualflow.train.trainer import Trainer

    model = dict(attention="mla", kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, mtp_depth=1)
    cfg = tiny(tmp_path / "run", model=model, train=dict(steps=1))
    source = dataclasses.replace(cfg.model, mtp_depth=0, top_k=1)  # same widths, no MTP weights
    weights = _model(source, seed=9).state_dict()
    save_hf(tmp_path / "hf", *to_hf(source, weights))
    trainer = Trainer(cfg)
    state, notes = load_for_training(tmp_path / "hf", cfg.model)
    trainer.load_model_state(state, "hf", optional=("mtp.",))
    loaded = {k: v for s in trainer.stages for k, v in s.state_dict().items()}
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert any("top_k: 1 in the checkpoint, 2 used" in n for n in notes)
    assert any("start from their initialisation" in n for n in notes)
    # the command: starts from it and trains; another width is refused with each difference named
    toml = tmp_path / "run.toml"
    save_config(cfg, toml)
    assert main(["train", str(toml), "--init-from-hf", str(tmp_path / "hf"), "--fresh"]) == 0
    assert f"initialised from {tmp_path / 'hf'}" in capsys.readouterr().out
    save_config(tiny(tmp_path / "run2", model=dict(model, dim=48, n_layers=3)), toml)
    assert main(["train", str(toml), "--init-from-hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "model.dim: 32 there, 48 here" in err and "model.n_layers: 4 there, 3 here" in err


def test_bfloat16_export_keeps_the_router_in_fp32(tmp_path):
    _needs("safetensors")
    from dualflow.train.hf_io import load_hf, save_hf

    cfg = CASES["q-latent-groups-mtp"]
    state = _model(cfg).state_dict()
    save_hf(tmp_path, *to_hf(cfg, state), dtype=torch.bfloat16, max_shard_bytes=10**9)
    config, weights = load_hf(tmp_path)
    assert config["torch_dtype"] == "bfloat16" and len(list(tmp_path.glob("*.safetensors"))) == 1
    router = [k for k in weights if k.endswith((".mlp.gate.weight", ".e_score_correction_bias"))]
    assert len(router) == 2 * 3  # layers 1, 2 and the MTP layer 3
    assert all(weights[k].dtype == torch.float32 for k in router)
    assert all(v.dtype == torch.bfloat16 for k, v in weights.items() if k not in router)
    back_cfg, back = from_hf(config, weights)
    assert back_cfg == cfg
    assert torch.equal(back["layers.1.moe.gate.bias"], state["layers.1.moe.gate.bias"])
    assert torch.equal(back["layers.1.attn.wkv_b.weight"], state["layers.1.attn.wkv_b.weight"].bfloat16())
