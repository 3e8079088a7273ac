"""Argument checks that fail on every rank together, before any payload moves.

Each rank checks its own arguments locally, then all ranks exchange a fixed-size header (problem code
plus the values that must agree, such as ``num_experts``) in one small collective. If any rank found a
problem or the values differ, every rank raises ``ValueError``; the rank with the problem says what it
was. The header has the same size for every operation, so even mismatched calls (one rank in dispatch,
another in combine) meet in the same collective and fail instead of hanging.
"""

from __future__ import annotations

import enum

import torch
import torch.distributed as dist


class Problem(enum.IntEnum):
    NONE = 0
    PAYLOAD = 1
    TOPK_IDX = 2
    EXPERT_RANGE = 3
    TOPK_WEIGHTS = 4
    NUM_EXPERTS = 5
    HANDLE = 6
    LAYOUT = 7
    ARGUMENT = 8


_DESCRIPTION = {
    Problem.PAYLOAD: "invalid payload",
    Problem.TOPK_IDX: "invalid topk_idx",
    Problem.EXPERT_RANGE: "expert index outside [-1, num_experts)",
    Problem.TOPK_WEIGHTS: "invalid topk_weights",
    Problem.NUM_EXPERTS: "invalid num_experts",
    Problem.HANDLE: "invalid handle",
    Problem.LAYOUT: "invalid layout",
    Problem.ARGUMENT: "invalid argument",
}

# Values every rank must agree on; an operation leaves the ones it does not use at -1.
FIELDS = ("operation", "hidden", "num_experts", "topk", "payload", "weights", "expert_alignment",
          "expert_major", "handle", "grad", "backend", "num_sms", "ranks_per_node", "device", "checks")
OPERATIONS = {"Buffer()": 1, "dispatch": 2, "combine": 3}
# How a disagreeing field's codes are shown.
_SHOWN = {"payload": {1: "bfloat16", 2: "float32", 3: "float8_e4m3fn"},
          "backend": {0: "auto", 1: "torch", 2: "kernels"}, "device": {0: "cpu", 1: "cuda", 2: "cuda (shared_gpu)"},
          "checks": {0: "collective", 1: "first", 2: "local"}}


class CheckFailed(Exception):
    """Raised by local checks; carries the problem category for the header."""

    def __init__(self, problem: Problem, message: str) -> None:
        super().__init__(message)
        self.problem = problem


def require(condition: bool, problem: Problem, message: str) -> None:
    if not condition:
        raise CheckFailed(problem, message)


def agree(
    group: dist.ProcessGroup | None,
    device: torch.device,
    operation: str,
    values: dict[str, int],
    failure: CheckFailed | None,
) -> None:
    """Exchange the header with every rank of ``group``; raise ``ValueError`` on all ranks on any problem."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise KeyError(f"unknown agreement fields {sorted(unknown)}")
    header = [int(failure.problem) if failure else 0] + [
        OPERATIONS[operation] if name == "operation" else int(values.get(name, -1)) for name in FIELDS
    ]
    size = dist.get_world_size(group)
    me = dist.get_rank(group)
    mine = torch.tensor(header, dtype=torch.int64, device=device)
    table = torch.empty(size * mine.numel(), dtype=torch.int64, device=device)
    dist.all_to_all_single(table, mine.repeat(size), group=group)
    rows = table.view(size, -1).tolist()
    bad = [r for r, row in enumerate(rows) if row[0] != 0]
    if failure is not None:
        others = [r for r in bad if r != me]
        also = f" (rank(s) {others} of the group rejected their arguments too)" if others else ""
        raise ValueError(f"{operation} on rank {me}: {failure}{also}; nothing was sent") from None
    if bad:
        reasons = "; ".join(f"rank {r}: {_DESCRIPTION.get(Problem(rows[r][0]), 'invalid argument')}" for r in bad)
        raise ValueError(f"{operation} on rank {me}: other ranks of the group rejected their arguments ({reasons}); "
                         "nothing was sent. The error raised on those ranks says what to fix.")
    for i, name in enumerate(FIELDS, start=1):
        seen = [row[i] for row in rows]
        if len(set(seen)) > 1:
            if name == "operation":
                names = {v: k for k, v in OPERATIONS.items()}
                shown = [names.get(v, v) for v in seen]
                raise ValueError(f"ranks of the group are in different operations: {shown} (by rank); every rank "
                                 "must call dispatch/combine in the same order")
            shown = [_SHOWN.get(name, {}).get(v, v) for v in seen]
            raise ValueError(f"{operation}: ranks of the group disagree on {name}: {shown} (by rank); every rank "
                             f"of the expert-parallel group must pass the same {name}")
