"""init_distributed on real processes: the mapping, the set-if-unset policy, re-entry, device binding."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

from tests.dist import run_workers
from tests.launcher.helpers import DUALFLOW, JOB, check_reports, clean_env, run

_WATCHED = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
            "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT")


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


def _init_and_reduce(rank, world, drop_launcher_env=False):
    import torch.distributed as dist

    from dualflow.launcher import init_distributed

    if drop_launcher_env:  # a lone `python script.py`
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
    recorder = _Recorder()
    logging.getLogger("dualflow.launcher").addHandler(recorder)
    ctx = init_distributed(timeout=60)
    again = init_distributed()  # a second call answers the same without re-initialising
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"ctx": ctx, "again": again, "sum": t.item(), "env": {k: os.environ.get(k) for k in _WATCHED},
            "log": recorder.lines, "dist": (dist.get_rank(), dist.get_world_size(), dist.get_backend())}


def test_maps_the_environment_and_starts_gloo():
    results = run_workers(_init_and_reduce, 3, backend=None, timeout=120)
    for rank, r in enumerate(results):
        ctx = r["ctx"]
        assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size, ctx.num_nodes) == (rank, 3, rank, 3, 1)
        assert (ctx.backend, ctx.device, ctx.source) == ("gloo", torch.device("cpu"), "env")
        assert r["again"] == ctx and r["dist"] == (rank, 3, "gloo") and r["sum"] == 6.0
        assert r["env"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_FR_BUFFER_SIZE": "2000",
                            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
        assert not any(line.startswith("WARNING") for line in r["log"])


def test_user_settings_are_kept_with_one_warning_on_rank_0():
    user = {"NCCL_NVLS_ENABLE": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    results = run_workers(_init_and_reduce, 2, backend=None, env=user, timeout=120)
    for rank, r in enumerate(results):
        assert r["env"]["NCCL_NVLS_ENABLE"] == "1" and r["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        warnings = [line for line in r["log"] if line.startswith("WARNING")]
        if rank == 0:
            assert len(warnings) == 1, warnings
            assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (recommended 3)" in warnings[0]
            assert "NCCL_NVLS_ENABLE=1 (recommended 0)" in warnings[0]
            assert "TORCH_SYMM_MEM_DISABLE_MULTICAST" not in warnings[0]  # same as recommended
        else:
            assert warnings == []


def test_a_lone_process_is_a_world_of_one():
    (r,) = run_workers(_init_and_reduce, 1, True, backend=None, timeout=120)
    ctx = r["ctx"]
    assert (ctx.rank, ctx.world_size, ctx.num_nodes, ctx.source) == (0, 1, 1, "single") and r["sum"] == 1.0


def _reenter(rank, world):
    from dualflow.launcher import LauncherError, init_distributed

    ctx = init_distributed()
    os.environ["RANK"] = str((rank + 1) % world)  # now the environment contradicts the live group
    try:
        init_distributed()
    except LauncherError as exc:
        return ctx.rank, ctx.world_size, str(exc)
    return ctx.rank, ctx.world_size, None


def test_an_existing_group_is_reused_and_checked():
    for rank, (r, w, error) in enumerate(run_workers(_reenter, 2, timeout=120)):
        assert (r, w) == (rank, 2)
        assert error is not None and f"already initialised as rank {rank} of 2" in error


def _bad_backend_or_timeout(rank, world, backend, timeout):
    from dualflow.launcher import init_distributed

    try:
        init_distributed(backend=backend, timeout=timeout)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal of NCCL")
def test_refusals_before_any_collective():
    (err,) = run_workers(_bad_backend_or_timeout, 1, "nccl", None, backend=None, timeout=120)
    assert err.startswith("LauncherError") and "needs CUDA" in err
    (err,) = run_workers(_bad_backend_or_timeout, 1, "auto", 0, backend=None, timeout=120)
    assert err.startswith("ValueError") and "timeout must be positive" in err


def _malformed_variables(rank, world, cases):
    import torch.distributed as dist

    from dualflow.launcher import init_distributed

    out = []
    for name, value in cases:
        saved = os.environ.get(name)
        os.environ[name] = value
        try:
            init_distributed(timeout=30)
            out.append(("no error", dist.is_initialized()))
        except Exception as exc:
            out.append((f"{type(exc).__name__}: {exc}", dist.is_initialized()))
        os.environ[name] = saved
    return out


def test_malformed_variables_are_refused_before_the_process_group_starts():
    cases = [("WORLD_SIZE", "abc"), ("RANK", "-1"), ("LOCAL_RANK", "2.5"), ("MASTER_PORT", ""),
             ("MASTER_PORT", "99999"), ("RANK", "3")]  # rank 3 of a world of 1
    (results,) = run_workers(_malformed_variables, 1, cases, backend=None, timeout=120)
    for (name, value), (error, started) in zip(cases, results):
        assert not started, f"{name}={value!r}: the process group started"
        if name == "RANK" and value == "3":
            assert error.startswith("LauncherError: inconsistent placement") and "RANK=3 is not below WORLD_SIZE=1" \
                in error, error
        else:
            assert error.startswith(f"LauncherError: {name}={value!r}: expected an integer "), error


@pytest.mark.gpu
def test_binds_one_gpu_per_local_rank_under_dualflow_launch(tmp_path):
    n = torch.cuda.device_count()
    code, out = run([*DUALFLOW, "launch", "--nproc-per-node", "auto", "--log-dir", str(tmp_path / "logs"), "--",
                     str(JOB), str(tmp_path / "reports")], clean_env(), timeout=300)
    assert code == 0, out
    assert f"{n} process(es) per node (auto: {n} visible GPU(s))" in out
    for r in check_reports(tmp_path / "reports", world=n, local_world=n, nodes=1, source="torchrun"):
        assert (r["device"], r["current_device"], r["backend"]) == (f"cuda:{r['local_rank']}", r["local_rank"], "nccl")


@pytest.mark.gpu
def test_a_local_rank_without_a_gpu_is_refused(tmp_path):
    n = torch.cuda.device_count()
    env = clean_env(RANK=str(n), WORLD_SIZE=str(n + 1), LOCAL_RANK=str(n), LOCAL_WORLD_SIZE=str(n + 1),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    code, out = run([sys.executable, "-c", "from dualflow.launcher import init_distributed; init_distributed()"], env)
    assert code != 0 and f"LOCAL_RANK={n} but this process sees {n} GPU(s)" in out, out
