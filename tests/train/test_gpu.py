"""The training job on GPUs: CUDA streams for the overlap, NCCL for pipeline and expert traffic, FP8 GEMMs.

Run with ``make test-gpu`` (or ``pytest -m "gpu or multigpu" tests/train``). Results on a GPU are compared
within a tolerance, not bitwise: some CUDA kernels (attention backward, atomics in reductions) do not
promise run-to-run identical bits.
"""

from __future__ import annotations

import pytest
import torch

from dualflow.train.model import Stage, cross_entropy
from dualflow.train.trainer import Trainer
from tests.dist import run_workers
from tests.train.helpers import tiny

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# FP8 needs widths of multiples of 128 for its dispatch payloads; 4 heads of 32.
GPU_MODEL = dict(dim=128, n_heads=4, dense_hidden=256, expert_hidden=128)


def _cfg(path, **kw):
    kw.setdefault("model", GPU_MODEL)
    kw.setdefault("data", dict(seq_len=64))
    return tiny(path, **kw)


def _relative(a: dict, b: dict) -> float:
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in b)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_one_gpu_trains_and_reports(tmp_path, fp8):
    cfg = _cfg(tmp_path, train=dict(steps=30, global_batch=16, dtype="bfloat16", fp8=fp8, val_every=15))
    trainer = Trainer(cfg, torch.device("cuda", 0))
    summary = trainer.train()
    assert summary.val_losses[30] < 0.8 * summary.val_losses[0]
    if fp8:
        assert "converted" in trainer.fp8_report
    records = trainer.log.records
    assert all(r["peak_memory_mb"] > 0 for r in records if "loss" in r)
    name = torch.cuda.get_device_name(0)
    known = any(k in name for k in ("H100", "H200", "H800", "A100", "A800"))
    assert all((r["mfu"] is not None) == (known and not fp8) for r in records if "loss" in r)


@pytest.mark.gpu
def test_overlapped_stage_on_a_side_stream_matches_plain_autograd():
    from dualflow.train.stage import OverlappedStage
    from tests.train.helpers import MODEL

    dev = torch.device("cuda", 0)
    results = []
    for overlapped in (False, True):
        a = Stage(MODEL, range(0, 2), first=True, last=False)
        b = Stage(MODEL, range(2, 4), first=False, last=True)
        for s in (a, b):
            s.init_weights(3)
            s.to(dev)
        m0, m1 = OverlappedStage(a), OverlappedStage(b)
        stream = torch.cuda.Stream(dev)
        m0.comm_stream = m1.comm_stream = stream
        g = torch.Generator().manual_seed(0)
        x0 = torch.randint(0, 256, (4, 32), generator=g).to(dev)
        h1 = torch.randn(4, 32, MODEL.dim, generator=g).to(dev).requires_grad_()
        y1 = torch.randint(0, 256, (4, 32), generator=g).to(dev)
        loss1 = cross_entropy(m1(h1), y1)
        if overlapped:
            outs, _ = OverlappedStage.overlapped_forward_backward(m0, [x0], None, [], m1, loss1, None, None)
            assert m1.interleaved == 1
        else:
            outs = [m0(x0)]
            loss1.backward()
        torch.cuda.synchronize()
        results.append((outs[0].detach(), h1.grad.clone(), {n: p.grad.clone() for n, p in m1.named_parameters()}))
    (o_a, h_a, g_a), (o_b, h_b, g_b) = results
    torch.testing.assert_close(o_a, o_b)
    torch.testing.assert_close(h_a, h_b)
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], msg=name)


def _nccl_worker(rank, world, cfg):
    torch.cuda.set_device(rank)
    summary = Trainer(cfg, torch.device("cuda", rank)).train()
    return summary.losses, summary.val_losses


@pytest.mark.multigpu
def test_dualpipev_on_two_gpus_matches_one_gpu(tmp_path):
    single = Trainer(_cfg(tmp_path / "one"), torch.device("cuda", 0)).train().losses
    results = run_workers(_nccl_worker, 2, _cfg(tmp_path / "two", parallel=dict(pp=2)), backend="nccl",
                          timeout=300)
    assert _relative(results[0][0], single) < 1e-4


@pytest.mark.multigpu
def test_expert_parallel_fp8_dispatch_over_nccl(tmp_path):
    cfg = _cfg(tmp_path, parallel=dict(dp=2, microbatches=2),
               train=dict(steps=30, global_batch=16, dtype="bfloat16", fp8=True, val_every=15))
    _, val = run_workers(_nccl_worker, 2, cfg, backend="nccl", timeout=300)[0]
    assert val[30] < 0.8 * val[0]


@pytest.mark.multigpu
def test_default_layout_on_four_gpus(tmp_path):
    if torch.cuda.device_count() < 4:
        pytest.skip(f"needs 4 GPUs, {torch.cuda.device_count()} visible")
    cfg = _cfg(tmp_path, parallel=dict(pp=2, dp=2),
               train=dict(steps=30, global_batch=16, dtype="bfloat16", fp8=True, val_every=15))
    results = run_workers(_nccl_worker, 4, cfg, backend="nccl", timeout=300)
    assert all(r[0] == results[0][0] for r in results)
    assert results[0][1][30] < 0.8 * results[0][1][0]


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_one_gpu_step_makes_no_host_synchronisation(tmp_path, fp8):
    """Forward and backward of a one-GPU step (routing, expert permutation, grouped GEMMs, quantization,
    loss) under ``set_sync_debug_mode("error")``: any operation that waits for the GPU raises."""
    from dualflow.train.engine import LocalEngine

    cfg = _cfg(tmp_path, train=dict(steps=2, global_batch=8, dtype="bfloat16", fp8=fp8, cuda_graph="off"))
    trainer = Trainer(cfg, torch.device("cuda", 0))
    engine = trainer.engine
    assert isinstance(engine, LocalEngine)
    x, y = trainer.loader.next()
    x, y = x.cuda(), y.cuda()
    engine.step(x, y)  # first call: allocator, Triton compilation and weight caches outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, count = engine.step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(total).item() and count == cfg.parallel.microbatches
    grads = [p.grad for p in trainer.params.values()]
    assert all(g is not None for g in grads)


@pytest.mark.gpu
@pytest.mark.parametrize(("fp8", "snapshots"), [(False, False), (True, False), (True, True)])
def test_graphed_steps_match_eager_steps(tmp_path, fp8, snapshots):
    """The same run with the step replayed as a CUDA graph and eagerly: the same losses (within the run-to-run
    noise of the GPU's reductions), and the graph really replayed. With FP8 weight snapshots the replayed
    graph reads storage rewritten in place after every optimizer step: stale reads would part the losses."""
    from dualflow.train.graphs import GraphedEngine

    losses = {}
    for mode in ("off", "on"):  # the eager reference never has snapshots (stale ones would hide in both runs)
        cfg = _cfg(tmp_path / mode, train=dict(steps=8, global_batch=8, dtype="bfloat16", fp8=fp8, cuda_graph=mode,
                                               val_every=8, fp8_weight_snapshots=snapshots and mode == "on"))
        trainer = Trainer(cfg, torch.device("cuda", 0))
        summary = trainer.train()
        losses[mode] = summary.losses
        if mode == "on":
            assert isinstance(trainer.engine, GraphedEngine) and trainer.engine.failed is None
            assert trainer.engine.captures == 1 and trainer.engine.replays == 8 - trainer.engine.warmup
    assert _relative(losses["on"], losses["off"]) < 1e-2
