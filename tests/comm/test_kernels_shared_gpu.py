"""The kernels backend with 2, 4 and 8 ranks as processes sharing one GPU (gloo host side, CUDA IPC).

What the ``multigpu`` comm tests check, on one device: every output bitwise equal to the torch backend
(BF16 and FP8, expert-major or not, top-k up to 8, tokens routed nowhere, ranks receiving nothing,
uneven token counts), every ``num_sms`` that fits, async and autograd, 1,000 dispatch/combine pairs on one
buffer, mismatched configurations refused on every rank; then a rank killed mid-dispatch. Whether the
processes are time-sliced or MPS clients is the machine's state: scripts/gpu_check.sh (stage
``comm_shared``) runs this file both ways and sets ``DUALFLOW_TEST_EXPECT_MPS`` to the mode it started.

    DUALFLOW_TEST_REPORT=shared.jsonl python -m pytest tests/comm/test_kernels_shared_gpu.py -m gpu -v
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tests.comm import shared_gpu_cases as C
from tests.dist import free_port, run_workers

RANKS = [2, 4, 8]
ENV = {"DUALFLOW_COMM_SHARED_GPU": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
KILL_TIMEOUT_S = 5.0


def _report(test: str, ranks: int, mode: str, cases: dict[str, list[str]]) -> None:
    """One JSON line per case for the summary of scripts/gpu_check.sh (when $DUALFLOW_TEST_REPORT is set)."""
    path = os.environ.get("DUALFLOW_TEST_REPORT")
    if path:
        with open(path, "a") as fh:
            for name, failures in cases.items():
                fh.write(json.dumps({"test": test, "mode": mode, "ranks": ranks, "case": name,
                                     "passed": not failures, "failures": failures[:5]}) + "\n")


def _mode() -> str:
    return {"1": "MPS", "0": "time slicing"}.get(os.environ.get("DUALFLOW_TEST_EXPECT_MPS", ""), "unknown")


@pytest.mark.gpu
@pytest.mark.timeout(900)
@pytest.mark.parametrize("ranks", RANKS, ids=lambda n: f"ranks{n}")
def test_kernels_on_ranks_sharing_one_gpu(ranks):
    results = run_workers(C.tier, ranks, os.environ.get("DUALFLOW_TEST_EXPECT_MPS"), env=ENV, timeout=840)
    cases: dict[str, list[str]] = {}
    for rank, result in enumerate(results):
        for name, failures in result["cases"].items():
            cases.setdefault(name, []).extend(f"rank {rank}: {f}" for f in failures)
    _report("tier", ranks, results[0]["mode"], cases)
    failed = {name: failures[:3] for name, failures in cases.items() if failures}
    assert not failed, f"{len(failed)} of {len(cases)} cases failed on {ranks} ranks ({results[0]['mode']}): {failed}"


# -- one rank killed mid-dispatch ------------------------------------------------------------------------


def _killed_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank ``world - 1`` dies right after launching its dispatch kernel; the others must time out, then
    work again on a new buffer among themselves."""
    import faulthandler

    import torch.distributed as dist

    from dualflow.comm import Buffer, CommTimeoutError, KernelConfig

    os.environ.update(ENV)
    stacks = (Path(out) / f"stack-{rank}.txt").open("w")  # open until os._exit: a hang dumps here
    faulthandler.dump_traceback_later(KILL_TIMEOUT_S + 100, exit=True, file=stacks)
    victim, result = world - 1, {}
    try:
        torch.cuda.set_device(0)
        dev = torch.device("cuda", 0)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        buffer = Buffer(None, C.HIDDEN, max_tokens_per_rank=1024, num_sms=2, backend="kernels", shared_gpu=True,
                        kernel_config=KernelConfig(timeout_s=KILL_TIMEOUT_S))
        # Every token to every rank, 8 ring laps per operation: each survivor waits on the victim both for
        # rows and for room in its ring.
        idx = torch.arange(world, device=dev).repeat(1024, 1)
        x = torch.randn(1024, C.HIDDEN, device=dev).bfloat16()
        recv = buffer.dispatch(x, idx, None, world)
        buffer.combine(recv[0], recv[4])
        buffer.synchronize()  # a healthy pair first
        if rank == victim:
            # killed as it is about to launch, while the others' kernels are already waiting for it: under
            # MPS a kernel already launched runs on after its process dies (the survivors then finish)
            def die(*_args, **_kwargs):
                os.kill(os.getpid(), signal.SIGKILL)

            buffer._backend.send = die
        start = time.monotonic()
        try:
            buffer.dispatch(x, idx, None, world)
            buffer.synchronize()
            result["outcome"] = "finished"
        except CommTimeoutError as exc:
            result["outcome"], result["message"] = "timeout", str(exc)
        result["elapsed"] = time.monotonic() - start
        # The survivors, on the same GPU: a new group and a new buffer, bitwise equal to the torch backend.
        survivors = dist.new_group(list(range(victim)), use_local_synchronization=True)
        kern = Buffer(survivors, C.HIDDEN, num_sms=2, backend="kernels", shared_gpu=True)
        ref = Buffer(survivors, C.HIDDEN, backend="torch", shared_gpu=True)
        idx, w, g = C.routing(rank, victim, 5, "topk")
        idx, w = idx.to(dev), w.to(dev)
        y = C.payloads(idx.shape[0], g)["bf16"].to(dev)
        a, b = kern.dispatch(y, idx, w, 4 * victim), ref.dispatch(y, idx, w, 4 * victim)
        same = torch.equal(a[0].view(torch.int16), b[0].view(torch.int16))
        c, d = kern.combine(a[0], a[4], a[2]), ref.combine(b[0], b[4], b[2])
        result["afterwards"] = same and torch.equal(c[0].view(torch.int16), d[0].view(torch.int16))
        kern.close()
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    tmp = Path(out) / f".result-{rank}"
    tmp.write_bytes(pickle.dumps(result))
    os.replace(tmp, Path(out) / f"result-{rank}")
    os._exit(0)  # no atexit, no group teardown: the default group has a dead member


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks", RANKS, ids=lambda n: f"ranks{n}")
def test_rank_killed_mid_dispatch(ranks, tmp_path):
    ctx = mp.get_context("forkserver")
    port = free_port()
    procs = [ctx.Process(target=_killed_worker, args=(r, ranks, port, str(tmp_path)), daemon=True)
             for r in range(ranks)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + KILL_TIMEOUT_S + 150
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        time.sleep(0.1)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    victim = ranks - 1
    cases = {"no process hangs": [f"rank {r} still running" for r in hung],
             "the victim was killed": [] if procs[victim].exitcode == -signal.SIGKILL
             else [f"exit code {procs[victim].exitcode}"],
             "survivors raise CommTimeoutError within the bound": [], "a new buffer works afterwards": []}
    for r in range(victim):
        path = tmp_path / f"result-{r}"
        if not path.exists():
            stack = tmp_path / f"stack-{r}.txt"
            cases["survivors raise CommTimeoutError within the bound"].append(
                f"rank {r}: no result (exit {procs[r].exitcode}) {stack.read_text()[-2000:] if stack.exists() else ''}")
            continue
        res = pickle.loads(path.read_bytes())
        if "error" in res:
            cases["a new buffer works afterwards"].append(f"rank {r}: {res['error']}")
            continue
        msg, elapsed = res.get("message", ""), res["elapsed"]
        named = (res["outcome"] == "timeout" and f"rank {r} channel 0: dispatch" in msg and f"from rank {victim}" in msg
                 and f"timed out after {KILL_TIMEOUT_S:g} s" in msg)
        if not named or not KILL_TIMEOUT_S <= elapsed < KILL_TIMEOUT_S + 30:
            cases["survivors raise CommTimeoutError within the bound"].append(
                f"rank {r}: {res['outcome']} after {elapsed:.1f} s: {msg}")
        if not res["afterwards"]:
            cases["a new buffer works afterwards"].append(f"rank {r}: outputs differ from the torch backend")
    _report("killed", ranks, _mode(), cases)
    failed = {k: v for k, v in cases.items() if v}
    assert not failed, failed


# -- one pair for compute-sanitizer ----------------------------------------------------------------------


def _pair(rank, world):
    """One dispatch/combine pair, bitwise against the torch backend. At most 24 tokens, fewer than a ring's
    32 slots, so no block of a kernel waits for another block of the same kernel: a sanitizer that runs
    the blocks one after another still finishes."""
    from dualflow.comm import KernelConfig

    torch.cuda.set_device(0)
    dev = C.device()
    kern = C.kernels_buffer(2, max_tokens_per_rank=32, kernel_config=KernelConfig(timeout_s=600.0))
    ref = C.torch_buffer()
    g = torch.Generator().manual_seed(rank)
    idx = torch.randint(-1, 4 * world, (24, 2), generator=g).to(dev)
    w = torch.rand(24, 2, generator=g).to(dev)
    x = torch.randn(24, C.HIDDEN, generator=g).to(dev, torch.bfloat16)
    a, b = kern.dispatch(x, idx, w, 4 * world), ref.dispatch(x, idx, w, 4 * world)
    c, d = kern.combine(a[0], a[4], a[2]), ref.combine(b[0], b[4], b[2])
    kern.close()
    return [torch.equal(u.view(torch.uint8), v.view(torch.uint8)) for u, v in
            ((a[0], b[0]), (a[2], b[2]), (c[0], d[0]), (c[1], d[1]))]


@pytest.mark.gpu
@pytest.mark.timeout(1200)
def test_one_pair_on_two_ranks_for_the_sanitizers():
    """scripts/gpu_check.sh runs this under compute-sanitizer memcheck and racecheck."""
    assert run_workers(_pair, 2, env=ENV, timeout=1100) == [[True] * 4] * 2
