"""Multi-token prediction and group-limited routing on GPUs: BF16/FP8 training on one GPU, and the token ids
that travel to the MTP stage over NCCL (DualPipeV on two GPUs against one).

Run with ``pytest -m "gpu or multigpu" tests/train/test_mtp_gpu.py`` on a machine with CUDA GPUs.
Compared within a tolerance (CUDA kernels do not promise run-to-run identical bits).
"""

from __future__ import annotations

import pytest
import torch

from dualflow.train.trainer import Trainer
from tests.dist import run_workers
from tests.train.helpers import tiny

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# widths of multiples of 128 for FP8 dispatch; 2 groups of 2 experts, one per token; one MTP module
MODEL = dict(dim=128, n_heads=4, dense_hidden=256, expert_hidden=128, n_group=2, topk_group=1, mtp_depth=1)


def _cfg(path, **kw):
    return tiny(path, model=MODEL, data=dict(seq_len=64), **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_one_gpu_trains_with_mtp_and_grouped_routing(tmp_path, fp8):
    cfg = _cfg(tmp_path, train=dict(steps=30, global_batch=16, dtype="bfloat16", fp8=fp8, val_every=15))
    trainer = Trainer(cfg, torch.device("cuda", 0))
    summary = trainer.train()
    assert summary.val_losses[30] < 0.8 * summary.val_losses[0]
    val = {r["step"]: r for r in trainer.log.records if "val_mtp_loss_1" in r}
    assert val[30]["val_mtp_loss_1"] < 0.9 * val[0]["val_mtp_loss_1"]  # the MTP head learns too
    assert val[0]["val_mtp_acc_1"] < val[30]["val_mtp_acc_1"] <= 1


def _nccl_worker(rank, world, cfg):
    torch.cuda.set_device(rank)
    return Trainer(cfg, torch.device("cuda", rank)).train().losses


@pytest.mark.multigpu
def test_dualpipev_with_mtp_on_two_gpus_matches_one_gpu(tmp_path):
    single = Trainer(_cfg(tmp_path / "one"), torch.device("cuda", 0)).train().losses
    results = run_workers(_nccl_worker, 2, _cfg(tmp_path / "two", parallel=dict(pp=2)), backend="nccl", timeout=300)
    assert max(abs(results[0][k] - single[k]) / abs(single[k]) for k in single) < 1e-4
