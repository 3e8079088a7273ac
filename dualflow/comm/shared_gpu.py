"""Ranks sharing one GPU: the opt-in, and when their kernels can make progress together.

With ``Buffer(..., shared_gpu=True)`` or ``DUALFLOW_COMM_SHARED_GPU=1`` the ranks of a gloo group are
processes on one CUDA device (NCCL refuses two ranks on one GPU): the buffer communicates on that device,
host exchanges go over gloo, and the ``kernels`` backend maps the peers' buffers by CUDA IPC.

How the processes share the device decides what fits (docs/comm_kernels.md, "Ranks sharing one GPU"):

- **time slicing** (no MPS): one process's kernels run at a time; a kernel waiting for a peer keeps
  polling until its time slice ends, the peer's kernel runs in the next one. Only the blocks of one
  kernel must be resident together: ``num_sms`` SMs.
- **MPS**: the processes' kernels run at the same time and every rank's dispatch/combine waits for the
  others', so all of them must be resident at once: ``ranks x num_sms`` SMs. A client's SM limit
  (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) reserves nothing and clients may share one subset of SMs, so
  the whole group must fit in the smallest limit.
"""

from __future__ import annotations

import dataclasses
import os

ENV = "DUALFLOW_COMM_SHARED_GPU"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def requested(flag: bool | None) -> bool:
    """The mode asked for: ``flag`` when given, else ``$DUALFLOW_COMM_SHARED_GPU`` (unset: off)."""
    if flag is not None:
        if not isinstance(flag, bool):
            raise ValueError(f"shared_gpu must be True, False or None (read ${ENV}), got {flag!r}")
        return flag
    value = os.environ.get(ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"${ENV}={os.environ[ENV]!r}: expected 1 (ranks share one GPU) or 0")


@dataclasses.dataclass(frozen=True)
class DeviceSharing:
    """How one process uses its GPU: SMs of the device, whether it is an MPS client, SMs it may use."""

    sms: int
    mps: bool
    client_sms: int

    @property
    def mode(self) -> str:
        return "MPS" if self.mps else "time slicing"


def problem(num_sms: int, sharing: list[DeviceSharing]) -> str | None:
    """Why ``len(sharing)`` ranks sharing one GPU cannot run kernels on ``num_sms`` SMs each (None: they can)."""
    n = len(sharing)
    modes = {s.mps for s in sharing}
    if len(modes) > 1:
        clients = [r for r, s in enumerate(sharing) if s.mps]
        return (f"ranks {clients} are MPS clients and the others are not: start every rank after "
                "`nvidia-cuda-mps-control -d`, or none")
    sms = min(s.sms for s in sharing)
    if num_sms > sms:
        return f"num_sms={num_sms} exceeds the {sms} SMs of the GPU: a kernel's blocks must all be resident"
    if not modes.pop():
        return None  # time slicing: one rank's kernel at a time, each with the whole GPU
    limit = min(s.client_sms for s in sharing)
    if n * num_sms > limit:
        fit = limit // n // 2 * 2
        hint = f"pass num_sms <= {fit}" if fit >= 2 else f"use at most {limit // 2} ranks with num_sms=2"
        return (f"under MPS the kernels of all {n} ranks sharing this GPU run at once and wait for each other, "
                f"so {n} x num_sms={num_sms} = {n * num_sms} SMs must be resident together, but "
                f"{'each client may use' if limit < sms else 'the GPU has'} {limit}: {hint}, or run the "
                "ranks without MPS (time slicing)")
    return None
