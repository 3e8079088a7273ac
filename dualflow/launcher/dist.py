"""``init_distributed``: one call that starts torch.distributed however the script was launched."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dualflow.launcher.env import LauncherError, MpiWorld, Placement, detect_process, recommended_env
from dualflow.utils.logging import get_logger

_MPI_SOURCES = {"openmpi", "mpich", "mvapich", "pmix"}
_ADDRESS_BYTES = 512  # rank 0's "HOST PORT", broadcast over MPI


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: ranks, node count, its device and the process group's backend."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    num_nodes: int
    device: torch.device
    backend: str
    source: str  # which launcher's variables were used: torchrun, slurm, openmpi, mpich, ...

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _mpi_comm() -> Any:
    try:
        from mpi4py import MPI
    except ImportError:
        raise LauncherError(
            "an MPI launcher started this process without MASTER_ADDR/MASTER_PORT, and mpi4py (which would "
            "broadcast rank 0's address) is not installed: `pip install dualflow[mpi]`, or pass the address "
            "(`mpirun -x MASTER_ADDR=<first host> -x MASTER_PORT=29500 ...`)") from None
    return MPI


def _mpi_world() -> MpiWorld:
    """Ask the MPI library itself (for launchers whose variables are incomplete, such as PMIx)."""
    mpi = _mpi_comm()
    world = mpi.COMM_WORLD
    local = world.Split_type(mpi.COMM_TYPE_SHARED)
    nodes = world.allreduce(1 if local.Get_rank() == 0 else 0)
    result = MpiWorld(world.Get_rank(), world.Get_size(), local.Get_rank(), local.Get_size(), nodes)
    local.Free()
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _routable_address() -> str:
    """An address of this host that other nodes can reach: the hostname's, unless it is loopback."""
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        return host
    if not addr.startswith("127."):
        return addr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; this picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return host


def _rendezvous_address(p: Placement) -> tuple[str, int]:
    """MASTER_ADDR/MASTER_PORT: from the environment, else rank 0's address broadcast over MPI."""
    if p.master_addr is not None and p.master_port is not None:
        return p.master_addr, p.master_port
    if p.world_size == 1:
        return p.master_addr or "127.0.0.1", p.master_port or _free_port()
    if p.source not in _MPI_SOURCES:
        raise LauncherError(
            f"MASTER_ADDR/MASTER_PORT are not set for a {p.world_size}-process job started by {p.source}; "
            "export both (the first node's address and a free port) before starting the processes")
    world = _mpi_comm().COMM_WORLD
    # A fixed-size byte buffer, not a pickled object: the address is all that is exchanged, and the other
    # ranks then only parse text (docs/launcher.md, Trust).
    buf = bytearray(_ADDRESS_BYTES)
    if world.Get_rank() == 0:
        addr = p.master_addr or ("127.0.0.1" if p.num_nodes == 1 else _routable_address())
        text = f"{addr} {p.master_port or _free_port()}".encode()[:_ADDRESS_BYTES]  # a host name: <= 253 bytes
        buf[: len(text)] = text
    world.Bcast(buf, root=0)
    addr, _, port = bytes(buf).rstrip(b"\0").decode("utf-8", "replace").rpartition(" ")
    if not addr or not port.isdigit():
        raise LauncherError(f"the rendezvous address broadcast by MPI rank 0 is malformed: {bytes(buf)[:64]!r}; "
                            "export MASTER_ADDR and MASTER_PORT instead")
    return addr, int(port)


def _pick_backend(backend: str) -> str:
    cuda = torch.cuda.is_available()
    if backend == "auto":
        return "nccl" if cuda and dist.is_nccl_available() else "gloo"
    if "nccl" in backend and not cuda:
        raise LauncherError(f"backend {backend!r} needs CUDA, and torch sees no GPU; use backend='gloo' or 'auto'")
    return backend


def _bind_device(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise LauncherError(
            f"LOCAL_RANK={local_rank} but this process sees {count} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); start at most {count} processes per node "
            f"(--nproc-per-node {count}) or make every GPU visible to every process")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _as_timedelta(timeout: float | timedelta | None) -> timedelta | None:
    if timeout is None or isinstance(timeout, timedelta):
        return timeout
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    return timedelta(seconds=timeout)


def init_distributed(backend: str = "auto", timeout: float | timedelta | None = None) -> DistContext:
    """Start the default process group from whatever launched this process, and bind its GPU.

    Reads torchrun's, SLURM's or an MPI launcher's variables (see :mod:`dualflow.launcher.env`), exports
    the torchrun-style ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``LOCAL_WORLD_SIZE``/``MASTER_*`` for the
    rest of the program, adds the recommended NCCL settings where unset (the user's values win), binds
    ``cuda:LOCAL_RANK`` and calls ``init_process_group``. ``backend="auto"`` is NCCL with CUDA, else gloo;
    ``timeout`` (seconds or a timedelta) bounds every collective. Called again, it returns the same
    answer without re-initialising.
    """
    place = detect_process(os.environ, mpi_world=_mpi_world)
    chosen = _pick_backend(backend)
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (place.rank, place.world_size):
            raise LauncherError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but the environment says rank {place.rank} of {place.world_size}")
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return DistContext(place.rank, place.world_size, place.local_rank, place.local_world_size, place.num_nodes,
                           device, dist.get_backend(), place.source)

    add, differs = recommended_env(os.environ, os.environ.get("DUALFLOW_LOG_DIR"))
    os.environ.update(add)
    log = get_logger("dualflow.launcher")
    # Under `dualflow launch` the launcher has reported these already, once for the job.
    if differs and place.rank == 0 and "DUALFLOW_LAUNCH" not in os.environ:
        log.warning("keeping user settings that differ from dualflow's recommendation: %s", ", ".join(differs))

    addr, port = _rendezvous_address(place)
    os.environ.update(place.torch_env())
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    device = _bind_device(place.local_rank)
    kwargs: dict[str, Any] = {"timeout": _as_timedelta(timeout)} if timeout is not None else {}
    if device.type == "cuda" and "nccl" in chosen:
        kwargs["device_id"] = device  # eager NCCL init: a broken fabric fails here, not in the first step
    dist.init_process_group(chosen, init_method="env://", rank=place.rank, world_size=place.world_size, **kwargs)
    if place.rank == 0:
        log.info("init_distributed: %d rank(s) on %d node(s) from %s, backend %s, rendezvous %s:%d",
                 place.world_size, place.num_nodes, place.source, chosen, addr, port)
    return DistContext(place.rank, place.world_size, place.local_rank, place.local_world_size, place.num_nodes,
                       device, chosen, place.source)
