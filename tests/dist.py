"""Run a function on N real processes with torch.distributed (gloo by default) and collect the results.

The one place where tests start process groups. Workers are forked from a forkserver that has
imported torch once, so an 8-rank test starts in well under a second. A hang fails fast: after
``timeout`` seconds every worker dumps its Python stack, the parent kills the group and raises
:class:`WorkersFailed` with each rank's last :func:`progress` message and stack.

    def _worker(rank, world, scale):
        progress("all_reduce")
        t = torch.ones(1) * rank
        dist.all_reduce(t)
        return t.item() * scale

    assert run_workers(_worker, 4, 2.0) == [12.0] * 4

Worker functions must be module-level (they are pickled).
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

_CTX = mp.get_context("forkserver")
# sympy (through symbolic_shapes) is imported by the first backward with explicit gradients: preloading
# it once saves every worker 1-3 s
_CTX.set_forkserver_preload(["torch", "torch.distributed", "torch.fx.experimental.symbolic_shapes"])

# Set in each worker: the file its progress lines go to.
_PROGRESS_FILE: Path | None = None


class WorkersFailed(AssertionError):
    """A worker raised, exited abnormally, or the group did not finish in time."""


def progress(message: str) -> None:
    """Record what this worker is doing now; shown per rank if the test fails or hangs."""
    if _PROGRESS_FILE is not None:
        with _PROGRESS_FILE.open("a") as fh:
            fh.write(message + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, args, kwargs, port, workdir, backend, timeout, env) -> None:
    global _PROGRESS_FILE
    workdir = Path(workdir)
    _PROGRESS_FILE = workdir / f"progress-{rank}.txt"
    stacks = (workdir / f"stack-{rank}.txt").open("w")
    # Dump every thread's stack shortly before the parent gives up, so a hang shows where it was.
    faulthandler.dump_traceback_later(max(timeout - 1.0, 0.5), exit=False, file=stacks)
    os.environ.update(env)
    if os.environ.get("TRITON_INTERPRET") == "1":
        from tests.triton_fp8 import install

        install()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share the machine's cores
    result: Any
    try:
        if backend:
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    init_method=f"tcp://127.0.0.1:{port}")
        result = ("ok", fn(rank, world, *args, **kwargs))
    except BaseException as exc:  # report everything, including SystemExit from the code under test
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    try:
        payload = pickle.dumps(result)
    except Exception as exc:
        payload = pickle.dumps(("error", f"result of rank {rank} is not picklable: {exc}"))
    # written under another name and renamed: the parent polls for this file and must never read half of it
    tmp = workdir / f".result-{rank}.pkl.tmp"
    tmp.write_bytes(payload)
    os.replace(tmp, workdir / f"result-{rank}.pkl")
    # Destroying the group waits for peers: skip it on error so a failed rank does not hang the others.
    if backend and result[0] == "ok":
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:
            pass
    faulthandler.cancel_dump_traceback_later()
    stacks.close()


def _tail(path: Path, n: int = 3) -> str:
    if not path.exists():
        return "(nothing recorded)"
    lines = path.read_text().strip().splitlines()
    return " | ".join(lines[-n:]) if lines else "(nothing recorded)"


def run_workers(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    backend: str | None = "gloo",
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes; return results by rank.

    ``backend=None`` starts the processes without a process group (for code that creates its own).
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dualflow-dist-") as tmp:
        workdir = Path(tmp)
        procs = [
            _CTX.Process(target=_entry, args=(fn, r, world_size, args, kwargs, port, tmp, backend, timeout,
                                              dict(env or {})), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed_early = False
        while time.monotonic() < deadline:
            if all(not p.is_alive() for p in procs):
                break
            # A rank that reported an error or died lets the test fail now instead of at the deadline.
            for r, p in enumerate(procs):
                res = workdir / f"result-{r}.pkl"
                if (res.exists() and pickle.loads(res.read_bytes())[0] == "error") or (
                    not p.is_alive() and p.exitcode not in (0, None)
                ):
                    failed_early = True
            if failed_early:
                time.sleep(0.5)  # let the other ranks write their results if they can
                break
            time.sleep(0.02)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        if hung and not failed_early:
            time.sleep(1.5)  # the workers' stack dumps fire one second before the deadline
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        results, problems = [], []
        for r, p in enumerate(procs):
            res = workdir / f"result-{r}.pkl"
            if res.exists():
                status, value = pickle.loads(res.read_bytes())
                if status == "ok":
                    results.append(value)
                    continue
                problems.append(f"rank {r} raised (last progress: {_tail(workdir / f'progress-{r}.txt')}):\n"
                                f"{value}")
            elif r in hung:
                stack = (workdir / f"stack-{r}.txt")
                dump = stack.read_text().strip() if stack.exists() else ""
                problems.append(f"rank {r} did not finish within {timeout:.0f}s "
                                f"(last progress: {_tail(workdir / f'progress-{r}.txt')})"
                                + (f"\n  stack:\n{_indent(dump)}" if dump else ""))
            else:
                problems.append(f"rank {r} exited with code {p.exitcode} without a result "
                                f"(last progress: {_tail(workdir / f'progress-{r}.txt')})")
            results.append(None)
        if problems:
            raise WorkersFailed(f"{len(problems)} of {world_size} ranks failed:\n" + "\n".join(problems))
        return results


def _indent(text: str, n: int = 40) -> str:
    lines = text.splitlines()[:n]
    return "\n".join("    " + line for line in lines)

