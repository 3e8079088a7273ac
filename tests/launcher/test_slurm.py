"""srun on a private single-node SLURM cluster: one task per node with `dualflow launch`, one task per
process with init_distributed, and the refusal of a launcher inside a per-GPU srun."""

from __future__ import annotations

import sys

import pytest

from tests.dist import free_port
from tests.launcher.helpers import DUALFLOW, JOB, check_reports

pytestmark = pytest.mark.slow


def _srun(slurm, *args, env=None):
    res = slurm.srun("--time=5", *args, env=env, timeout=240)
    return res.returncode, res.stdout + res.stderr


def test_one_task_per_node_runs_dualflow_launch(slurm, tmp_path):
    port = free_port()  # rendezvous port from MASTER_PORT: parallel test clusters share job ids
    code, out = _srun(slurm, "--nodes=1", "--ntasks-per-node=1", *DUALFLOW, "launch", "--nproc-per-node", "2",
                      "--log-dir", str(tmp_path / "logs"), "--", str(JOB), str(tmp_path / "reports"),
                      env={"MASTER_PORT": str(port)})
    assert code == 0, out + slurm.logs()
    assert f"one task per node: 1 node(s), this is node 0, c10d rendezvous at localhost:{port}" in out, out
    reports = check_reports(tmp_path / "reports", world=2, local_world=2, nodes=1, source="torchrun")
    assert all(r["env"]["DUALFLOW_LOG_DIR"] == str(tmp_path / "logs") for r in reports)
    assert sorted(p.name for p in (tmp_path / "logs").glob("rank-*.log")) == ["rank-0.log", "rank-1.log"]


def test_one_task_per_process_with_init_distributed(slurm, tmp_path):
    port = free_port()
    code, out = _srun(slurm, "--nodes=1", "--ntasks=4", sys.executable, str(JOB), str(tmp_path),
                      env={"MASTER_PORT": str(port)})
    assert code == 0, out + slurm.logs()
    reports = check_reports(tmp_path, world=4, local_world=4, nodes=1, source="slurm")
    # The rendezvous host is the first host of SLURM's nodelist; the port is the one given.
    assert {(r["env"]["MASTER_ADDR"], r["env"]["MASTER_PORT"]) for r in reports} == {("localhost", str(port))}


def test_dualflow_launch_inside_a_per_gpu_srun_is_refused(slurm, tmp_path):
    code, out = _srun(slurm, "--nodes=1", "--ntasks=2", *DUALFLOW, "launch", "--", str(JOB), str(tmp_path))
    assert code != 0
    assert out.count("srun started 2 tasks on this node") == 2, out  # each task refuses, with the fix
    assert "srun --ntasks-per-node=1 dualflow launch" in out
    assert not list(tmp_path.glob("rank-*.json"))
