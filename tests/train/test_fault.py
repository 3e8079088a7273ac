"""A rank killed by SIGKILL after a checkpoint: the launcher restarts the group, which resumes and ends
bitwise where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dualflow.launcher.config import save_config
from tests.dist import run_workers
from tests.train.helpers import tiny, train_worker

ROOT = Path(__file__).resolve().parents[2]
PARALLEL = dict(pp=2, dp=1, microbatches=4)  # rank 1 is the second pipeline rank (DualPipeV)


def _final_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}  # a resumed step overwrites its first run


@pytest.mark.slow
def test_sigkill_after_checkpoint_restarts_and_matches_uninterrupted(tmp_path):
    steps = 12
    reference = run_workers(train_worker, 2, tiny(tmp_path / "ref", parallel=PARALLEL, train=dict(steps=steps),
                                                  checkpoint=dict(every=4)), timeout=180)[0][0]
    cfg = tiny(tmp_path / "run", parallel=PARALLEL, train=dict(steps=steps), checkpoint=dict(every=4))
    path = save_config(cfg, tmp_path / "job.toml")
    env = {**os.environ, "DUALFLOW_TEST_KILL_AFTER": "4", "PYTHONPATH": f"{ROOT}{os.pathsep}" +
           os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "dualflow", "launch", "--nproc-per-node", "2", "--max-restarts", "1",
                           "--log-dir", str(tmp_path / "logs"), "--", str(ROOT / "tests/train/fault_entry.py"),
                           str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out and "step-00000004" in out, out[-4000:]  # the kill happened, then a resume
    losses = _final_losses(tmp_path / "run")
    # Bitwise on any CPU: the checkpoint restores the exact bytes, and both runs execute the same operations
    # on the same shapes with one intra-op thread per process (tests/dist.py, fault_entry.py).
    assert losses[steps] == reference[steps]
    assert all(losses[s] == reference[s] for s in range(5, steps + 1))
