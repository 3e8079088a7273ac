"""Where a process stands in a job, read from whichever launcher started it; the recommended NCCL settings.

Two questions, both answered from an environment mapping alone (no torch, no network), so that every
shape of SLURM, MPI and torchrun environment can be tested as plain data:

- :func:`detect_process`: which rank is this process? torchrun (``RANK``...), MPI (OpenMPI
  ``OMPI_COMM_WORLD_*``, MPICH/Intel ``PMI_RANK``/``PMI_SIZE``/``MPI_LOCALRANKID``, MVAPICH ``MV2_*``,
  PMIx ``PMIX_RANK``), a SLURM step with one task per process (``SLURM_PROCID``...), or a lone process.
- :func:`detect_site`: what should ``dualflow launch`` pass torchrun? A plain machine, or a SLURM step
  with one task per node whose nodelist gives the node count and the rendezvous host.

A launcher inside a launcher (torchrun in a per-GPU srun or mpirun) is refused with :class:`LauncherError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dualflow.launcher.nodelist import expand_tasks_per_node, hostnames


class LauncherError(RuntimeError):
    """The environment does not describe a job that can start; the message says how to fix it."""


@dataclass(frozen=True)
class Placement:
    """This process's place in the job, and the rendezvous address when the environment knows it."""

    source: str  # torchrun | env | slurm | openmpi | mpich | mvapich | pmix | single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str | None = None
    master_port: int | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size and 0 <= self.local_rank < self.local_world_size):
            raise LauncherError(
                f"inconsistent placement from {self.source}: rank {self.rank} of {self.world_size}, local rank "
                f"{self.local_rank} of {self.local_world_size}; expected 0 <= rank < world size and "
                "0 <= local rank < local world size (check the launcher's variables)")

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed's ``env://`` initialisation and torchrun-style scripts read."""
        env = {"RANK": self.rank, "WORLD_SIZE": self.world_size, "LOCAL_RANK": self.local_rank,
               "LOCAL_WORLD_SIZE": self.local_world_size, "GROUP_RANK": self.node_rank}
        if self.master_addr is not None:
            env["MASTER_ADDR"] = self.master_addr
        if self.master_port is not None:
            env["MASTER_PORT"] = self.master_port
        return {k: str(v) for k, v in env.items()}


