"""The peer of train_throughput.py: transformers' ``DeepseekV3ForCausalLM`` trained at a config's widths.

    python benchmarks/hf_peer.py CONFIG [--experts eager|grouped_mm|batched_mm] [--steps 20] [--warmup 5]
                                        [--override section.key=value ...] [--json-out PATH]

Same widths as dualflow's model of CONFIG (MLA, shared + routed experts, sigmoid top-k routing with the
balancing bias, first ``n_dense_layers`` dense), same batch, sequence length, micro-batches and data;
BF16 autocast over FP32 master weights and torch's fused AdamW, one process on one GPU. Prints one JSON
line (tokens/s median after the warm-up, step ms, peak MB, final loss) and writes it to ``--json-out``.
transformers is needed only here: it is an optional benchmark dependency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if (Path(__file__).resolve().parents[1] / "dualflow").is_dir():  # a checkout (installed: dualflow/benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualflow.launcher.config import load_config
from dualflow.train.config import TrainConfig
from dualflow.train.data import BatchLoader, load_streams


def hf_config(cfg: TrainConfig, experts: str):
    from transformers import DeepseekV3Config

    m = cfg.model
    if m.attention != "mla":
        raise SystemExit("hf_peer: DeepseekV3ForCausalLM has latent attention only; the config has "
                         f"model.attention={m.attention!r}")
    return DeepseekV3Config(
        vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.dense_hidden,
        moe_intermediate_size=m.expert_hidden, num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_heads, n_shared_experts=m.n_shared_experts, n_routed_experts=m.n_routed_experts,
        routed_scaling_factor=m.routed_scale, kv_lora_rank=m.kv_lora_rank, q_lora_rank=m.q_lora_rank or None,
        qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, qk_nope_head_dim=m.qk_nope_head_dim,
        n_group=1, topk_group=1, num_experts_per_tok=m.top_k, first_k_dense_replace=m.n_dense_layers,
        norm_topk_prob=True, max_position_embeddings=cfg.data.seq_len, rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings, use_cache=False, attn_implementation="sdpa",
        experts_implementation=experts, rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--experts", default="eager", help="transformers' experts implementation")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("hf_peer: needs a CUDA GPU")
    from transformers import DeepseekV3ForCausalLM

    cfg = load_config(TrainConfig, args.config, [o.removeprefix("--") for o in args.override])
    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV3ForCausalLM(hf_config(cfg, args.experts)).float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay, fused=True)
    streams = load_streams(cfg.data)
    loader = BatchLoader(streams.train, cfg.data.seq_len, cfg.train.global_batch, seed=cfg.data.seed,
                         vocab_size=cfg.model.vocab_size)
    chunks = cfg.parallel.microbatches
    times, loss_value = [], float("nan")
    for step in range(args.steps):
        x, y = loader.next()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        total = torch.zeros((), device=device)
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks)):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=xc).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), yc.flatten())
            (loss / chunks).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(total) / chunks
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        print(f"hf_peer[{args.experts}] step {step + 1}/{args.steps}: {times[-1] * 1e3:.0f} ms, loss {loss_value:.4f}",
              file=sys.stderr, flush=True)
    timed = times[args.warmup:] or times
    tokens = cfg.train.global_batch * cfg.data.seq_len
    record = {"experts": args.experts, "steps": len(timed), "tokens_per_s": tokens / statistics.median(timed),
              "step_ms": 1e3 * statistics.median(timed), "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
              "final_loss": loss_value}
    print(json.dumps(record))
    if args.json_out:
        args.json_out.write_text(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
