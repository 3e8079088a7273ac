"""Pipeline schedules as data: the IR, its text forms, and the generators of every schedule kind.

A :class:`Schedule` is, per rank, the ordered compute steps that rank runs, plus where each pipeline
stage lives. A step is an :class:`Action` (``F`` forward, ``B`` full backward, ``I`` backward for the
stage inputs only, ``W`` backward for the weights only) of one (stage, micro-batch), or an
:class:`Overlap` (``F&B``): the forward of one micro-batch run together with the backward of another.

Stages are numbered so that the stage fixes the direction of travel: ``chains`` lists, per direction,
the stages in the order data flows through them. DualPipe has two chains (stages ``0..P-1`` enter at
rank 0, stages ``P..2P-1`` enter at rank P-1, stage ``P+k`` running model part ``k``); every other kind
has one. Micro-batches are numbered per chain. Sends and receives are not part of a generated schedule:
:func:`dualflow.dualpipe.comms.add_communication` derives them from the compute order.

    >>> s = dualpipe(num_ranks=8, num_microbatches=20)
    >>> print(s.to_text())                  # compact; Schedule.from_text(...) reads it back
    >>> s.to_torch()                        # torch.distributed.pipelining's notation: '0F3', '(0F5;5B2)OVERLAP_F_B'
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Union

COMPUTE_KINDS = ("F", "B", "I", "W")
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")


class Action(NamedTuple):
    """``kind`` (F, B, I, W, or a communication kind) of ``stage`` for ``microbatch`` of that stage's chain."""

    kind: str
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"


class Overlap(NamedTuple):
    """F&B: ``forward`` (an F) and ``backward`` (a B or I) of two micro-batches run as one overlapped step."""

    forward: Action
    backward: Action
    kind = "F&B"

    def __str__(self) -> str:
        return f"{self.forward}&{self.backward}"


Step = Union[Action, Overlap]  # noqa: UP007 (a runtime alias, also on Python 3.10)


def parts(step: Step) -> tuple[Action, ...]:
    """The actions a step consists of: itself, or the forward and backward halves of an F&B."""
    return (step.forward, step.backward) if type(step) is Overlap else (step,)


@dataclass(frozen=True)
class Topology:
    """Where each stage sits in its chain: the stage before and after it (-1 at the ends)."""

    prev: tuple[int, ...]
    next: tuple[int, ...]
    chain: tuple[int, ...]
    position: tuple[int, ...]


@dataclass(frozen=True)
class Schedule:
    """Per-rank ordered steps plus stage placement; a value that can be compared, printed and parsed.

    ``placement[s]`` is the rank of stage ``s``; ``chains[c]`` the stages of direction ``c`` in data-flow
    order; ``microbatches[c]`` the number of micro-batches of direction ``c``; ``actions[r]`` rank ``r``'s
    steps in execution order.
    """

    name: str
    placement: tuple[int, ...]
    chains: tuple[tuple[int, ...], ...]
    microbatches: tuple[int, ...]
    actions: tuple[tuple[Step, ...], ...]

    @property
    def num_ranks(self) -> int:
        return len(self.actions)

    @property
    def num_stages(self) -> int:
        return len(self.placement)

    @property
    def num_microbatches(self) -> int:
        return sum(self.microbatches)

    @property
    def num_model_stages(self) -> int:
        """PP of the published formulas: the number of distinct model parts (DualPipe's copies count once)."""
        return max(len(c) for c in self.chains)

    @cached_property
    def topology(self) -> Topology:
        n = self.num_stages
        prev, nxt, chain, pos = [-1] * n, [-1] * n, [-1] * n, [-1] * n
        for c, stages in enumerate(self.chains):
            for i, s in enumerate(stages):
                chain[s], pos[s] = c, i
                if i:
                    prev[s], nxt[stages[i - 1]] = stages[i - 1], s
        return Topology(tuple(prev), tuple(nxt), tuple(chain), tuple(pos))

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages placed on ``rank``, in stage order."""
        return tuple(s for s, r in enumerate(self.placement) if r == rank)

    def replace_actions(self, actions: Sequence[Sequence[Step]]) -> Schedule:
        """The same placement and sizes with other per-rank steps (for edits and tests)."""
        return Schedule(self.name, self.placement, self.chains, self.microbatches,
                        tuple(tuple(a) for a in actions))

    # ---- text forms -------------------------------------------------------------------------------
    def to_text(self) -> str:
        """Compact text, one line per rank; :meth:`from_text` reads it back to an equal schedule."""
        lines = [
            "dualflow-schedule 1",
            f"name: {self.name}",
            f"placement: {' '.join(map(str, self.placement))}",
            "chains: " + " | ".join(" ".join(map(str, c)) for c in self.chains),
            f"microbatches: {' '.join(map(str, self.microbatches))}",
        ]
        lines += [f"rank {r}: {' '.join(map(str, steps))}" for r, steps in enumerate(self.actions)]
        return "\n".join(lines) + "\n"

    __str__ = to_text

    @classmethod
    def from_text(cls, text: str) -> Schedule:
        fields: dict[str, str] = {}
        rows: dict[int, tuple[Step, ...]] = {}
        for lineno, line in enumerate(text.strip().splitlines(), 1):
            head, sep, body = line.partition(":")
            if lineno == 1:
                if line.strip() != "dualflow-schedule 1":
                    raise ValueError(f"not a dualflow schedule: first line is {line!r}, expected 'dualflow-schedule 1'")
                continue
            if not sep:
                raise ValueError(f"line {lineno}: expected 'key: value', got {line!r}")
            if head.startswith("rank "):
                rows[int(head[5:])] = tuple(_parse_step(tok) for tok in body.split())
            else:
                fields[head.strip()] = body.strip()
        missing = {"name", "placement", "chains", "microbatches"} - set(fields)
        if missing:
            raise ValueError(f"schedule text lacks the fields {sorted(missing)}")
        if sorted(rows) != list(range(len(rows))):
            raise ValueError(f"schedule text has rank lines {sorted(rows)}; expected 0..{len(rows) - 1}")
        return cls(
            name=fields["name"],
            placement=tuple(int(x) for x in fields["placement"].split()),
            chains=tuple(tuple(int(x) for x in c.split()) for c in fields["chains"].split("|")),
            microbatches=tuple(int(x) for x in fields["microbatches"].split()),
            actions=tuple(rows[r] for r in range(len(rows))),
        )

    def to_torch(self) -> list[list[str]]:
        """Per-rank action strings in torch.distributed.pipelining's notation (``0F3``, ``(0F5;5B2)OVERLAP_F_B``)."""
        return [[_torch_str(step) for step in steps] for steps in self.actions]


