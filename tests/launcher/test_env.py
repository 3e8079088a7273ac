"""Environment mapping: every launcher's variables -> rank/world/local/node, and the launch site."""

from __future__ import annotations

import re

import pytest

from dualflow.launcher.env import (
    INT_VARIABLES,
    LauncherError,
    MpiWorld,
    Placement,
    detect_process,
    detect_site,
    launched,
    recommended_env,
    slurm_port,
)
from dualflow.launcher.nodelist import expand_nodelist


def _process(env, **kw):
    return detect_process(env, resolve=expand_nodelist, **kw)


def _site(env, **kw):
    return detect_site(env, resolve=expand_nodelist, **kw)


def slurm_task(procid, localid, nodeid, ntasks, nnodes, per_node, nodelist="gpu[07-08]", job="123", step="0"):
    """The variables srun gives one task of a step."""
    return {"SLURM_JOB_ID": job, "SLURM_STEP_ID": step, "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
            "SLURM_NODEID": str(nodeid), "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_NUM_NODES": str(nnodes),
            "SLURM_STEP_TASKS_PER_NODE": per_node, "SLURM_STEP_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist,
            "SLURM_NTASKS": str(ntasks), "SLURM_JOB_NUM_NODES": str(nnodes)}


OPENMPI = {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_NODE_RANK": "2", "OMPI_MCA_orte_num_nodes": "2",
           "PMIX_RANK": "6", "PMIX_NAMESPACE": "1101856769"}
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}