@dataclass(frozen=True)
class MpiWorld:
    """What an MPI library reports about the world (filled in by mpi4py where variables are missing)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    num_nodes: int


# family, rank, size, local rank, local size. The first family whose rank variable is set wins.
_MPI_FAMILIES = (
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
     "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("pmix", "PMIX_RANK", None, None, None),
)

# Set-if-unset recommendations for every worker. Each entry: the names torch accepts (any one set by
# the user counts), and the value.
RECOMMENDED: tuple[tuple[tuple[str, ...], str], ...] = (
    # Abort the communicators on a collective error or timeout instead of hanging.
    (("TORCH_NCCL_ASYNC_ERROR_HANDLING",), "3"),
    # Flight recorder: keep the last collectives and dump them when a collective times out.
    (("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"), "2000"),
    (("TORCH_NCCL_DUMP_ON_TIMEOUT",), "1"),
    # NVLink SHARP / multicast objects stay off: they need fabric-manager support that shared
    # machines and containers often lack, and a failed multicast setup hangs the first collective.
    (("NCCL_NVLS_ENABLE",), "0"),
    (("TORCH_SYMM_MEM_DISABLE_MULTICAST",), "1"),
)
_DUMP_FILE = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")


# Every integer variable read from a launcher's environment, with the least value it may take (ranks and
# ids from 0, sizes and counts from 1) and, for ports, the most.
_RANKS = ("RANK", "LOCAL_RANK", "GROUP_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
          "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "MPI_LOCALRANKID", "PMIX_RANK",
          "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_ID", "SLURM_STEP_ID",
          "TORCHELASTIC_RESTART_COUNT")
_SIZES = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
          "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE", "PMI_SIZE", "MPI_LOCALNRANKS", "OMPI_MCA_orte_num_nodes",
          "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_NTASKS")
INT_VARIABLES: dict[str, tuple[int, int | None]] = {
    **{name: (0, None) for name in _RANKS}, **{name: (1, None) for name in _SIZES}, "MASTER_PORT": (1, 65535)}
_DIGITS = re.compile(r"\s*\d+\s*")


def env_int(environ: Mapping[str, str], name: str) -> int | None:
    """The value of the integer variable ``name`` (one of :data:`INT_VARIABLES`), None when it is unset.

    Raises :class:`LauncherError` naming the variable, the value and what is expected when the value is
    empty, not a whole number, or out of range.
    """
    low, high = INT_VARIABLES[name]
    value = environ.get(name)
    if value is None:
        return None
    n = int(value) if _DIGITS.fullmatch(value) else None
    if n is None or n < low or (high is not None and n > high):
        expected = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise LauncherError(f"{name}={value!r}: expected {expected}; correct or unset {name} in the environment "
                            "that starts the processes")
    return n


def launched(environ: Mapping[str, str]) -> bool:
    """Whether a launcher started this process as one of several (a world size above 1, or a PMIx rank)."""
    sizes = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
    return any((env_int(environ, v) or 1) > 1 for v in sizes) or env_int(environ, "PMIX_RANK") is not None


def _require(environ: Mapping[str, str], name: str, why: str) -> int:
    value = env_int(environ, name)
    if value is None:
        raise LauncherError(f"{name} is not set, but {why}")
    return value


def _check_place(source: str, rank: tuple[str, int], size: tuple[str, int], local_rank: tuple[str, int],
                 local_size: tuple[str, int]) -> None:
    """Ranks below their sizes, a node no larger than the world; the message names the variables."""
    problems = [f"{r[0]}={r[1]} is not below {n[0]}={n[1]}" for r, n in ((rank, size), (local_rank, local_size))
                if r[1] >= n[1]]
    if local_size[1] > size[1]:
        problems.append(f"{local_size[0]}={local_size[1]} exceeds {size[0]}={size[1]}")
    if problems:
        raise LauncherError(f"inconsistent placement from {source}: {'; '.join(problems)}; expected 0 <= rank < "
                            "world size and 0 <= local rank < local world size <= world size (check the launcher's "
                            "variables)")


def _slurm_step(environ: Mapping[str, str]) -> bool:
    """True inside an ``srun`` step (a batch script or salloc shell is not one)."""
    return "SLURM_STEP_NUM_TASKS" in environ and "SLURM_PROCID" in environ


def _first_set(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    return next(((n, environ[n]) for n in names if environ.get(n)), None)


def _slurm_tasks_here(environ: Mapping[str, str]) -> int:
    name, spec = _first_set(environ, ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")) or ("", "1")
    try:
        per_node = expand_tasks_per_node(spec)
    except ValueError as exc:
        raise LauncherError(f"{name}={spec!r}: {exc}") from None
    node = env_int(environ, "SLURM_NODEID") or 0
    if node >= len(per_node) or per_node[node] < 1:
        listing = f"{name}={spec!r}" if name else "SLURM_STEP_TASKS_PER_NODE (unset: one task on one node)"
        raise LauncherError(f"SLURM_NODEID={node} but {listing} gives node {node} no task "
                            f"({len(per_node)} node(s) listed)")
    return per_node[node]


def _slurm_nodes(environ: Mapping[str, str], resolve: Callable[[str], list[str]]) -> list[str]:
    found = _first_set(environ, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    if found is None:
        raise LauncherError("SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are unset inside a SLURM step; "
                            "cannot tell where the first node is")
    try:
        return resolve(found[1])
    except ValueError as exc:
        raise LauncherError(f"{found[0]}={found[1]!r}: {exc}") from None


def slurm_port(environ: Mapping[str, str]) -> int:
    """A rendezvous port every task of a SLURM step derives alike: ``MASTER_PORT``, else from the job id.

    The range 10000-29999 stays below Linux's ephemeral ports.
    """
    if (port := env_int(environ, "MASTER_PORT")) is not None:
        return port
    job = env_int(environ, "SLURM_JOB_ID") or 0
    step = env_int(environ, "SLURM_STEP_ID") or 0
    return 10000 + (job * 16 + step) % 20000


def _mpi_family(environ: Mapping[str, str]) -> tuple[str, str, str | None, str | None, str | None] | None:
    return next((f for f in _MPI_FAMILIES if f[1] in environ), None)


def _srun_started_ranks(environ: Mapping[str, str], mpi) -> bool:
    """Did srun start the MPI ranks itself (``srun --mpi=pmix``)? Then SLURM's variables describe them.

    mpirun inside a SLURM allocation starts its daemons with srun instead: SLURM's variables then
    describe the daemons (one per node), not the ranks, and only the MPI variables are right. The world
    sizes tell the two apart (the same answer on every rank).
    """
    if not _slurm_step(environ):
        return False
    size = env_int(environ, mpi[2]) if mpi[2] else None
    return size is None or size == env_int(environ, "SLURM_STEP_NUM_TASKS")


def _from_slurm(environ: Mapping[str, str], resolve: Callable[[str], list[str]]) -> Placement:
    nodes = _slurm_nodes(environ, resolve)
    why = "it is set in every srun task"
    rank, world = _require(environ, "SLURM_PROCID", why), _require(environ, "SLURM_STEP_NUM_TASKS", why)
    local_rank, local_world = _require(environ, "SLURM_LOCALID", why), _slurm_tasks_here(environ)
    _check_place("slurm", ("SLURM_PROCID", rank), ("SLURM_STEP_NUM_TASKS", world), ("SLURM_LOCALID", local_rank),
                 ("the tasks of this node in SLURM_STEP_TASKS_PER_NODE", local_world))
    return Placement(
        source="slurm", rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
        node_rank=env_int(environ, "SLURM_NODEID") or 0,
        num_nodes=env_int(environ, "SLURM_STEP_NUM_NODES") or len(nodes),
        master_addr=environ.get("MASTER_ADDR") or nodes[0],
        master_port=slurm_port(environ),
    )


def _from_mpi(environ: Mapping[str, str], family, mpi_world: Callable[[], MpiWorld] | None) -> Placement:
    name, rank_var, size_var, lrank_var, lsize_var = family
    values = [env_int(environ, v) if v else None for v in (rank_var, size_var, lrank_var, lsize_var)]
    if any(v is None for v in values):
        if mpi_world is None:
            missing = [v or f"({name} sets no such variable)" for v, x in zip(family[1:], values) if x is None]
            raise LauncherError(
                f"{name} started this process but {', '.join(missing)} is not set; install mpi4py "
                "(`pip install dualflow[mpi]`) so that the MPI library itself can be asked")
        world = mpi_world()
        values = [world.rank, world.world_size, world.local_rank, world.local_world_size]
        names = [f"the MPI library's {what}" for what in ("rank", "size", "local rank", "local size")]
        num_nodes = world.num_nodes
    else:
        names = [rank_var, size_var, lrank_var, lsize_var]
        num_nodes = env_int(environ, "OMPI_MCA_orte_num_nodes") or math.ceil(values[1] / values[3])
    rank, world_size, local_rank, local_world_size = values
    _check_place(name, *zip(names, values))
    return Placement(
        source=name, rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size,
        # Block placement (consecutive ranks share a node) is what mpirun and srun do by default.
        node_rank=rank // local_world_size, num_nodes=num_nodes,
        master_addr=environ.get("MASTER_ADDR") or None, master_port=env_int(environ, "MASTER_PORT"),
    )


def _from_torchrun(environ: Mapping[str, str]) -> Placement:
    rank = _require(environ, "RANK", "WORLD_SIZE is set")
    world = _require(environ, "WORLD_SIZE", "RANK is set")
    local_world = env_int(environ, "LOCAL_WORLD_SIZE")
    local_rank = env_int(environ, "LOCAL_RANK")
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    if local_rank is None or local_world is None:  # hand-set RANK/WORLD_SIZE: one node
        local_rank, local_world, names = rank, world, ("RANK", "WORLD_SIZE", "RANK", "WORLD_SIZE")
    _check_place("torchrun-style variables", *zip(names, (rank, world, local_rank, local_world)))
    nodes = env_int(environ, "GROUP_WORLD_SIZE") or math.ceil(world / local_world)
    return Placement(
        source="torchrun" if "TORCHELASTIC_RUN_ID" in environ else "env",
        rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
        node_rank=env_int(environ, "GROUP_RANK") if "GROUP_RANK" in environ else rank // local_world,
        num_nodes=nodes, master_addr=environ.get("MASTER_ADDR") or None, master_port=env_int(environ, "MASTER_PORT"),
    )


def _refuse_nested_torchrun(environ: Mapping[str, str], mpi) -> None:
    """torchrun's workers inherit the outer launcher's variables: several tasks per node means nesting."""
    if "TORCHELASTIC_RUN_ID" not in environ:
        return
    if _slurm_step(environ) and _slurm_tasks_here(environ) > 1:
        outer = (f"srun started {_slurm_tasks_here(environ)} tasks on this node "
                 f"(SLURM_STEP_TASKS_PER_NODE={environ.get('SLURM_STEP_TASKS_PER_NODE')})")
    elif mpi and mpi[4] and (env_int(environ, mpi[4]) or 1) > 1:
        outer = f"{mpi[0]} started {environ[mpi[4]]} processes on this node ({mpi[4]})"
    else:
        return
    raise LauncherError(
        f"torchrun runs inside a launcher that already starts one process per GPU: {outer}, and each of them "
        "started its own torchrun workers. Use one of the two: `srun --ntasks-per-node=1 dualflow launch ...` "
        "(torchrun starts the per-GPU processes), or `srun --ntasks-per-node=<gpus> python script.py` / "
        "`mpirun -n <gpus> python script.py` without torchrun (init_distributed maps their variables).")


def detect_process(
    environ: Mapping[str, str],
    resolve: Callable[[str], list[str]] = hostnames,
    mpi_world: Callable[[], MpiWorld] | None = None,
) -> Placement:
    """This process's :class:`Placement`, from the first launcher found in ``environ``.

    Order: torchrun-style variables (``RANK``/``WORLD_SIZE``), an MPI launcher (unless srun itself
    started the ranks, then SLURM's richer variables), a SLURM step, else a single process.
    ``resolve`` expands SLURM nodelists; ``mpi_world`` asks the MPI library when its variables are
    incomplete (PMIx sets only the rank).
    """
    mpi = _mpi_family(environ)
    if "RANK" in environ and "WORLD_SIZE" in environ:
        _refuse_nested_torchrun(environ, mpi)
        return _from_torchrun(environ)
    if mpi and not _srun_started_ranks(environ, mpi):
        return _from_mpi(environ, mpi, mpi_world)
    if _slurm_step(environ):
        return _from_slurm(environ, resolve)
    return Placement("single", 0, 1, 0, 1, 0, 1, environ.get("MASTER_ADDR") or None, env_int(environ, "MASTER_PORT"))


@dataclass(frozen=True)
class Site:
    """What ``dualflow launch`` tells torchrun about the nodes; ``rdzv_endpoint=None`` means standalone."""

    kind: str  # plain | slurm
    nnodes: int
    node_rank: int
    rdzv_endpoint: str | None
    rdzv_id: str
    description: str


def detect_site(
    environ: Mapping[str, str],
    nnodes: int | None = None,
    rdzv_endpoint: str | None = None,
    resolve: Callable[[str], list[str]] = hostnames,
) -> Site:
    """The node layout for ``dualflow launch``; ``nnodes``/``rdzv_endpoint`` are the user's flags (or None)."""
    if "TORCHELASTIC_RUN_ID" in environ:
        raise LauncherError(
            "dualflow launch runs inside a torchrun worker (TORCHELASTIC_RUN_ID is set): a launcher inside a "
            "launcher multiplies the processes. Run the script directly in the worker instead.")
    mpi = _mpi_family(environ)
    if mpi and not _srun_started_ranks(environ, mpi):
        size = env_int(environ, mpi[2]) if mpi[2] else None
        if size != 1:
            raise LauncherError(
                f"dualflow launch runs under {mpi[0]} ({mpi[1]} is set), which already starts one process "
                "per GPU; a torchrun in each would start GPUs x GPUs processes. Run the script directly "
                "(`mpirun -n <gpus> python script.py`: init_distributed maps the MPI variables), or start one "
                "`dualflow launch --nnodes N --rdzv-endpoint HOST:PORT` per node without mpirun.")
    if _slurm_step(environ):
        return _slurm_site(environ, nnodes, rdzv_endpoint, resolve)
    alloc_nodes = env_int(environ, "SLURM_JOB_NUM_NODES") or env_int(environ, "SLURM_NNODES") or 1
    if "SLURM_JOB_ID" in environ and alloc_nodes > 1 and rdzv_endpoint is None:
        raise LauncherError(
            f"this is a {alloc_nodes}-node SLURM allocation (job {environ['SLURM_JOB_ID']}), but dualflow launch "
            "runs outside srun, on one node only; falling back to localhost would make each node rendezvous "
            "with itself and hang. Start one launcher per node: `srun --ntasks-per-node=1 dualflow launch ...`.")
    n = nnodes or 1
    if n > 1 and rdzv_endpoint is None:
        raise LauncherError(
            f"--nnodes {n} needs --rdzv-endpoint HOST:PORT (an address of the first node that every node "
            "can reach); without it each node would rendezvous with itself.")
    if rdzv_endpoint is None:
        return Site("plain", 1, 0, None, "standalone", "plain machine, one node (standalone rendezvous)")
    return Site("plain", n, 0, rdzv_endpoint, environ.get("DUALFLOW_RDZV_ID") or "dualflow",
                f"plain machine, {n} node(s), c10d rendezvous at {rdzv_endpoint}")


def _slurm_site(environ: Mapping[str, str], nnodes: int | None, rdzv_endpoint: str | None,
                resolve: Callable[[str], list[str]]) -> Site:
    tasks_here = _slurm_tasks_here(environ)
    if tasks_here > 1:
        raise LauncherError(
            f"srun started {tasks_here} tasks on this node (SLURM_STEP_TASKS_PER_NODE="
            f"{environ.get('SLURM_STEP_TASKS_PER_NODE')}), and each would start its own torchrun workers. Use "
            "`srun --ntasks-per-node=1 dualflow launch ...` (torchrun starts one process per GPU), or drop "
            "dualflow launch: `srun --ntasks-per-node=<gpus> python script.py` with init_distributed.")
    nodes = _slurm_nodes(environ, resolve)
    step_nodes = env_int(environ, "SLURM_STEP_NUM_NODES") or len(nodes)
    if len(nodes) != step_nodes:
        raise LauncherError(f"SLURM_STEP_NUM_NODES={step_nodes} but the step's nodelist names {len(nodes)} hosts "
                            f"({', '.join(nodes[:4])}...)")
    if nnodes is not None and nnodes != step_nodes:
        raise LauncherError(f"--nnodes {nnodes} disagrees with the SLURM step, which has {step_nodes} node(s); "
                            "drop --nnodes under srun (it is read from SLURM) or change srun's --nodes")
    endpoint = rdzv_endpoint or f"{nodes[0]}:{slurm_port(environ)}"
    job = f"{environ.get('SLURM_JOB_ID', '0')}.{environ.get('SLURM_STEP_ID', '0')}"
    return Site("slurm", step_nodes, env_int(environ, "SLURM_NODEID") or 0, endpoint, f"slurm-{job}",
                f"SLURM job {job}, one task per node: {step_nodes} node(s), this is node "
                f"{env_int(environ, 'SLURM_NODEID') or 0}, c10d rendezvous at {endpoint}")


def recommended_env(environ: Mapping[str, str], log_dir: str | None = None) -> tuple[dict[str, str], list[str]]:
    """The variables to add (set-if-unset) and, per user value that differs from the recommendation, a note.

    With ``log_dir``, flight-recorder dumps go there (``nccl_trace_rank_N``) instead of /tmp.
    """
    add: dict[str, str] = {}
    differs: list[str] = []
    for names, value in RECOMMENDED:
        user = next((n for n in names if n in environ), None)
        if user is None:
            add[names[0]] = value
        elif environ[user] != value:
            differs.append(f"{user}={environ[user]} (recommended {value})")
    if log_dir and not any(n in environ for n in _DUMP_FILE):  # an empty DUALFLOW_LOG_DIR is no folder
        add[_DUMP_FILE[0]] = f"{log_dir.rstrip('/')}/nccl_trace_rank_"
    return add, differs