_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")
_TORCH_PAIR_RE = re.compile(r"^\((.+);(.+)\)OVERLAP_F_B$")


def _parse_action(token: str) -> Action:
    m = _ACTION_RE.match(token.strip())
    if not m:
        raise ValueError(f"cannot parse action {token!r}; expected STAGE KIND MICROBATCH such as '3F7' or '0RECV_B2'")
    return Action(m.group(2), int(m.group(1)), int(m.group(3)))


def _parse_step(token: str) -> Step:
    token = token.strip()
    m = _TORCH_PAIR_RE.match(token)
    halves = (m.group(1), m.group(2)) if m else token.split("&") if "&" in token else None
    if halves is None:
        return _parse_action(token)
    fwd, bwd = (_parse_action(h) for h in halves)
    if fwd.kind != "F" or bwd.kind not in ("B", "I"):
        raise ValueError(f"overlapped step {token!r} must pair an F with a B or I")
    return Overlap(fwd, bwd)


def _torch_str(step: Step) -> str:
    return f"({step.forward};{step.backward})OVERLAP_F_B" if type(step) is Overlap else str(step)


def parse_torch(per_rank: Sequence[Sequence[object]]) -> tuple[tuple[Step, ...], ...]:
    """Per-rank steps from torch notation (strings or torch ``_Action`` objects); ``None`` spacers are dropped."""
    return tuple(tuple(_parse_step(str(a)) for a in row if a is not None) for row in per_rank)


