"""The model as transformers' ``DeepseekV3ForCausalLM``: its configuration and weights, both ways.

:func:`to_hf` turns a :class:`~dualflow.train.model.ModelConfig` and the whole model's ``state_dict()``
(global names: ``layers.{l}...``, ``layers.{l}.moe.experts.{e}...``, ``mtp.{k}...``) into
``DeepseekV3Config`` keyword arguments and the weights under the names of DeepSeek's own checkpoints,
which transformers, vLLM and SGLang read; :func:`from_hf` is its exact inverse and also reads
transformers' stacked experts (``mlp.experts.gate_up_proj``). Nothing here imports transformers.

What maps to what, and why the logits agree:

- ``embed``/``norm``/``head`` -> ``model.embed_tokens``/``model.norm``/``lm_head`` (a tied head: no
  ``lm_head`` and ``tie_word_embeddings``); ``attn_norm``/``mlp_norm`` -> ``input_layernorm``/
  ``post_attention_layernorm``; the latent attention's ``wq``/``wq_a``/``q_norm``/``wq_b``/``wkv_a``/
  ``kv_norm``/``wkv_b``/``wo`` -> ``q_proj``/``q_a_proj``/``q_a_layernorm``/``q_b_proj``/
  ``kv_a_proj_with_mqa``/``kv_a_layernorm``/``kv_b_proj``/``o_proj`` with the same row layouts.
- Rotary: our rotary dimensions are adjacent pairs (2j, 2j+1) at frequency theta^(-2j/r); transformers'
  ``rope_interleave=True`` (DeepSeek's layout) rotates the same pairs at the same frequencies, so the
  weights are copied as they are. ``rope_interleave=False`` rotates halves (j, j + r/2): the rotary rows of
  ``q_proj``/``q_b_proj`` and ``kv_a_proj_with_mqa`` are permuted (evens first) on the way out and back.
- Scores are scaled by 1/sqrt(qk_nope_head_dim + qk_rope_head_dim) on both sides (no YaRN).
- A fused SwiGLU ``w13`` [2H, D] is ``gate_proj`` (first H rows) over ``up_proj``; ``w2`` is ``down_proj``;
  the router's ``weight``/``bias`` are ``mlp.gate.weight``/``mlp.gate.e_score_correction_bias``
  (``norm_topk_prob`` true, ``routed_scale`` = ``routed_scaling_factor``, groups = ``n_group``/``topk_group``).
- Multi-token prediction module k is layer ``num_hidden_layers + k - 1`` as in DeepSeek-V3's checkpoint:
  the decoder layer's names plus ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` and copies of
  the embedding and head (``embed_tokens``, ``shared_head.head``); transformers ignores that layer.
- Settings transformers has no field for (the balancing bias's speed, the MTP loss weight) travel under
  ``dualflow_training``, which transformers keeps in config.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from dualflow.train.model import ModelConfig, Stage

ARCHITECTURE = "DeepseekV3ForCausalLM"
# transformers builds the latent norms with its RMSNorm's default eps, whatever rms_norm_eps says
_LATENT_NORM_EPS = 1e-6
# ModelConfig fields a DeepseekV3Config does not describe (kept under "dualflow_training")
_TRAINING_FIELDS = ("bias_update_speed", "mtp_loss_weight")


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One of our tensors and its transformers name(s): two names split a fused SwiGLU ``w13`` into gate
    and up; ``rope`` = (rows per block, rotary rows at the end of each block) marks rotary rows."""

    ours: str
    hf: tuple[str, ...]
    rope: tuple[int, int] | None = None


def _one(ours: str, hf: str, rope: tuple[int, int] | None = None) -> _Entry:
    return _Entry(ours, (hf,), rope)


