"""Point-to-point messages derived from a schedule's compute order.

A forward whose next stage lives on another rank is followed by ``SEND_F`` on its rank and preceded,
on the consumer's rank, by ``RECV_F``; a backward (B or I) whose previous stage lives elsewhere is
followed by ``SEND_B`` and its consumer's B/I preceded by ``RECV_B``. SEND names the sending stage,
RECV the receiving stage, as in torch.distributed.pipelining. Messages form channels (sender, receiver,
activations or gradients); backends match the messages between two ranks in order, so lists that post
each receive just before its use must take each channel's messages in the order they were sent, which
the validator checks. :func:`programs` gives the order the runtime issues them in.
"""

from __future__ import annotations

from typing import NamedTuple

from dualflow.dualpipe.schedule import COMM_KINDS, Action, Schedule, Step, parts


class Message(NamedTuple):
    """One transfer: ``kind`` "F" (activations of ``stage``'s output) or "B" (gradient of ``stage``'s input)."""

    kind: str
    stage: int        # the producing stage
    microbatch: int
    src: int
    dst: int


def has_communication(schedule: Schedule) -> bool:
    return any(type(s) is Action and s.kind in COMM_KINDS for steps in schedule.actions for s in steps)


def _cross_rank(schedule: Schedule, step: Step, op: str) -> list[Action]:
    """``op`` ("RECV" or "SEND") actions of a step: a forward receives from the previous stage and sends
    to the next, a backward the other way round; only where that stage lives on another rank."""
    topo, place = schedule.topology, schedule.placement
    out = []
    for a in parts(step):
        if a.kind not in ("F", "B", "I"):
            continue
        forward = a.kind == "F"
        other = (topo.prev if forward == (op == "RECV") else topo.next)[a.stage]
        if other >= 0 and place[other] != place[a.stage]:
            out.append(Action(f"{op}_{'F' if forward else 'B'}", a.stage, a.microbatch))
    return out


def receives_for(schedule: Schedule, step: Step) -> list[Action]:
    """RECV actions a step needs on its rank before it runs."""
    return _cross_rank(schedule, step, "RECV")


def sends_after(schedule: Schedule, step: Step) -> list[Action]:
    """SEND actions that follow a step on its rank."""
    return _cross_rank(schedule, step, "SEND")


def add_communication(schedule: Schedule) -> Schedule:
    """The schedule with receives placed just before and sends just after the compute that needs them."""
    if has_communication(schedule):
        return schedule
    actions = []
    for steps in schedule.actions:
        row: list[Step] = []
        for step in steps:
            row += receives_for(schedule, step)
            row.append(step)
            row += sends_after(schedule, step)
        actions.append(tuple(row))
    return schedule.replace_actions(actions)


def message_of(schedule: Schedule, action: Action) -> Message:
    """The message a SEND or RECV action moves."""
    topo, place = schedule.topology, schedule.placement
    s = action.stage
    peer = topo.next[s] if action.kind in ("SEND_F", "RECV_B") else topo.prev[s]
    if action.kind in COMM_KINDS and peer < 0:
        end = "last" if action.kind in ("SEND_F", "RECV_B") else "first"
        raise ValueError(f"{action}: stage {s} is the {end} stage of its chain, so there is no peer to "
                         f"{'send to' if action.kind.startswith('SEND') else 'receive from'}")
    if action.kind == "SEND_F":
        return Message("F", s, action.microbatch, place[s], place[topo.next[s]])
    if action.kind == "RECV_F":
        p = topo.prev[s]
        return Message("F", p, action.microbatch, place[p], place[s])
    if action.kind == "SEND_B":
        return Message("B", s, action.microbatch, place[s], place[topo.prev[s]])
    if action.kind == "RECV_B":
        n = topo.next[s]
        return Message("B", n, action.microbatch, place[n], place[s])
    raise ValueError(f"{action} is not a communication action (expected one of {COMM_KINDS})")


class Op(NamedTuple):
    """One entry of a rank's program: ``what`` is "recv" or "send" (with ``message``) or "compute" (with ``step``)."""

    what: str
    message: Message | None = None
    step: Step | None = None
    index: int = -1  # position of ``step`` in the rank's schedule row


def programs(schedule: Schedule) -> list[list[Op]]:
    """Per rank, the order in which to issue receives, computes and sends.

    All ranks follow one global order of messages: the compute steps sorted by their start in a
    unit-cost simulation (a linear extension of the dependencies). A send is issued right after the
    compute that produces it, and its receive is posted by the receiver at the same position of the
    global order, which is as early as the schedule allows and before the compute that consumes it.
    Because every rank issues its point-to-point operations in the same global order, each pair of ranks
    issues them in matching order whatever the backend's streams are shared between, so no two ranks
    can wait on each other.
    """
    from dualflow.dualpipe.simulate import Costs, simulate

    sim = simulate(schedule, Costs(F=1.0, B=2.0, W=1.0))
    events = sorted((iv.start, r, i) for r, row in enumerate(sim.timeline) for i, iv in enumerate(row))
    out: list[list[Op]] = [[] for _ in range(schedule.num_ranks)]
    for _, r, i in events:
        step = schedule.actions[r][i]
        out[r].append(Op("compute", step=step, index=i))
        for send in sends_after(schedule, step):
            msg = message_of(schedule, send)
            out[r].append(Op("send", message=msg))
            out[msg.dst].append(Op("recv", message=msg))
    return out


def forward_only(schedule: Schedule) -> Schedule:
    """The forward steps of ``schedule`` alone (an F&B keeps its F): what a step under ``torch.no_grad()`` runs."""
    rows = []
    for steps in schedule.actions:
        rows.append(tuple(a for step in steps for a in parts(step) if a.kind == "F"))
    return schedule.replace_actions(rows)
