"""The multi-process test helper itself: results by rank, errors and hangs reported per rank."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.dist import WorkersFailed, progress, run_workers


def _all_reduce(rank, world, scale):
    progress("all_reduce")
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item() * scale, dist.get_rank(), dist.get_world_size()


def _raise_on_rank1(rank, world):
    progress("about to check")
    if rank == 1:
        raise RuntimeError("planted failure")
    dist.barrier()
    return rank


def _hang_on_rank0(rank, world):
    progress(f"rank {rank} before barrier")
    if rank == 0:
        progress("waiting forever in time.sleep")
        time.sleep(600)
    dist.barrier()


def test_results_come_back_by_rank():
    out = run_workers(_all_reduce, 4, 2.0)
    assert out == [(12.0, r, 4) for r in range(4)]


def test_an_exception_names_the_rank_and_fails_fast():
    t0 = time.monotonic()
    with pytest.raises(WorkersFailed) as err:
        run_workers(_raise_on_rank1, 2, timeout=60)
    assert "rank 1 raised" in str(err.value) and "planted failure" in str(err.value)
    assert time.monotonic() - t0 < 30


def test_a_hang_reports_last_progress_and_stack():
    with pytest.raises(WorkersFailed) as err:
        run_workers(_hang_on_rank0, 2, timeout=8)
    text = str(err.value)
    assert "rank 0 did not finish within 8s" in text
    assert "waiting forever in time.sleep" in text
    assert "_hang_on_rank0" in text  # the dumped stack shows where it hung