def _swiglu(ours: str, hf: str) -> list[_Entry]:
    return [_Entry(f"{ours}.w13.weight", (f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight")),
            _one(f"{ours}.w2.weight", f"{hf}.down_proj.weight")]


def _expert(ours_layer: str, hf_layer: str, e: int) -> list[_Entry]:
    """Routed expert ``e`` (global id) of a layer: the one place that names experts on either side."""
    return _swiglu(f"{ours_layer}.moe.experts.{e}", f"{hf_layer}.mlp.experts.{e}")


def _unstack_experts(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' stacked experts (``mlp.experts.gate_up_proj`` [E, 2I, D], ``down_proj`` [E, D, I]) as
    the per-expert names of DeepSeek's checkpoints; other entries unchanged."""
    out: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            for e, w in enumerate(t):
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = w.chunk(2)
        elif name.endswith(".mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e, w in enumerate(t):
                out[f"{base}{e}.down_proj.weight"] = w
        else:
            out[name] = t
    return out


def _layer(cfg: ModelConfig, layer: int, ours: str, hf: str) -> list[_Entry]:
    a, s = f"{ours}.attn", f"{hf}.self_attn"
    qk, rope = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim
    out = [_one(f"{ours}.attn_norm.weight", f"{hf}.input_layernorm.weight"),
           _one(f"{ours}.mlp_norm.weight", f"{hf}.post_attention_layernorm.weight")]
    if cfg.q_lora_rank:
        out += [_one(f"{a}.wq_a.weight", f"{s}.q_a_proj.weight"),
                _one(f"{a}.q_norm.weight", f"{s}.q_a_layernorm.weight"),
                _one(f"{a}.wq_b.weight", f"{s}.q_b_proj.weight", (qk, rope))]
    else:
        out.append(_one(f"{a}.wq.weight", f"{s}.q_proj.weight", (qk, rope)))
    out += [_one(f"{a}.wkv_a.weight", f"{s}.kv_a_proj_with_mqa.weight", (cfg.kv_lora_rank + rope, rope)),
            _one(f"{a}.kv_norm.weight", f"{s}.kv_a_layernorm.weight"),
            _one(f"{a}.wkv_b.weight", f"{s}.kv_b_proj.weight"), _one(f"{a}.wo.weight", f"{s}.o_proj.weight")]
    if not cfg.is_moe(layer):
        return out + _swiglu(f"{ours}.mlp", f"{hf}.mlp")
    out += [_one(f"{ours}.moe.gate.weight", f"{hf}.mlp.gate.weight"),
            _one(f"{ours}.moe.gate.bias", f"{hf}.mlp.gate.e_score_correction_bias")]
    if cfg.n_shared_experts:
        out += _swiglu(f"{ours}.moe.shared", f"{hf}.mlp.shared_experts")
    return out + [x for e in range(cfg.n_routed_experts) for x in _expert(ours, hf, e)]


def _plan(cfg: ModelConfig) -> list[_Entry]:
    """Every tensor of the whole model and where it goes (the table both directions read)."""
    out = [_one("embed.weight", "model.embed_tokens.weight"), _one("norm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        out.append(_one("head.weight", "lm_head.weight"))
    for layer in range(cfg.n_layers):
        out += _layer(cfg, layer, f"layers.{layer}", f"model.layers.{layer}")
    for k in range(1, cfg.mtp_depth + 1):
        ours, hf = f"mtp.{k}", _mtp_layer(cfg, k)
        out += _layer(cfg, cfg.n_layers + k - 1, f"{ours}.layer", hf)
        out += [_one(f"{ours}.{n}.weight", f"{hf}.{n}.weight") for n in ("enorm", "hnorm", "eh_proj")]
        out.append(_one(f"{ours}.norm.weight", f"{hf}.shared_head.norm.weight"))
    return out


def _mtp_layer(cfg: ModelConfig, k: int) -> str:
    return f"model.layers.{cfg.n_layers + k - 1}"


def _rope_rows(w: torch.Tensor, block: int, rope: int, to_halves: bool) -> torch.Tensor:
    """Rows of ``w`` in blocks of ``block`` whose last ``rope`` rows are rotary: adjacent pairs -> halves
    (``to_halves``) or back."""
    perm = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
    idx = torch.arange(block)
    idx[block - rope:] = block - rope + (perm if to_halves else torch.argsort(perm))
    return w.unflatten(0, (-1, block))[:, idx].flatten(0, 1)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the whole model's ``state_dict()`` (built on the meta device)."""
    with torch.device("meta"):
        model = Stage(cfg, range(cfg.n_layers), first=True, last=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_state(state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    problems = [f"{k!r} is missing" for k in shapes if k not in state]
    problems += [f"{k!r} is not part of this model" for k in state if k not in shapes]
    problems += [f"{k!r} has shape {tuple(state[k].shape)}, expected {v}" for k, v in shapes.items()
                 if k in state and tuple(state[k].shape) != v]
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ValueError(f"{what} does not match the model config: " + "; ".join(problems[:10]) + more)


def to_hf(cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor], *, rope_interleave: bool = True,
          max_position_embeddings: int = 4096) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(DeepseekV3Config keyword arguments, DeepseekV3ForCausalLM weights)`` of the whole model.

    ``state_dict``: every tensor of the model under its global name (one process's whole-model stage, or
    a checkpoint's ``model.*`` entries with the prefix removed). Tensors are not copied where a name maps
    one to one.
    """
    problems = []
    if cfg.attention != "mla":
        problems.append(f"attention={cfg.attention!r}: DeepseekV3ForCausalLM has latent attention only "
                        "(train with model.attention = 'mla' to export)")
    if cfg.norm_eps != _LATENT_NORM_EPS:
        problems.append(f"norm_eps={cfg.norm_eps}: transformers normalises the attention latents with eps "
                        f"{_LATENT_NORM_EPS} whatever rms_norm_eps says; only norm_eps = {_LATENT_NORM_EPS} exports "
                        "the same model")
    if cfg.group_by != "experts":
        problems.append(f"group_by={cfg.group_by!r}: resolve it to n_group first (ModelConfig.resolve_groups)")
    if problems:
        raise ValueError("cannot export to DeepseekV3ForCausalLM: " + "; ".join(problems))
    _check_state(state_dict, expected_shapes(cfg), "the model state")
    out: dict[str, torch.Tensor] = {}
    for entry in _plan(cfg):
        t = state_dict[entry.ours]
        if entry.rope and not rope_interleave:
            t = _rope_rows(t, *entry.rope, to_halves=True)
        if len(entry.hf) == 2:
            out[entry.hf[0]], out[entry.hf[1]] = t.chunk(2)
        else:
            out[entry.hf[0]] = t
    head = state_dict["embed.weight" if cfg.tie_embeddings else "head.weight"]
    for k in range(1, cfg.mtp_depth + 1):  # DeepSeek's checkpoints keep the shared tensors in the MTP layer too
        out[f"{_mtp_layer(cfg, k)}.embed_tokens.weight"] = state_dict["embed.weight"]
        out[f"{_mtp_layer(cfg, k)}.shared_head.head.weight"] = head
    return _hf_config(cfg, rope_interleave, max_position_embeddings), out


def _hf_config(cfg: ModelConfig, rope_interleave: bool, max_position_embeddings: int) -> dict[str, Any]:
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.dense_hidden,
        moe_intermediate_size=cfg.expert_hidden, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, n_shared_experts=cfg.n_shared_experts,
        n_routed_experts=cfg.n_routed_experts, routed_scaling_factor=cfg.routed_scale,
        kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank or None, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim, n_group=cfg.n_group,
        topk_group=cfg.topk_group, num_experts_per_tok=cfg.top_k, first_k_dense_replace=cfg.n_dense_layers,
        norm_topk_prob=True, hidden_act="silu", max_position_embeddings=max_position_embeddings,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_theta, rope_interleave=rope_interleave, attention_bias=False,
        num_nextn_predict_layers=cfg.mtp_depth,
        dualflow_training={name: getattr(cfg, name) for name in _TRAINING_FIELDS},
    )


def _rope_theta(config: Mapping[str, Any], problems: list[str]) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type", "default")) not in ("default", None):
        problems.append(f"rope type {params.get('rope_type', params.get('type'))!r} (context extension) is not "
                        "supported; only plain rotary positions are")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta)


def hf_model_config(config: Mapping[str, Any], names: Iterable[str] = ()) -> ModelConfig:
    """The ModelConfig a DeepseekV3 config (config.json's content or keyword arguments) describes.

    ``names``: the weights' names; multi-token prediction modules count only where their layer is there
    (transformers writes ``num_nextn_predict_layers`` without the weights). Every unsupported setting is
    reported at once.
    """
    c, problems = dict(config), []
    if c.get("model_type", "deepseek_v3") != "deepseek_v3":
        problems.append(f"model_type {c['model_type']!r}: only deepseek_v3 checkpoints are read")
    checks = [("hidden_act", "silu"), ("norm_topk_prob", True), ("attention_bias", False),
              ("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)]
    problems += [f"{k}={c[k]!r} is not supported (expected {v!r})" for k, v in checks if c.get(k, v) != v]
    if c.get("quantization_config"):
        problems.append("the weights are quantized (quantization_config): convert them to BF16 or FP32 first")
    heads = c.get("num_attention_heads", 128)
    if c.get("num_key_value_heads") not in (None, heads):
        problems.append(f"num_key_value_heads={c['num_key_value_heads']} differs from num_attention_heads={heads}")
    if c.get("rms_norm_eps", _LATENT_NORM_EPS) != _LATENT_NORM_EPS:
        problems.append(f"rms_norm_eps={c['rms_norm_eps']}: transformers uses {_LATENT_NORM_EPS} for the attention "
                        "latents, this model one eps everywhere")
    theta = _rope_theta(c, problems)
    n_layers = c.get("num_hidden_layers", 61)
    depth = c.get("num_nextn_predict_layers", c.get("num_mtp_layers", 0)) or 0
    names = set(names)
    if names and f"model.layers.{n_layers}.eh_proj.weight" not in names:
        depth = 0
    if c.get("first_k_dense_replace", 3) > n_layers:
        problems.append(f"first_k_dense_replace={c['first_k_dense_replace']} exceeds num_hidden_layers={n_layers}")
    if problems:
        raise ValueError("unsupported DeepseekV3 configuration: " + "; ".join(problems))
    training = c.get("dualflow_training") or {}
    return ModelConfig(
        vocab_size=c.get("vocab_size", 129280), dim=c.get("hidden_size", 7168), n_layers=n_layers,
        n_dense_layers=c.get("first_k_dense_replace", 3), n_heads=heads, dense_hidden=c.get("intermediate_size", 18432),
        expert_hidden=c.get("moe_intermediate_size", 2048), n_routed_experts=c.get("n_routed_experts", 256),
        n_shared_experts=c.get("n_shared_experts", 1), top_k=c.get("num_experts_per_tok", 8),
        routed_scale=float(c.get("routed_scaling_factor", 2.5)), rope_theta=theta,
        norm_eps=float(c.get("rms_norm_eps", _LATENT_NORM_EPS)), tie_embeddings=bool(c.get("tie_word_embeddings")),
        init_std=float(c.get("initializer_range", 0.02)), attention="mla", q_lora_rank=c.get("q_lora_rank", 1536) or 0,
        kv_lora_rank=c.get("kv_lora_rank", 512), qk_nope_head_dim=c.get("qk_nope_head_dim", 128),
        qk_rope_head_dim=c.get("qk_rope_head_dim", 64), v_head_dim=c.get("v_head_dim", 128),
        n_group=c.get("n_group", 8) or 1, topk_group=c.get("topk_group", 4) or 1, mtp_depth=depth,
        **{k: training[k] for k in _TRAINING_FIELDS if k in training},
    )


def from_hf(config: Mapping[str, Any], hf_state_dict: Mapping[str, torch.Tensor]
            ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``(ModelConfig, whole-model state_dict)`` from a DeepseekV3 config and its weights; inverse of :func:`to_hf`.

    Reads DeepSeek's per-expert names and transformers' stacked experts; ignores the copies of the
    embedding and head kept in multi-token prediction layers, layers beyond the model and rotary caches.
    """
    hf = _unstack_experts(hf_state_dict)
    cfg = hf_model_config(config, hf)
    interleaved = config.get("rope_interleave", True)
    plan = _plan(cfg)
    wanted = {name for entry in plan for name in entry.hf}
    extra = [k for k in hf if k not in wanted and not _ignorable(k, cfg)]
    missing = sorted(wanted - hf.keys())
    if missing or extra:
        raise ValueError(f"the weights do not match their config: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}; not part of the model {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''}")
    out = {}
    for entry in plan:
        t = torch.cat([hf[n] for n in entry.hf]) if len(entry.hf) == 2 else hf[entry.hf[0]]
        out[entry.ours] = t if (interleaved or not entry.rope) else _rope_rows(t, *entry.rope, to_halves=False)
    _check_state(out, expected_shapes(cfg), "the weights")
    return cfg, out


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    """A stored name that carries nothing of its own: copies of shared tensors, caches, unread MTP layers."""
    if name.endswith(("rotary_emb.inv_freq", ".embed_tokens.weight", ".shared_head.head.weight")):
        return name != "model.embed_tokens.weight"
    if cfg.tie_embeddings and name == "lm_head.weight":
        return True
    parts = name.split(".")
    return len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= cfg.n_layers + cfg.mtp_depth


def width_mismatches(theirs: ModelConfig, ours: ModelConfig) -> list[str]:
    """The shape-setting fields on which two configs differ, as ``field: A there, B here``."""
    fields = ("vocab_size", "dim", "n_layers", "n_dense_layers", "n_heads", "dense_hidden", "expert_hidden",
              "n_routed_experts", "n_shared_experts", "attention", "q_lora_rank", "kv_lora_rank",
              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "tie_embeddings")
    return [f"model.{f}: {getattr(theirs, f)} there, {getattr(ours, f)} here" for f in fields
            if getattr(theirs, f) != getattr(ours, f)]
