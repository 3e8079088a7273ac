"""Fixtures of the launcher tests: a private single-node SLURM cluster for the session."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.launcher.slurm_cluster import SlurmCluster, missing_programs


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    missing = missing_programs()
    if missing:
        pytest.skip(f"SLURM test cluster: {', '.join(missing)} not installed (as root: `make sysdeps`, which "
                    "installs slurmd slurmctld slurm-client munge)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception as exc:
        cluster.stop()
        if os.geteuid() != 0:
            pytest.skip(f"SLURM test cluster did not start without root ({exc})")
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def mpirun():
    path = shutil.which("mpirun")
    if path is None:
        pytest.skip("mpirun not installed (as root: `make sysdeps`, which installs openmpi-bin)")
    return path
