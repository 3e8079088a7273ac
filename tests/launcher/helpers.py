"""Shared pieces of the launcher tests: clean environments, subprocesses that cannot outlive a test,
and the checks on the reports that tests/launcher/job.py writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.launcher.slurm_cluster import clean_env

JOB = Path(__file__).with_name("job.py")
DUALFLOW = [sys.executable, "-m", "dualflow"]

__all__ = ["DUALFLOW", "JOB", "check_reports", "clean_env", "run", "start", "wait"]


def start(cmd: list[str], env: dict[str, str], cwd: str | Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so that a hang can be stopped with everything it started)."""
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """(exit status, combined output); on timeout the process group is killed and the test fails."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{proc.args} did not finish in {timeout} s; output:\n{out}") from None
    return proc.returncode, out


def run(cmd: list[str], env: dict[str, str], timeout: float = 180, cwd: str | Path | None = None) -> tuple[int, str]:
    return wait(start(cmd, env, cwd), timeout)


def check_reports(out: Path, world: int, local_world: int, nodes: int, source: str) -> list[dict]:
    """Every rank reported, and the collectives and the mapping agree with a ``world``-rank job."""
    files = sorted(out.glob("rank-*.json"))
    reports = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == list(range(world)), f"reports from ranks {[f.name for f in files]}"
    for r in reports:
        assert (r["dist_rank"], r["dist_world_size"], r["world_size"]) == (r["rank"], world, world), r
        assert (r["local_world_size"], r["num_nodes"], r["source"]) == (local_world, nodes, source), r
        assert 0 <= r["local_rank"] < local_world, r
        assert r["sum"] == world * (world + 1) / 2, r
        assert r["broadcast"] == [float(i * world) for i in range(4)], r
        assert [p["rank"] for p in r["peers"]] == list(range(world)), r
        env = r["env"]
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == (str(r["rank"]), str(r["local_rank"]), str(world))
        assert (env["NCCL_NVLS_ENABLE"], env["TORCH_SYMM_MEM_DISABLE_MULTICAST"]) == ("0", "1"), env
        assert (env["TORCH_NCCL_ASYNC_ERROR_HANDLING"], env["TORCH_NCCL_DUMP_ON_TIMEOUT"]) == ("3", "1"), env
    # One process per (node, local rank) pair, with distinct pids.
    assert len({p["pid"] for p in reports[0]["peers"]}) == world
    local_ranks = sorted(r["local_rank"] for r in reports)
    assert local_ranks == sorted(list(range(local_world)) * nodes), local_ranks
    return reports