@pytest.mark.parametrize("env, expected", [
    ({}, Placement("single", 0, 1, 0, 1, 0, 1)),
    (TORCHRUN, Placement("torchrun", 3, 4, 1, 2, 1, 2, "node0", 29400)),
    # torchrun under `srun --ntasks-per-node=1`: torchrun's variables win, SLURM's describe the agents.
    ({**slurm_task(1, 0, 1, 2, 2, "1(x2)"), **TORCHRUN}, Placement("torchrun", 3, 4, 1, 2, 1, 2, "node0", 29400)),
    # RANK/WORLD_SIZE set by hand: one node.
    ({"RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     Placement("env", 2, 3, 2, 3, 0, 1, "h", 1)),
    (OPENMPI, Placement("openmpi", 6, 8, 2, 4, 1, 2)),
    ({**OPENMPI, "MASTER_ADDR": "h0", "MASTER_PORT": "5000"}, Placement("openmpi", 6, 8, 2, 4, 1, 2, "h0", 5000)),
    # mpirun inside a SLURM allocation: SLURM's variables describe mpirun's daemons (2), not the 8 ranks.
    ({**slurm_task(1, 0, 1, 2, 2, "1(x2)"), **OPENMPI}, Placement("openmpi", 6, 8, 2, 4, 1, 2)),
    # OpenMPI without the node count: from the sizes.
    ({k: v for k, v in OPENMPI.items() if k != "OMPI_MCA_orte_num_nodes"}, Placement("openmpi", 6, 8, 2, 4, 1, 2)),
    # MPICH and Intel MPI (Hydra).
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
     Placement("mpich", 3, 4, 1, 2, 1, 2)),
    ({"PMI_RANK": "0", "PMI_SIZE": "1", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"},
     Placement("mpich", 0, 1, 0, 1, 0, 1)),
    ({"MV2_COMM_WORLD_RANK": "5", "MV2_COMM_WORLD_SIZE": "16", "MV2_COMM_WORLD_LOCAL_RANK": "5",
      "MV2_COMM_WORLD_LOCAL_SIZE": "8"}, Placement("mvapich", 5, 16, 5, 8, 0, 2)),
    # One task per GPU with srun: 2 nodes x 4.
    (slurm_task(5, 1, 1, 8, 2, "4(x2)"), Placement("slurm", 5, 8, 1, 4, 1, 2, "gpu07", 10000 + 123 * 16)),
    ({**slurm_task(5, 1, 1, 8, 2, "4(x2)"), "MASTER_ADDR": "ib-gpu07", "MASTER_PORT": "23456"},
     Placement("slurm", 5, 8, 1, 4, 1, 2, "ib-gpu07", 23456)),
    # Uneven tasks per node: 3 on the first node, 1 on the second.
    (slurm_task(3, 0, 1, 4, 2, "3,1", "n[1-2]"), Placement("slurm", 3, 4, 0, 1, 1, 2, "n1", 10000 + 123 * 16)),
    (slurm_task(0, 0, 0, 1, 1, "1", "localhost"), Placement("slurm", 0, 1, 0, 1, 0, 1, "localhost", 10000 + 123 * 16)),
    # srun --mpi=pmix / pmi2 starting the ranks itself: SLURM's variables are the richer ones.
    ({**slurm_task(5, 1, 1, 8, 2, "4(x2)"), "PMIX_RANK": "5"}, Placement("slurm", 5, 8, 1, 4, 1, 2, "gpu07", 11968)),
    ({**slurm_task(5, 1, 1, 8, 2, "4(x2)"), "PMI_RANK": "5", "PMI_SIZE": "8"},
     Placement("slurm", 5, 8, 1, 4, 1, 2, "gpu07", 11968)),
    # A batch script (no srun step) with --ntasks=3: still one process.
    ({"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "3", "SLURM_TASKS_PER_NODE": "3",
      "SLURM_JOB_NODELIST": "n1"}, Placement("single", 0, 1, 0, 1, 0, 1)),
])
def test_detect_process(env, expected):
    assert _process(env) == expected


def test_pmix_alone_asks_the_mpi_library():
    env = {"PMIX_RANK": "2", "PMIX_NAMESPACE": "prterun-x@1"}
    with pytest.raises(LauncherError, match="mpi4py"):
        _process(env)
    got = _process(env, mpi_world=lambda: MpiWorld(rank=2, world_size=4, local_rank=0, local_world_size=2, num_nodes=2))
    assert got == Placement("pmix", 2, 4, 0, 2, 1, 2)


def test_mpich_without_local_variables_asks_the_mpi_library():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2"}
    with pytest.raises(LauncherError, match="MPI_LOCALRANKID"):
        _process(env)
    assert _process(env, mpi_world=lambda: MpiWorld(1, 2, 1, 2, 1)) == Placement("mpich", 1, 2, 1, 2, 0, 1)


@pytest.mark.parametrize("env, match", [
    # torchrun started inside a per-GPU srun / mpirun: every task started its own workers.
    ({**slurm_task(5, 1, 1, 8, 2, "4(x2)"), **TORCHRUN}, "ntasks-per-node=1"),
    ({**OPENMPI, **TORCHRUN}, "one process per GPU"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "inconsistent placement .*: RANK=4 is not below WORLD_SIZE=4"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, r"RANK='x': expected an integer >= 0"),
    ({k: v for k, v in slurm_task(0, 0, 0, 2, 1, "2").items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID"),
    ({**slurm_task(0, 0, 3, 2, 2, "1(x2)")}, "SLURM_NODEID=3"),
])
def test_detect_process_refuses(env, match):
    with pytest.raises(LauncherError, match=match):
        _process(env)


def test_torch_env():
    p = Placement("slurm", 5, 8, 1, 4, 1, 2, "gpu07", 11968)
    assert p.torch_env() == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                             "GROUP_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "11968"}
    assert "MASTER_ADDR" not in Placement("openmpi", 0, 2, 0, 2, 0, 1).torch_env()


def test_slurm_port_is_shared_by_a_step_and_differs_between_jobs():
    ports = {slurm_port(slurm_task(r, r % 4, r // 4, 8, 2, "4(x2)")) for r in range(8)}
    assert len(ports) == 1 and 10000 <= ports.pop() < 30000
    others = {slurm_port(slurm_task(0, 0, 0, 1, 1, "1", job=str(j))) for j in range(100, 200)}
    assert len(others) == 100
    assert slurm_port({"MASTER_PORT": "4242", "SLURM_JOB_ID": "1"}) == 4242


# ---- dualflow launch's site ------------------------------------------------------------------------

def test_plain_single_node_is_standalone():
    site = _site({})
    assert (site.kind, site.nnodes, site.rdzv_endpoint) == ("plain", 1, None)


def test_plain_multi_node_needs_an_endpoint():
    with pytest.raises(LauncherError, match="--rdzv-endpoint"):
        _site({}, nnodes=2)
    site = _site({}, nnodes=2, rdzv_endpoint="10.0.0.1:29400")
    assert (site.kind, site.nnodes, site.rdzv_endpoint) == ("plain", 2, "10.0.0.1:29400")


def test_slurm_one_task_per_node():
    env = slurm_task(1, 0, 1, 2, 2, "1(x2)", nodelist="gpu[01-02]", job="77", step="3")
    site = _site(env)
    assert (site.kind, site.nnodes, site.node_rank) == ("slurm", 2, 1)
    assert site.rdzv_endpoint == f"gpu01:{10000 + 77 * 16 + 3}" and site.rdzv_id == "slurm-77.3"
    assert "one task per node" in site.description
    assert _site({**env, "MASTER_PORT": "1234"}).rdzv_endpoint == "gpu01:1234"
    assert _site(env, rdzv_endpoint="ib0:9").rdzv_endpoint == "ib0:9"
    assert _site(env, nnodes=2).nnodes == 2
    with pytest.raises(LauncherError, match="disagrees"):
        _site(env, nnodes=3)


@pytest.mark.parametrize("env, match", [
    (slurm_task(5, 1, 1, 8, 2, "4(x2)"), "ntasks-per-node=1"),  # torchrun inside a per-GPU srun
    ({"SLURM_JOB_ID": "5", "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_PROCID": "0"},
     "4-node SLURM allocation"),  # a batch script on a multi-node allocation, outside srun
    (OPENMPI, "already starts one process per GPU"),
    (TORCHRUN, "inside a torchrun worker"),
    ({**slurm_task(0, 0, 0, 2, 2, "1(x2)"), "SLURM_STEP_NUM_NODES": "3"}, "SLURM_STEP_NUM_NODES=3"),
])
def test_launch_site_refuses(env, match):
    with pytest.raises(LauncherError, match=match):
        _site(env)


def test_an_empty_rendezvous_id_is_the_default():
    assert _site({"DUALFLOW_RDZV_ID": ""}, nnodes=2, rdzv_endpoint="n0:29400").rdzv_id == "dualflow"
    assert _site({"DUALFLOW_RDZV_ID": "run7"}, nnodes=2, rdzv_endpoint="n0:29400").rdzv_id == "run7"


def test_launch_site_accepts_single_node_allocations_and_single_rank_mpi():
    assert _site({"SLURM_JOB_ID": "5", "SLURM_JOB_NUM_NODES": "1", "SLURM_PROCID": "0"}).rdzv_endpoint is None
    one = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    assert _site(one).kind == "plain"


# ---- malformed variables -----------------------------------------------------------------------------

MPICH = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
MVAPICH = {"MV2_COMM_WORLD_RANK": "5", "MV2_COMM_WORLD_SIZE": "16", "MV2_COMM_WORLD_LOCAL_RANK": "5",
           "MV2_COMM_WORLD_LOCAL_SIZE": "8"}
ALLOCATION = {"SLURM_JOB_ID": "5", "SLURM_PROCID": "0"}  # a batch script, outside srun
# every integer variable: an environment in which it is read, and what reads it
READERS = {
    **{v: (TORCHRUN, _process) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                         "GROUP_WORLD_SIZE", "MASTER_PORT")},
    **{v: (OPENMPI, _process) for v in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                                        "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_MCA_orte_num_nodes")},
    **{v: (MVAPICH, _process) for v in MVAPICH},
    **{v: (MPICH, _process) for v in MPICH},
    "PMIX_RANK": ({"PMIX_RANK": "2"}, lambda env: _process(env, mpi_world=lambda: MpiWorld(2, 4, 0, 2, 2))),
    **{v: (slurm_task(5, 1, 1, 8, 2, "4(x2)"), _process) for v in (
        "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NUM_NODES",
        "SLURM_JOB_ID", "SLURM_STEP_ID")},
    **{v: (ALLOCATION, _site) for v in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES")},
    "SLURM_NTASKS": ({}, launched),
}
READ_BY_THE_TRAIN_COMMAND = {"TORCHELASTIC_RESTART_COUNT"}  # tests/train/test_config_keys.py


def test_every_integer_variable_is_tested():
    assert set(READERS) | READ_BY_THE_TRAIN_COMMAND == set(INT_VARIABLES)


@pytest.mark.parametrize("value", ["", "abc", "-1", "2.5"])
@pytest.mark.parametrize("name", sorted(READERS))
def test_a_malformed_variable_is_named_with_its_value(name, value):
    base, read = READERS[name]
    read(base)  # the well-formed environment is accepted
    with pytest.raises(LauncherError, match="^" + re.escape(f"{name}={value!r}: expected an integer ")):
        read({**base, name: value})


@pytest.mark.parametrize("name, value, expected", [
    ("MASTER_PORT", "0", "from 1 to 65535"), ("MASTER_PORT", "65536", "from 1 to 65535"),
    ("WORLD_SIZE", "0", ">= 1"), ("SLURM_STEP_NUM_TASKS", "0", ">= 1"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "0", ">= 1"),
])
def test_a_variable_out_of_range_is_named(name, value, expected):
    base, read = READERS[name]
    with pytest.raises(LauncherError, match=re.escape(f"{name}={value!r}: expected an integer {expected}")):
        read({**base, name: value})


@pytest.mark.parametrize("env, match", [
    ({**slurm_task(0, 0, 0, 2, 1, "2"), "SLURM_STEP_TASKS_PER_NODE": "2(x"},
     r"SLURM_STEP_TASKS_PER_NODE='2\(x': bad tasks-per-node entry"),
    ({**slurm_task(0, 0, 0, 2, 1, "2"), "SLURM_STEP_NODELIST": "gpu[1-"}, r"SLURM_STEP_NODELIST='gpu\[1-': unclosed"),
    ({**OPENMPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "9"}, "OMPI_COMM_WORLD_LOCAL_SIZE=9 exceeds OMPI_COMM_WORLD_SIZE=8"),
    ({**slurm_task(0, 2, 0, 2, 1, "2")}, r"SLURM_LOCALID=2 is not below the tasks of this node .*=2"),
])
def test_inconsistent_or_malformed_lists_name_the_variable(env, match):
    with pytest.raises(LauncherError, match=match):
        _process(env)


def test_launched_means_one_of_several_processes():
    assert not launched({}) and not launched({"SLURM_NTASKS": "1", "WORLD_SIZE": "1"})
    assert launched({"WORLD_SIZE": "2"}) and launched({"PMIX_RANK": "0"}) and launched({"PMI_SIZE": "3"})


# ---- recommended settings --------------------------------------------------------------------------

def test_recommended_env_sets_only_what_is_unset():
    add, differs = recommended_env({})
    assert add == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_FR_BUFFER_SIZE": "2000",
                   "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    assert differs == []
    add, _ = recommended_env({}, log_dir="/logs/run1/")
    assert add["TORCH_FR_DUMP_TEMP_FILE"] == "/logs/run1/nccl_trace_rank_"
    add, _ = recommended_env({}, log_dir="")  # DUALFLOW_LOG_DIR set but empty: no folder (not /)
    assert "TORCH_FR_DUMP_TEMP_FILE" not in add


def test_recommended_env_keeps_user_values_and_names_those_that_differ():
    user = {"NCCL_NVLS_ENABLE": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_TRACE_BUFFER_SIZE": "100",
            "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/x/trace_"}
    add, differs = recommended_env(user, log_dir="/logs")
    assert add == {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    assert differs == ["TORCH_NCCL_TRACE_BUFFER_SIZE=100 (recommended 2000)", "NCCL_NVLS_ENABLE=1 (recommended 0)"]
