"""FP8 training (DeepSeek-V3 recipe through dualflow.fp8) against BF16 training of the same model and data."""

from __future__ import annotations

import pytest

from dualflow.train.trainer import Trainer
from tests.fp8.helpers import assert_bitwise
from tests.train.helpers import tiny


def _run(tmp_path, fp8: bool, seed: int = 0):
    cfg = tiny(tmp_path / f"fp8-{fp8}-{seed}", model=dict(dim=64, n_layers=2, dense_hidden=128, expert_hidden=64),
               parallel=dict(microbatches=1), data=dict(seq_len=32),
               optim=dict(lr=2e-3, min_lr=2e-4, warmup_steps=20),
               train=dict(steps=200, global_batch=8, dtype="bfloat16", fp8=fp8, val_every=200, val_batches=8,
                          log_every=50, seed=seed))
    trainer = Trainer(cfg)
    return trainer, trainer.train()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_fp8_final_loss_within_one_percent_of_bf16(tmp_path):
    gaps = []
    for seed in range(4):
        _, bf16 = _run(tmp_path, fp8=False, seed=seed)
        trainer, fp8 = _run(tmp_path, fp8=True, seed=seed)
        if seed == 0:
            # attention, the dense and shared MLPs (not the head), and the routed experts of the one MoE layer
            assert "8 linear layers converted, the routed experts of 1 MoE layer(s)" in trainer.fp8_report
            assert trainer.stages[0].layers["1"].moe.experts.fp8_recipe is not None
            assert type(trainer.stages[0].head).__name__ == "Linear"
        base, got = bf16.val_losses[200], fp8.val_losses[200]
        assert base < 0.5 * bf16.val_losses[0]  # both learned
        gaps.append((got - base) / base)
    # 256 tokens per micro-batch: a training-level check of the whole recipe. One seed's FP8 and BF16
    # trajectories part by chance: the gap of a single seed moved between -1.3% and +1.8% with the seed and
    # with the CPU's kernels (AVX2 or AVX-512), so the check is on the mean over 4 seeds (within -0.6% and
    # +0.4% on both kernel sets), one-sided: FP8 must not train worse; a better FP8 loss is chance, not a
    # fault. The small-gradient regime of real runs (thousands of tokens per micro-batch) is checked at the
    # quantizer, deterministically (tests/fp8/test_quant.py::test_gradient_sized_tiles_keep_e4m3_precision).
    mean = sum(gaps) / len(gaps)
    print(f"\nFP8 vs BF16 after 200 steps, validation loss relative difference per seed "
          f"{', '.join(f'{g:+.2%}' for g in gaps)}; mean {mean:+.2%}")
    assert mean < 0.01


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_an_fp8_backend_this_device_cannot_run_is_refused_at_the_start(tmp_path):
    cfg = tiny(tmp_path / "cutlass", train=dict(steps=1, fp8=True, fp8_backend="cutlass,torch"))
    with pytest.raises(ValueError, match=r"train.fp8_backend='cutlass,torch': no FP8 GEMM backend of 'cutlass,torch' "
                                         r"can run the dense GEMM on cpu: cutlass: the CUTLASS GEMMs need CUDA"):
        Trainer(cfg)
    cfg = tiny(tmp_path / "wgrad", train=dict(steps=1, fp8=True, fp8_wgrad_backend="cutlass"))
    with pytest.raises(ValueError, match=r"train.fp8_wgrad_backend='cutlass': wgrad_backend='cutlass' cannot run on "
                                         r"cpu: the CUTLASS GEMMs need CUDA"):
        Trainer(cfg)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_compiled_fp8_training_keeps_its_weight_snapshots_fresh(tmp_path):
    from dualflow.fp8 import Fp8Linear
    from dualflow.fp8.nn import quantize_weight

    off = Trainer(tiny(tmp_path / "off", train=dict(steps=1, fp8=True, compile="on")))
    assert not off.fp8_snapshots  # opt-in (train.fp8_weight_snapshots): off by default, they lift the peak above BF16's
    cfg = tiny(tmp_path / "run", train=dict(steps=2, val_every=2, fp8=True, compile="on", fp8_weight_snapshots=True),
               parallel=dict(microbatches=2))
    trainer = Trainer(cfg)
    assert trainer.fp8_snapshots
    trainer.train_step()
    trainer.train_step()
    layers = [m for stage in trainer.stages for m in stage.modules() if isinstance(m, Fp8Linear)]
    experts = [e for e in trainer.fp8_experts if e.fp8_snapshot is not None]
    assert layers and experts
    pairs = [(m.weight, m.recipe, m.fp8_snapshot) for m in layers]
    pairs += [(w, e.fp8_recipe, snap) for e in experts for w, snap in zip((e.w13, e.w2), e.fp8_snapshot)]
    for weight, recipe, snapshot in pairs:  # refreshed after the last optimizer step: the current weights'
        assert snapshot.refreshes == 3  # made, then one refresh per step
        for got, want in zip(snapshot.tensors, quantize_weight(weight, recipe, transposed=True)):
            assert_bitwise(want, got)
