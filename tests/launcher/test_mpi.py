"""`mpirun -n 4` starting a script that calls init_distributed (OpenMPI's variables -> torch.distributed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.dist import free_port
from tests.launcher.helpers import JOB, check_reports, clean_env, run


@pytest.fixture(scope="module")
def openmpi(mpirun):
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=60).stdout
    if "Open MPI" not in version and "OpenRTE" not in version:
        pytest.skip(f"these tests use OpenMPI's mpirun flags; found: {version.splitlines()[:1]}")
    flags = [mpirun, "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        flags.append("--allow-run-as-root")
    return flags


@pytest.mark.slow
def test_mpirun_four_ranks(openmpi, tmp_path):
    """Rank 0's address goes to every rank over mpi4py; without mpi4py it must come from the environment."""
    broadcast = importlib.util.find_spec("mpi4py") is not None
    env = clean_env() if broadcast else clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    code, out = run([*openmpi, "-n", "4", sys.executable, str(JOB), str(tmp_path)], env, timeout=240)
    assert code == 0, out
    reports = check_reports(tmp_path, world=4, local_world=4, nodes=1, source="openmpi")
    addresses = {(r["env"]["MASTER_ADDR"], r["env"]["MASTER_PORT"]) for r in reports}
    assert len(addresses) == 1
    if broadcast:  # one node: rank 0 offers the loopback address and a port it found free
        assert addresses.pop()[0] == "127.0.0.1"
    else:
        assert addresses.pop() == (env["MASTER_ADDR"], env["MASTER_PORT"])