# ---- generators -----------------------------------------------------------------------------------
def _check_sizes(kind: str, num_ranks: int, num_microbatches: int) -> None:
    for name, value in (("num_ranks", num_ranks), ("num_microbatches", num_microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{kind}: {name} must be a positive int, got {value!r}")


class _Builder:
    """Appends steps for one rank, numbering micro-batches per stage in order, and queueing W after I."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.fwd: dict[int, int] = {}
        self.bwd: dict[int, int] = {}
        self.pending_w: deque[tuple[int, int]] = deque()

    def _f(self, stage: int) -> Action:
        mb = self.fwd.get(stage, 0)
        self.fwd[stage] = mb + 1
        return Action("F", stage, mb)

    def _b(self, stage: int, split: bool) -> Action:
        mb = self.bwd.get(stage, 0)
        self.bwd[stage] = mb + 1
        if split:
            self.pending_w.append((stage, mb))
        return Action("I" if split else "B", stage, mb)

    def F(self, stage: int) -> None:
        self.steps.append(self._f(stage))

    def B(self, stage: int, split: bool = False) -> None:
        """A full backward, or with ``split`` an I whose W is queued for a later :meth:`W`."""
        self.steps.append(self._b(stage, split))

    def W(self) -> None:
        """The oldest queued weight-gradient step, if any."""
        if self.pending_w:
            stage, mb = self.pending_w.popleft()
            self.steps.append(Action("W", stage, mb))

    def FB(self, forward_stage: int, backward_stage: int) -> None:
        self.steps.append(Overlap(self._f(forward_stage), self._b(backward_stage, False)))


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Schedule:
    """1F1B: rank r runs P-1-r warm-up forwards, then alternates one forward and one backward."""
    _check_sizes("1f1b", num_ranks, num_microbatches)
    P, m = num_ranks, num_microbatches
    actions = []
    for r in range(P):
        b = _Builder()
        warmup = min(P - 1 - r, m)
        for _ in range(warmup):
            b.F(r)
        for _ in range(m - warmup):
            b.F(r)
            b.B(r)
        for _ in range(warmup):
            b.B(r)
        actions.append(tuple(b.steps))
    return Schedule("1f1b", tuple(range(P)), (tuple(range(P)),), (m,), tuple(actions))


def zb1p(num_ranks: int, num_microbatches: int) -> Schedule:
    """Zero-bubble ZB-H1: 1F1B with the backward split into I and W, rank r deferring r of its W's to the end.

    Warm-up forwards as 1F1B; then r steps of F + I (their W's wait); then F + I + W; then I + W; then the
    deferred W's fill the tail where 1F1B idles. Activations held until W never exceed P per rank.
    """
    _check_sizes("zb1p", num_ranks, num_microbatches)
    P, m = num_ranks, num_microbatches
    actions = []
    for r in range(P):
        b = _Builder()
        warmup = min(P - 1 - r, m)
        deferred = min(r, m - warmup)
        for _ in range(warmup):
            b.F(r)
        for _ in range(deferred):
            b.F(r)
            b.B(r, split=True)
        for _ in range(m - warmup - deferred):
            b.F(r)
            b.B(r, split=True)
            b.W()
        for _ in range(warmup):
            b.B(r, split=True)
            b.W()
        while b.pending_w:
            b.W()
        actions.append(tuple(b.steps))
    return Schedule("zb1p", tuple(range(P)), (tuple(range(P)),), (m,), tuple(actions))


def interleaved_1f1b(num_ranks: int, num_microbatches: int, stages_per_rank: int = 2) -> Schedule:
    """Interleaved 1F1B (Megatron-LM): v stages per rank (stage s on rank s mod P), depth-first rounds.

    Micro-batches go through the local stages in rounds of ``g = m // max(1, m // P)``; rank r warms up
    with ``(v-1)*g + 2*(P-1-r)`` forwards, then alternates forward and backward (backward rounds visit
    the local stages in reverse). ``m`` must be a multiple of the number of rounds, as in torch.
    """
    _check_sizes("interleaved", num_ranks, num_microbatches)
    P, m, v = num_ranks, num_microbatches, stages_per_rank
    if not isinstance(v, int) or v < 1:
        raise ValueError(f"interleaved: stages_per_rank must be a positive int, got {v!r}")
    rounds = max(1, m // P)
    if m % rounds:
        lo, hi = m - m % rounds, m + rounds - m % rounds
        raise ValueError(f"interleaved: num_microbatches ({m}) must be a multiple of the number of rounds "
                         f"max(1, m // num_ranks) = {rounds}; nearest valid values: {lo}, {hi}")
    g = m // rounds
    actions = []
    for r in range(P):
        b = _Builder()
        total = v * m
        warmup = min((v - 1) * g + 2 * (P - 1 - r), total)

        fwd = [((k // g) % v) * P + r for k in range(total)]          # the k-th forward's local stage
        bwd = [(v - 1 - (k // g) % v) * P + r for k in range(total)]  # backward rounds in reverse
        for k in range(warmup):
            b.F(fwd[k])
        for k in range(total - warmup):
            b.F(fwd[warmup + k])
            b.B(bwd[k])
        for k in range(total - warmup, total):
            b.B(bwd[k])
        actions.append(tuple(b.steps))
    return Schedule(f"interleaved{v}", tuple(s % P for s in range(v * P)), (tuple(range(v * P)),), (m,),
                    tuple(actions))


def _eight_phases(s0: int, s1: int, ranks: int, rank: int, chunks: int) -> tuple[Step, ...]:
    """One rank's DualPipe order (DeepSeek-V3, Figure 5) for ``ranks`` ranks on one side of the turn.

    ``s0`` is the stage whose micro-batches enter on this rank's side, ``s1`` the one whose micro-batches
    come back; ``rank`` counts from the outer end and ``chunks`` is the number of micro-batches of each.
    """
    b = _Builder()
    for _ in range(2 * (ranks - rank - 1)):              # 1. nF0
        b.F(s0)
    for _ in range(rank + 1):                            # 2. nF0F1
        b.F(s0)
        b.F(s1)
    for _ in range(ranks - rank - 1):                    # 3. nB1W1F1, with the W split
        b.B(s1, split=True)
        b.W()
        b.F(s1)
    for i in range(chunks - 2 * ranks + rank + 1):      # 4. the steady F0&B1, F1&B0 pairs
        if i == 0 and rank == ranks - 1:                 #    at the turn the first pair is not overlapped
            b.F(s0)
            b.B(s1)
        else:
            b.FB(s0, s1)
        b.FB(s1, s0)
    for _ in range(ranks - rank - 1):                    # 5. nB1F1B0
        b.B(s1)
        b.FB(s1, s0)
    split = False
    for i in range(rank + 1):                            # 6. nB1B0, the W split switched on half way
        split |= i == (rank + 1) // 2 and rank % 2 == 1
        b.B(s1, split)
        split |= i == (rank + 1) // 2 and rank % 2 == 0
        b.B(s0, split)
    for _ in range(ranks - rank - 1):                    # 7. nW1B0
        b.W()
        b.B(s0, split=True)
    while b.pending_w:                                   # 8. nW
        b.W()
    return tuple(b.steps)


def _keep(steps: tuple[Step, ...], keep: Callable[[Action], bool]) -> tuple[Step, ...]:
    """Drop the actions of absent micro-batches; an F&B that loses a half becomes its other half."""
    out: list[Step] = []
    for step in steps:
        kept = [a for a in parts(step) if keep(a)]
        if len(kept) == 2:
            out.append(step)
        elif kept:
            out.append(kept[0])
    return tuple(out)


def dualpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipe: rank r holds stages r and P-1-r; micro-batches enter from both ends.

    Direction 0 (stages 0..P-1, the first ceil(N/2) micro-batches) enters at rank 0, direction 1 (stages
    P..2P-1, the rest) at rank P-1. Each half of the ranks runs :func:`_eight_phases` toward the middle.
    With an odd N or N < 2P the schedule for max(ceil(N/2), P) micro-batches per direction is generated
    and the absent micro-batches are removed, which keeps every dependency and cannot create a deadlock.
    """
    _check_sizes("dualpipe", num_ranks, num_microbatches)
    P, N = num_ranks, num_microbatches
    if P % 2:
        raise ValueError(f"dualpipe: num_ranks must be even (two directions meet in the middle), got {P}; "
                         f"nearest valid values: {max(P - 1, 2)}, {P + 1}; dualpipev accepts any number of ranks")
    if N < 2:
        raise ValueError(f"dualpipe: num_microbatches must be >= 2 (one per direction), got {N}; nearest valid: 2")
    counts = ((N + 1) // 2, N // 2)
    half = max(counts[0], P)
    placement = tuple(range(P)) + tuple(range(P - 1, -1, -1))
    actions = []
    for r in range(P):
        down, up = r, 2 * P - 1 - r        # direction 0's stage on rank r, direction 1's stage on rank r
        s0, s1 = (down, up) if r < P // 2 else (up, down)
        steps = _eight_phases(s0, s1, P // 2, min(r, P - 1 - r), half)
        actions.append(_keep(steps, lambda a: a.microbatch < counts[a.stage >= P]))
    return Schedule("dualpipe", placement, (tuple(range(P)), tuple(range(P, 2 * P))), counts, tuple(actions))


def dualpipev(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipeV ("cut-in-half" DualPipe): rank r holds stages r and 2P-1-r of a 2P-stage model.

    Micro-batches enter and leave at rank 0, turning at rank P-1. With N < 2P the schedule for 2P
    micro-batches is generated and the absent ones removed (correct, with the extra bubble).
    """
    _check_sizes("dualpipev", num_ranks, num_microbatches)
    P, N = num_ranks, num_microbatches
    placement = tuple(s if s < P else 2 * P - 1 - s for s in range(2 * P))
    actions = [_keep(_eight_phases(r, 2 * P - 1 - r, P, r, max(N, 2 * P)), lambda a: a.microbatch < N)
               for r in range(P)]
    return Schedule("dualpipev", placement, (tuple(range(2 * P)),), (N,), tuple(actions))


GENERATORS: dict[str, Callable[..., Schedule]] = {
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
    "interleaved": interleaved_1f1b,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
}


def generate(kind: str, num_ranks: int, num_microbatches: int, **options: int) -> Schedule:
    """The schedule of ``kind`` (one of :data:`GENERATORS`) for the given sizes."""
    try:
        gen = GENERATORS[kind.lower()]
    except KeyError:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {', '.join(GENERATORS)}") from None
    return gen(num_ranks, num_microbatches, **options)
