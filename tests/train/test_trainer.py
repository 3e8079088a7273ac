"""The training loop: parallel runs against one process, resumption, failures, reports."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from dualflow.train.checkpoint import CheckpointManager
from dualflow.train.parallel import ParallelConfig
from dualflow.train.trainer import Trainer, TrainingDiverged
from tests.dist import run_workers
from tests.train.helpers import tiny, train_worker, train_worker_comm_checks

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


def test_single_process_run_learns_and_reports(tmp_path):
    cfg = tiny(tmp_path, train=dict(steps=12, val_every=6))
    trainer = Trainer(cfg)
    biases = {lid: r.bias.clone() for lid, r in trainer.routers.items()}
    summary = trainer.train()
    assert sorted(summary.val_losses) == [0, 6, 12]
    assert summary.val_losses[12] < summary.val_losses[0]
    assert any(not torch.equal(biases[lid], r.bias) for lid, r in trainer.routers.items())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "expert_load_max_over_mean",
                "peak_memory_mb"):
        assert all(math.isfinite(r[key]) for r in steps), key
    assert all(r["mfu"] is None for r in steps)  # no published peak for a CPU
    assert all(r["expert_load_max_over_mean"] >= 1.0 for r in steps)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert CheckpointManager(tmp_path / "checkpoints").latest().name == "step-00000012"


def test_expert_and_data_parallel_match_one_process(tmp_path):
    cfg = tiny(tmp_path / "one")
    single = Trainer(cfg).train().losses
    results = run_workers(train_worker, 2, tiny(tmp_path / "two", parallel=dict(dp=2, microbatches=2)),
                          timeout=120)
    assert results[0] == results[1]
    # The same global batch; reduction order differs (per-rank micro-batch means summed across ranks,
    # experts fed rows from both ranks in one GEMM): FP32 rounding, amplified a little by Adam.
    assert _relative(results[0][0], single) < 1e-5



def test_comm_checks_reach_the_exchange_and_change_no_result(tmp_path):
    runs = {checks: run_workers(train_worker_comm_checks, 2, tiny(tmp_path / checks, train=dict(steps=3),
                                                                   parallel=dict(dp=2, microbatches=2,
                                                                                 comm_checks=checks)),
                                timeout=120)
            for checks in ("collective", "first")}
    for checks, results in runs.items():
        assert all(r[1] == [checks] for r in results), (checks, results)
    # the same losses, bit for bit: the checks move no data and change no operation or shape
    assert runs["first"][0][0] == runs["collective"][0][0]
    with pytest.raises(ValueError, match=r"parallel\.comm_checks: expected one of .*, got 'sometimes'"):
        ParallelConfig(comm_checks="sometimes")

@pytest.mark.parametrize("fp8", [False, True])
def test_zero1_is_bitwise_equal_to_replicated_optimizer(tmp_path, fp8):
    # With FP8 the weights' FP8 copies must follow the broadcast updates on the ranks that do not own them.
    train = dict(steps=3, fp8=fp8, fp8_dispatch=False)
    base = run_workers(train_worker, 2, tiny(tmp_path / "a", parallel=dict(dp=2, microbatches=2), train=train),
                       timeout=120)
    zero = run_workers(train_worker, 2, tiny(tmp_path / "b", parallel=dict(dp=2, microbatches=2, zero1=True),
                                             train=train), timeout=120)
    # Bitwise on any CPU: ZeRO-1 gives each parameter to one owner, who applies the same elementwise update
    # to the whole tensor that every rank applies without it; the broadcast copies bytes.
    assert base[0] == zero[0]


def test_resume_continues_bitwise(tmp_path):
    full = Trainer(tiny(tmp_path / "full", train=dict(steps=6), checkpoint=dict(every=3))).train()
    part_cfg = tiny(tmp_path / "part", train=dict(steps=6), checkpoint=dict(every=3))
    Trainer(tiny(tmp_path / "part", train=dict(steps=3), checkpoint=dict(every=3))).train()
    resumed = Trainer(part_cfg).train(resume=True)
    assert resumed.resumed_from == 3
    assert sorted(resumed.losses) == [4, 5, 6]
    # Bitwise on any CPU: a checkpoint restores the exact bytes, and the resumed steps run the same
    # operations on the same shapes in the same process as the uninterrupted run.
    for step in (4, 5, 6):
        assert resumed.losses[step] == full.losses[step]
    assert resumed.val_losses[6] == full.val_losses[6]


def test_bf16_moments_and_bf16_compute_train(tmp_path):
    summary = Trainer(tiny(tmp_path, train=dict(steps=6, dtype="bfloat16"),
                           optim=dict(moments_dtype="bfloat16"))).train()
    assert summary.val_losses[6] < summary.val_losses[0]


def _diverge_worker(rank, world, cfg):
    trainer = Trainer(cfg)
    original = trainer.engine.step

    def poisoned(x, y):  # rank 1's embedding turns to NaN at the third step
        if trainer.step == 2 and rank == 1:
            with torch.no_grad():
                trainer.stages[0].embed.weight.fill_(float("nan"))
        return original(x, y)

    trainer.engine.step = poisoned
    try:
        trainer.train()
    except TrainingDiverged as exc:
        return str(exc)
    return "no error"


def test_non_finite_loss_stops_naming_step_rank_and_checkpoint(tmp_path):
    cfg = tiny(tmp_path, parallel=dict(dp=2, microbatches=2), train=dict(steps=5), checkpoint=dict(every=1))
    messages = run_workers(_diverge_worker, 2, cfg, timeout=120)
    for msg in messages:
        assert "at step 3" in msg and "rank 1" in msg and "step-00000002" in msg, msg


def _crash_in_save_worker(rank, world, cfg):
    trainer = Trainer(cfg)
    original = trainer.checkpoints.save

    def save(step, state):
        if step == 4:  # die with part of the shards written, like a machine that loses power
            import torch.distributed.checkpoint as dcp

            real = dcp.save

            def half_save(*args, **kwargs):
                if rank == 1:
                    os._exit(9)
                return real(*args, **kwargs)

            dcp.save = half_save
        return original(step, state)

    trainer.checkpoints.save = save
    trainer.train()


def test_killed_during_checkpoint_resumes_from_previous(tmp_path):
    par = dict(dp=2, microbatches=2)
    full = run_workers(train_worker, 2, tiny(tmp_path / "full", parallel=par, train=dict(steps=6),
                                             checkpoint=dict(every=2)), timeout=120)
    cfg = tiny(tmp_path / "crash", parallel=par, train=dict(steps=6), checkpoint=dict(every=2))
    with pytest.raises(AssertionError, match="exited with code 9"):
        run_workers(_crash_in_save_worker, 2, cfg, timeout=60)
    root = tmp_path / "crash" / "checkpoints"
    assert [p.name for p in CheckpointManager(root).list()] == ["step-00000002"]
    assert (root / ".tmp-step-00000004").exists()
    resumed = run_workers(train_worker, 2, cfg, True, timeout=120)
    assert sorted(resumed[0][0]) == [3, 4, 5, 6]
    assert resumed[0][0][6] == full[0][0][6]


def test_a_second_fresh_run_must_say_what_to_do_with_the_first(tmp_path):
    cfg = tiny(tmp_path, train=dict(steps=2))
    Trainer(cfg).train()
    with pytest.raises(FileExistsError, match=r"--resume .* --fresh"):
        Trainer(cfg).train()
    Trainer(cfg).train(fresh=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]  # the first run's records went with its checkpoints


def test_cli(tmp_path, capsys):
    from dualflow.cli import main
    from dualflow.launcher.config import save_config

    path = save_config(tiny(tmp_path / "run", train=dict(steps=2)), tmp_path / "job.toml")
    with pytest.raises(SystemExit) as exit_info:  # argparse's exit, with the valid keys listed
        main(["train", str(path), "--model.dimm=64"])
    assert exit_info.value.code == 2 and "did you mean 'model.dim'" in capsys.readouterr().err
    assert main(["train", str(path), "--model.dim=30"]) == 2
    assert "n_heads" in capsys.readouterr().err
    assert main(["train", str(path), "--parallel.dp=2", "--parallel.microbatches=2"]) == 2
    assert "dualflow launch --nproc-per-node 2 -- -m dualflow train" in capsys.readouterr().err
    assert main(["train", str(path), "--train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "resolved config" in out and "step     3/3" in out and "done: step 3" in out
    assert main(["train", str(path), "--train.steps=3"]) == 2  # checkpoints exist: --resume or --fresh
    assert main(["train", str(path), "--train.steps=4", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_module_entry_point():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dualflow.train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--parallel.schedule" in out.stdout and "--resume" in out.stdout


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoints_disabled_write_none_not_even_the_last(tmp_path):
    cfg = tiny(tmp_path, train=dict(steps=2, val_every=2), checkpoint=dict(every=1, enabled=False))
    summary = Trainer(cfg).train()
    assert summary.checkpoint is None and not list(tmp_path.rglob("step-*"))
