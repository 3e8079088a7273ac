"""The pipeline runtime on CUDA with NCCL (run on a GPU machine: ``make test-gpu``).

Same comparisons as test_runtime.py: losses and outputs bit for bit against the sequential reference on
the same GPU (deterministic cuBLAS), gradients with the 1e-13 metric, peak activations equal to the
simulator's; plus the benchmark's GPU smoke run.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_workers
from tests.dualpipe.pipeline_case import Case, check_many

DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def _gpu_cases(rank: int, world: int, cases: list) -> list[dict]:
    torch.cuda.set_device(rank)
    torch.use_deterministic_algorithms(True)
    out = []
    for kind, n, options in cases:
        case = Case(rank, world, kind, n, device=f"cuda:{rank}", **options)
        for it in range(2):
            case.step(it)
        out.append(case.result)
    return out


def _world(even: bool = False) -> int:
    n = min(torch.cuda.device_count(), 8)
    return n - n % 2 if even else n


@pytest.mark.gpu
def test_dualpipev_one_gpu():
    cases = [("dualpipev", 4, {"return_outputs": True}), ("dualpipev", 3, {"tuple_io": True, "return_outputs": True})]
    check_many(run_workers(_gpu_cases, 1, cases, backend="nccl", env=DETERMINISTIC, timeout=300), cases)


@pytest.mark.multigpu
def test_dualpipev_nccl_matches_reference():
    P = _world()
    cases = [("dualpipev", 2 * P, {"return_outputs": True}), ("dualpipev", 2 * P + 1, {"block": "overlap"}),
             ("dualpipev", 2 * P, {"tuple_io": True, "return_outputs": True, "seq_lens": (3, 5)}),
             ("dualpipev", 2 * P + 2, {"checkpoint": True, "reduction": "mean"})]
    check_many(run_workers(_gpu_cases, P, cases, backend="nccl", env=DETERMINISTIC, timeout=600), cases)


@pytest.mark.multigpu
def test_dualpipe_nccl_matches_reference():
    P = _world(even=True)
    cases = [("dualpipe", 2 * P, {"return_outputs": True}), ("dualpipe", 2 * P + 3, {"block": "overlap"}),
             ("dualpipe", P + 1, {"tuple_io": True})]
    check_many(run_workers(_gpu_cases, P, cases, backend="nccl", env=DETERMINISTIC, timeout=600), cases)


def _bench(rank: int, world: int) -> list[dict]:
    import argparse
    import runpy
    from pathlib import Path

    torch.cuda.set_device(rank)
    bench = runpy.run_path(str(Path(__file__).resolve().parents[2] / "benchmarks" / "pipeline.py"))
    args = argparse.Namespace(smoke=True, ranks=world, microbatches=2 * world, microbatch_size=2, hidden=16,
                              f_ms=0.5, i_ms=0.5, w_ms=0.5, gpu_hidden=512, gpu_tokens=256, repeat=2,
                              device="cuda", json=None)
    return bench["worker"](rank, world, args)


@pytest.mark.multigpu
def test_pipeline_benchmark_runs_on_gpus():
    rows = run_workers(_bench, 2, backend="nccl", timeout=600)[0]
    assert {(r["runtime"], r["schedule"]) for r in rows} >= {("dualflow", "dualpipev"), ("torch", "dualpipev")}
