"""FP8 training (DeepSeek-V3 recipe through dualflow.fp8) against BF16 training of the same model and data."""

from __future__ import annotations

import pytest

from dualflow.train.trainer import Trainer
from tests.train.helpers import tiny


def _run(tmp_path, fp8: bool):
    # 4,096 tokens per micro-batch: the loss is a mean over them, so the gradients are small (~1e-5 per
    # element and below), as in real runs; with 256 tokens an amax floor of 1e-4 in the quantizers went
    # unnoticed, with 4,096 it cost 2% of validation loss (measured: BF16 2.5275, FP8 2.5155, FP8 with the
    # old floor 2.5770)
    cfg = tiny(tmp_path / f"fp8-{fp8}", model=dict(dim=64, n_layers=2, dense_hidden=128, expert_hidden=64),
               parallel=dict(microbatches=1), data=dict(seq_len=64, max_bytes=2_000_000),
               optim=dict(lr=2e-3, min_lr=2e-4, warmup_steps=20),
               train=dict(steps=120, global_batch=64, dtype="bfloat16", fp8=fp8, val_every=120, val_batches=4,
                          log_every=60), checkpoint=dict(enabled=False))
    trainer = Trainer(cfg)
    return trainer, trainer.train()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_fp8_final_loss_at_most_one_percent_above_bf16_with_small_gradients(tmp_path):
    _, bf16 = _run(tmp_path, fp8=False)
    trainer, fp8 = _run(tmp_path, fp8=True)
    # attention, the dense and shared MLPs (not the head), and the routed experts of the one MoE layer
    assert "8 linear layers converted, the routed experts of 1 MoE layer(s)" in trainer.fp8_report
    assert trainer.stages[0].layers["1"].moe.experts.fp8_recipe is not None
    assert type(trainer.stages[0].head).__name__ == "Linear"
    base, got = bf16.val_losses[120], fp8.val_losses[120]
    assert base < 0.5 * bf16.val_losses[0]  # both learned
    rel = (got - base) / base
    print(f"\nFP8 vs BF16 after 120 steps: validation loss {got:.4f} vs {base:.4f}, relative difference {rel:.4%}")
    # One-sided: FP8 ending lower is the same two trajectories parting by chance (seen: -0.5% and +0.6% in
    # two runs with different thread settings); the broken floor ended 2.0% higher.
    assert rel < 0.01
