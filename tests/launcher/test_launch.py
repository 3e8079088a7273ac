"""`dualflow launch` with the real torchrun agent: two agents side by side, restarts, failures, dry runs."""

from __future__ import annotations

import os
import shlex
import sys
from importlib.metadata import entry_points

import pytest
from torch.distributed import run as torchrun

from dualflow.cli import main as dualflow_main
from dualflow.launcher import LauncherError, plan_launch
from dualflow.launcher.env import RECOMMENDED
from tests.dist import free_port
from tests.launcher.helpers import DUALFLOW, JOB, check_reports, clean_env, run, start, wait


@pytest.fixture
def plain_env(monkeypatch):
    """This process's environment without any launcher's variables or the launcher's set-if-unset
    recommendations (`make test` itself exports some of them), as on a plain machine."""
    keep = clean_env()
    recommended = {name for names, _ in RECOMMENDED for name in names}
    for key in list(os.environ):
        if key not in keep or key in recommended:
            monkeypatch.delenv(key)
    return monkeypatch


def _launch(*flags: str) -> list[str]:
    return [*DUALFLOW, "launch", *flags]


def test_dry_run_prints_the_exact_torchrun_command(plain_env, capsys, tmp_path):
    assert dualflow_main(["launch", "--dry-run", "--nproc-per-node", "3", "--max-restarts", "2", "--log-dir",
                          str(tmp_path), "--", "train.py", "--lr", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("dualflow launch: plain machine, one node (standalone rendezvous); 3 process(es)")
    command = next(line for line in out if line.startswith("command: "))[len("command: "):]
    argv = shlex.split(command)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    args = torchrun.parse_args(argv[3:])  # torchrun's own parser accepts it
    assert (args.standalone, args.nproc_per_node, args.max_restarts, args.log_dir) == (True, "3", 2, str(tmp_path))
    assert (args.module, args.training_script, args.training_script_args) == (
        True, "dualflow.launcher.worker", ["train.py", "--lr", "1"])
    env = dict(kv.split("=", 1) for kv in shlex.split(next(x for x in out if x.startswith("environment: "))[13:]))
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and env["DUALFLOW_LOG_DIR"] == str(tmp_path)
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == f"{tmp_path}/nccl_trace_rank_"
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # restarts need a fresh store per attempt


@pytest.mark.slow
@pytest.mark.skipif(not any(ep.name == "dualflow" for ep in entry_points(group="torchrun.logs_specs")),
                    reason="the torchrun.logs_specs entry point 'dualflow' is not registered (pyproject.toml)")
def test_the_printed_command_runs_under_plain_torchrun(tmp_path):
    env = clean_env()
    code, out = run([*DUALFLOW, "launch", "--dry-run", "--nproc-per-node", "2", "--log-dir", str(tmp_path / "logs"),
                     "--", str(JOB), str(tmp_path / "reports")], env, timeout=120)
    assert code == 0, out
    lines = out.splitlines()
    command = shlex.split(next(x for x in lines if x.startswith("command: "))[len("command: "):])
    added = dict(kv.split("=", 1) for kv in shlex.split(next(x for x in lines if x.startswith("environment: "))[13:]))
    code, out = run(command, {**env, **added}, timeout=240)
    assert code == 0, out
    check_reports(tmp_path / "reports", world=2, local_world=2, nodes=1, source="torchrun")
    assert sorted(p.name for p in (tmp_path / "logs").glob("rank-*.log")) == ["rank-0.log", "rank-1.log"]


def test_dry_run_keeps_user_settings_and_says_so_once(plain_env, capsys, tmp_path):
    plain_env.setenv("NCCL_NVLS_ENABLE", "1")
    assert dualflow_main(["launch", "--dry-run", "--log-dir", str(tmp_path), "--", "-m", "pkg.train"]) == 0
    out = capsys.readouterr().out
    assert out.count("NCCL_NVLS_ENABLE=1 (recommended 0)") == 1
    assert "NCCL_NVLS_ENABLE=0" not in out
    assert "-m dualflow.launcher.worker -m pkg.train" in out


@pytest.mark.parametrize("flags, env, match", [
    (["--nnodes", "2"], {}, "needs --rdzv-endpoint"),
    ([], {"SLURM_JOB_ID": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"}, "outside srun"),
    ([], {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"}, "already starts one process per GPU"),
    (["--nproc-per-node", "0"], {}, ">= 1"),
    (["--nproc-per-node", "many"], {}, "positive integer or 'auto'"),
    (["--nproc-per-node", "2.5"], {}, "positive integer or 'auto', got '2.5'"),
    (["--nnodes", "0"], {}, "--nnodes must be >= 1, got 0"),
    (["--max-restarts", "-1"], {}, "--max-restarts must be >= 0, got -1"),
    (["--nnodes", "2", "--rdzv-endpoint", "node0:port"], {}, "--rdzv-endpoint 'node0:port': expected HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "node0:65536"], {}, "a port from 1 to 65535"),
    (["--nnodes", "2", "--rdzv-endpoint", ":29400"], {}, "--rdzv-endpoint ':29400': expected HOST:PORT"),
    # the variables of the environment, named with their value
    ([], {"SLURM_JOB_ID": "4", "SLURM_JOB_NUM_NODES": "two"}, "SLURM_JOB_NUM_NODES='two': expected an integer >= 1"),
    ([], {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": ""}, "OMPI_COMM_WORLD_SIZE='': expected an integer"),
])
def test_refusals_exit_2_with_the_reason(plain_env, capsys, flags, env, match):
    for k, v in env.items():
        plain_env.setenv(k, v)
    assert dualflow_main(["launch", *flags, "--dry-run", "--", "train.py"]) == 2
    assert match in capsys.readouterr().err


def test_nothing_to_launch(plain_env):
    with pytest.raises(LauncherError, match="nothing to launch"):
        plan_launch([])


def test_auto_and_default_log_dir(plain_env):
    plan = plan_launch(["train.py"])
    import torch

    if not torch.cuda.is_available():
        assert plan.nproc_per_node == min(4, os.cpu_count()) and "no GPU" in plan.nproc_reason
    assert plan.log_dir.parent == (os.getcwd() / __import__("pathlib").Path("runs"))


@pytest.mark.slow
def test_two_agents_side_by_side(tmp_path):
    """Two `dualflow launch --nnodes 2` agents on one machine form one 4-rank job over c10d."""
    port, out = free_port(), tmp_path / "reports"
    env = clean_env()
    agents = [start(_launch("--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
                            "--log-dir", str(tmp_path / f"node{i}"), "--", str(JOB), str(out)), env) for i in range(2)]
    results = [wait(a, timeout=240) for a in agents]
    for code, text in results:
        assert code == 0, text
    reports = check_reports(out, world=4, local_world=2, nodes=2, source="torchrun")
    # Each agent wrote the logs of its own two ranks; the console shows rank 0 only.
    logs = {p.name: p.read_text() for i in range(2) for p in (tmp_path / f"node{i}").glob("rank-*.log")}
    assert sorted(logs) == [f"rank-{r}.log" for r in range(4)]
    for r in range(4):
        assert f"hello from rank {r} of 4" in logs[f"rank-{r}.log"]
    console = results[0][1] + results[1][1]
    assert "hello from rank 0 of 4" in console
    assert not any(f"hello from rank {r} of 4" in console for r in (1, 2, 3)), console
    assert all(r["env"]["DUALFLOW_LOG_DIR"] in (str(tmp_path / "node0"), str(tmp_path / "node1")) for r in reports)


@pytest.mark.slow
def test_restart_after_a_worker_dies_once(tmp_path):
    out = tmp_path / "reports"
    code, text = run(_launch("--nproc-per-node", "2", "--max-restarts", "1", "--log-dir", str(tmp_path / "logs"),
                             "--", str(JOB), str(out), "--die-once-on", "1"), clean_env(), timeout=240)
    assert code == 0, text
    reports = check_reports(out, world=2, local_world=2, nodes=1, source="torchrun")
    assert [r["attempt"] for r in reports] == [1, 1]
    # The failed attempt's output is kept beside the final one.
    assert "hello from rank 1 of 2 (attempt 0)" in (tmp_path / "logs" / "rank-1.attempt-0.log").read_text()
    assert "hello from rank 1 of 2 (attempt 1)" in (tmp_path / "logs" / "rank-1.log").read_text()


@pytest.mark.slow
def test_a_failure_names_the_rank_and_shows_its_traceback(tmp_path):
    code, text = run(_launch("--nproc-per-node", "2", "--log-dir", str(tmp_path), "--", str(JOB),
                             str(tmp_path / "reports"), "--raise-on", "1"), clean_env(), timeout=240)
    assert code == 1, text
    assert "rank      : 1 (local_rank: 1)" in text  # torchrun's failure report, from the error file
    assert "RuntimeError: deliberate failure on rank 1" in text
    assert f"rank 1 failed (exit code 1); its full output is in {tmp_path / 'rank-1.log'}" in text
    log = (tmp_path / "rank-1.log").read_text()
    assert "Traceback" in log and "deliberate failure on rank 1" in log
