"""The group index of the grouped GEMMs (``group_offsets``, ``masked_m``): what is malformed, the host check,
and :class:`Fp8ErrorFlag`, where the GEMMs record malformed indices read on the device.

Well formed:

- contiguous: ``0 <= group_offsets[g] <= group_offsets[g+1] <= T`` for every group g (T = rows of ``a``);
- masked: ``0 <= masked_m[g] <= M_max`` for every group g.

An index on the host is checked before anything runs. One on the device is checked by the kernels
themselves, which never touch memory outside their operands whatever it holds (they clamp it) and
record the first malformed group into an :class:`Fp8ErrorFlag`: no host synchronisation, and the error
is raised by :meth:`Fp8ErrorFlag.check` at a point where the caller synchronises anyway.
"""

from __future__ import annotations

import torch

# Layout of an error record (int64): which check failed (0: none), the group, the two values read (for
# masked_m the count and M_max), and the bound (T or M_max).
RECORD_SIZE = 5
_NONE, CONTIGUOUS, MASKED = 0, 1, 2
_NAMES = {CONTIGUOUS: "contiguous", MASKED: "masked"}


def first_malformed(values: list[int], op: str, bound: int) -> tuple[int, int, int] | None:
    """``(group, value, next value or bound)`` of the first malformed group of a host index, or None."""
    if op == "contiguous":
        for g in range(len(values) - 1):
            lo, hi = values[g], values[g + 1]
            if min(lo, hi) < 0 or max(lo, hi) > bound or hi < lo:
                return g, lo, hi
        return None
    for g, count in enumerate(values):
        if not 0 <= count <= bound:
            return g, count, bound
    return None


def describe(op: str, group: int, first: int, second: int, bound: int) -> str:
    """The error message for a malformed group (the same from the host check and from a device record)."""
    if op == "contiguous":
        problems = [what for what, bad in (
            ("negative", min(first, second) < 0),
            (f"beyond the T = {bound} rows of a", max(first, second) > bound),
            ("decreasing", second < first)) if bad]
        return (f"fp8_grouped_gemm: group_offsets must be non-decreasing within [0, T = {bound}] (group g owns "
                f"rows group_offsets[g]:group_offsets[g+1]); group {group} has group_offsets[{group}] = {first}, "
                f"group_offsets[{group + 1}] = {second} ({', '.join(problems)}). Build the offsets as a cumulative "
                "sum of non-negative row counts that add up to at most a.shape[0]")
    return (f"fp8_grouped_gemm: masked_m[g] must lie in [0, M_max = {bound}] (a is [G, M_max, K]); group {group} "
            f"has masked_m[{group}] = {first}. Count the valid rows of each group, at most a.shape[1]")


def check_on_host(values: list[int], op: str, bound: int) -> None:
    """Raise ``ValueError`` naming the first malformed group of a host index (``index.tolist()``)."""
    found = first_malformed(values, op, bound)
    if found is not None:
        group, first, second = found
        raise ValueError(describe(op, group, first, second, bound))


def record_on_device(flag: torch.Tensor, index: torch.Tensor, op: str, bound: int) -> None:
    """Record the first malformed group of ``index`` into ``flag`` with torch operations on the device (no
    host synchronisation): the calls that run no kernel (empty operands) check their index this way."""
    v = index.to(torch.int64)
    if op == "contiguous":
        lo, hi = v[:-1], v[1:]
        bad = (torch.minimum(lo, hi) < 0) | (torch.maximum(lo, hi) > bound) | (hi < lo)
    else:
        lo, hi = v, torch.full_like(v, bound)
        bad = (v < 0) | (v > bound)
    if bad.numel() == 0:
        return
    g = torch.argmax(bad.to(torch.int32)).view(1)  # the first malformed group, when there is one
    code = CONTIGUOUS if op == "contiguous" else MASKED
    # index_select, not lo[g]: indexing with a tensor scalar would read it back to the host
    record = torch.cat([torch.full_like(g, code), g, lo.index_select(0, g), hi.index_select(0, g),
                        torch.full_like(g, bound)])
    write = bad.any() & (flag[0] == _NONE)  # the first error stays
    flag.copy_(torch.where(write, record, flag))


class Fp8ErrorFlag:
    """A small device tensor in which the grouped GEMMs record malformed ``group_offsets``/``masked_m`` read
    on the device, without a host synchronisation; :meth:`check` raises the error later.

    Pass one as ``fp8_grouped_gemm(..., errors=flag)`` and call ``flag.check()`` where the program
    synchronises anyway (after a step, when the loss is read). It keeps the first error recorded since it
    was made or last checked. It is one tensor write per malformed call, so it works inside CUDA graphs.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.record = torch.zeros(RECORD_SIZE, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.record.device

    def check(self) -> None:
        """Raise ``ValueError`` describing the first malformed index recorded, and clear it (synchronises)."""
        code, group, first, second, bound = self.record.tolist()
        if code == _NONE:
            return
        self.clear()
        raise ValueError(describe(_NAMES[code], group, first, second, bound)
                         + " (recorded on the device by an earlier call; its output rows are unspecified)")

    def clear(self) -> None:
        self.record.zero_()

    def __repr__(self) -> str:
        return f"Fp8ErrorFlag(device={self.device})"
