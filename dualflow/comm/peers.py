"""Set-up of the kernels' buffers across processes: failures every rank sees, CUDA IPC bookkeeping.

Making the buffers is a chain of collectives (agree on the geometry, exchange IPC handles, map them,
zero, barrier). A step that fails on one rank only must not leave the others waiting in the next
collective, so each step ends with :func:`agree`: every rank learns every rank's outcome and they all
raise the same error together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

IPC_HANDLE_BYTES = 64


def agree(group: dist.ProcessGroup | None, what: str, problem: str | None, values: dict[str, Any] | None = None,
          error: type[Exception] = ValueError) -> None:
    """Collective: raise the same ``error`` on every rank if any rank has a ``problem`` or ``values`` differ.

    Ranks' problems are listed by rank; differing values name the field and every rank's value.
    """
    table: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(table, (problem, values or {}), group=group)
    failed = [f"rank {r}: {p}" for r, (p, _) in enumerate(table) if p]
    if failed:
        raise error(f"{what} failed on {len(failed)} of {len(table)} ranks, so on every rank: " + "; ".join(failed))
    for key in table[0][1]:
        seen = [v.get(key) for _, v in table]
        if any(s != seen[0] for s in seen):
            raise error(f"{what}: ranks of the group disagree on {key}: {seen} (by rank); every rank must pass "
                        f"the same {key}")


def map_handles(handles: list[bytes], rank: int, own_ptr: int, own_handle: bytes, open_handle: Callable[[bytes], int],
                close: Callable[[int], None]) -> tuple[list[int], list[int]]:
    """Every rank's buffer as seen from this process, from the IPC handles all ranks exported (by rank).

    A process cannot open its own handle: rank ``rank``'s entry is ``own_ptr``; the other ranks' handles
    are opened in rank order. Returns (pointers by rank, the pointers opened here, to close later). If an
    open fails, the ones already opened are closed before the error propagates.
    """
    for r, h in enumerate(handles):
        if len(h) != IPC_HANDLE_BYTES:
            raise ValueError(f"CUDA IPC handle of rank {r} has {len(h)} bytes, expected {IPC_HANDLE_BYTES}")
        if not any(h):
            raise ValueError(f"rank {r} exported no buffer (all-zero CUDA IPC handle)")
    if bytes(handles[rank]) != bytes(own_handle):
        raise ValueError(f"the handle gathered for rank {rank} is not the one this rank exported: the ranks of the "
                         "group are out of step in making their buffers")
    if len({bytes(h) for h in handles}) != len(handles):
        raise ValueError("two ranks exported the same CUDA IPC handle: every rank of the group must be its own "
                         "process with its own buffer")
    ptrs: list[int] = []
    opened: list[int] = []
    try:
        for r, h in enumerate(handles):
            if r == rank:
                ptrs.append(own_ptr)
                continue
            ptr = open_handle(bytes(h))
            opened.append(ptr)
            ptrs.append(ptr)
    except BaseException:
        for ptr in opened:
            with contextlib.suppress(Exception):  # the open's error is the one to report
                close(ptr)
        raise
    return ptrs, opened
