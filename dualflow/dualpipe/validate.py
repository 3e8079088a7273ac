"""``validate(schedule)``: will this schedule run, and run every computation exactly once?

Checks, in order, each failing with a :class:`ScheduleError` that names the first offending action:

1. every step is placed on the rank of its stage, with a micro-batch that exists;
2. each (stage, micro-batch) runs F once, then either one B or one I followed by one W, on its rank;
3. sends and receives match: on each channel (activations or gradients, one direction between two
   ranks) the receiver takes the same messages in the same order as the sender sends them, as backends
   that match messages in order need when each receive is posted just before its use;
4. the ranks can all finish with receives that block until the matching send has run and sends that
   do not block (the runtime's non-blocking sends): executing the lists finds any circular wait and
   reports the ranks and actions in it. Cross-rank dependency order is checked on the way: a compute
   step runs only after the receive of each input it takes from another rank.
"""

from __future__ import annotations

from collections import deque

from dualflow.dualpipe.comms import has_communication, message_of
from dualflow.dualpipe.schedule import COMM_KINDS, Action, Overlap, Schedule, Step, parts


class ScheduleError(ValueError):
    """A schedule that cannot run correctly."""


def _where(rank: int, index: int, step: Step) -> str:
    return f"rank {rank} step {index} ({step})"


def _check_steps(schedule: Schedule) -> None:
    place, S = schedule.placement, schedule.num_stages
    chain, counts = schedule.topology.chain, schedule.microbatches
    per_stage = [counts[chain[s]] for s in range(S)]
    # (kind, stage, mb) -> (rank, index) of the step; an Action is such a tuple, so it is its own key
    seen: dict[tuple[str, int, int], tuple[int, int]] = {}
    for r, steps in enumerate(schedule.actions):
        for i, step in enumerate(steps):
            if type(step) is Overlap:
                acts = (step.forward, step.backward)
                if step.forward.kind != "F" or step.backward.kind not in ("B", "I"):
                    raise ScheduleError(f"{_where(r, i, step)}: an F&B pairs an F with a B or I")
            else:
                acts = (step,)
            for a in acts:
                kind, st, mb = a
                if not 0 <= st < S:
                    raise ScheduleError(f"{_where(r, i, step)}: stage {st} does not exist "
                                        f"(the schedule has stages 0..{S - 1})")
                if place[st] != r:
                    raise ScheduleError(f"{_where(r, i, step)}: stage {st} lives on rank {place[st]}")
                if not 0 <= mb < per_stage[st]:
                    raise ScheduleError(f"{_where(r, i, step)}: micro-batch {mb} does not exist "
                                        f"(stage {st}'s direction has micro-batches 0..{per_stage[st] - 1})")
                if kind == "F":
                    need = None
                elif kind in ("B", "I"):
                    need = ("F", st, mb)
                elif kind == "W":
                    need = ("I", st, mb)
                elif kind in COMM_KINDS:
                    message_of(schedule, a)  # raises when the stage has no peer in that direction
                    continue
                else:
                    raise ScheduleError(f"{_where(r, i, step)}: unknown action kind {kind!r}")
                first = seen.get(a)
                if first is None and kind in ("B", "I"):
                    first = seen.get(("I" if kind == "B" else "B", st, mb))
                if first is not None:
                    raise ScheduleError(f"{_where(r, i, step)}: {kind} of stage {st} micro-batch {mb} duplicates "
                                        f"the work of {_where(*first, schedule.actions[first[0]][first[1]])}")
                if need is not None and need not in seen:
                    extra = (" (a full B computes the weight gradients already)"
                             if kind == "W" and ("B", st, mb) in seen else "")
                    raise ScheduleError(f"{_where(r, i, step)}: {kind} before the {need[0]} of stage {st} "
                                        f"micro-batch {mb} on this rank{extra}")
                seen[a] = (r, i)

    def at(key: tuple[str, int, int]) -> str:
        r, i = seen[key]
        return _where(r, i, schedule.actions[r][i])

    for c, stages in enumerate(schedule.chains):
        for s in stages:
            for m in range(counts[c]):
                if ("F", s, m) not in seen:
                    raise ScheduleError(f"F of stage {s} micro-batch {m} is missing on rank {place[s]}")
                if ("I", s, m) in seen and ("W", s, m) not in seen:
                    raise ScheduleError(f"{at(('I', s, m))}: I of stage {s} micro-batch {m} is never followed by its "
                                        "W (the weight gradients would be lost)")
                if ("I", s, m) not in seen and ("B", s, m) not in seen:
                    raise ScheduleError(f"{at(('F', s, m))}: stage {s} micro-batch {m} has no backward (B, or I "
                                        "then W)")


Site = tuple[tuple[str, int, int], int, int, Step]  # (message, rank, step index, step)


def _channels(schedule: Schedule) -> tuple[dict[tuple, list[Site]], dict[tuple, list[Site]]]:
    """Messages per channel (src, dst, kind) in the order they are sent and in the order they are received.

    With explicit SEND/RECV actions these are read from them; otherwise a message is sent right after
    the compute that produces it and received right before the compute that consumes it.
    """
    sends: dict[tuple, list[Site]] = {}
    recvs: dict[tuple, list[Site]] = {}
    topo, place = schedule.topology, schedule.placement
    if has_communication(schedule):
        for r, steps in enumerate(schedule.actions):
            for i, step in enumerate(steps):
                if type(step) is Action and step.kind in COMM_KINDS:
                    msg = message_of(schedule, step)
                    side = sends if step.kind.startswith("SEND") else recvs
                    side.setdefault((msg.src, msg.dst, msg.kind), []).append((msg[:3], r, i, step))
        return sends, recvs
    # Per stage: the channel lists its forward output / input gradient go to and its inputs come from.
    f_out, f_in, b_out, b_in = ([None] * schedule.num_stages for _ in range(4))
    for s in range(schedule.num_stages):
        p, n, r = topo.prev[s], topo.next[s], place[s]
        if n >= 0 and place[n] != r:
            f_out[s] = sends.setdefault((r, place[n], "F"), [])
            b_in[s] = recvs.setdefault((place[n], r, "B"), [])
        if p >= 0 and place[p] != r:
            f_in[s] = recvs.setdefault((place[p], r, "F"), [])
            b_out[s] = sends.setdefault((r, place[p], "B"), [])
    for r, steps in enumerate(schedule.actions):
        for i, step in enumerate(steps):
            for a in (step.forward, step.backward) if type(step) is Overlap else (step,):
                kind, s, m = a
                if kind == "F":
                    if f_in[s] is not None:
                        f_in[s].append((("F", topo.prev[s], m), r, i, step))
                    if f_out[s] is not None:
                        f_out[s].append((("F", s, m), r, i, step))
                elif kind != "W":
                    if b_in[s] is not None:
                        b_in[s].append((("B", topo.next[s], m), r, i, step))
                    if b_out[s] is not None:
                        b_out[s].append((("B", s, m), r, i, step))
    return sends, recvs


def _check_channels(schedule: Schedule) -> None:
    sends, recvs = _channels(schedule)
    for ch in sorted(set(sends) | set(recvs)):
        out, inc = sends.get(ch, []), recvs.get(ch, [])
        name = f"{'activation' if ch[2] == 'F' else 'gradient'} channel rank {ch[0]} -> {ch[1]}"
        for k in range(max(len(out), len(inc))):
            if k >= len(out):
                _, r, i, a = inc[k]
                raise ScheduleError(f"{_where(r, i, a)}: receive #{k} on the {name} has no matching send "
                                    f"(rank {ch[0]} sends only {len(out)} messages)")
            if k >= len(inc):
                _, r, i, a = out[k]
                raise ScheduleError(f"{_where(r, i, a)}: send #{k} on the {name} is never received "
                                    f"(rank {ch[1]} receives only {len(inc)} messages)")
            if out[k][0] != inc[k][0]:
                (msg, r, i, a), (msg2, r2, i2, a2) = out[k], inc[k]
                raise ScheduleError(f"{_where(r, i, a)}: send #{k} on the {name} carries {msg} but receive #{k} "
                                    f"at {_where(r2, i2, a2)} expects {msg2}; a receiver takes messages in the "
                                    "order they are sent")


def _dependencies(schedule: Schedule) -> list[list[tuple[tuple, tuple]]]:
    """Per rank and step: the keys that must exist before it runs and the keys it produces.

    Keys: ("F", stage, mb) forward done, ("G", stage, mb) input gradient done (B or I), and with explicit
    communication ("S", message) sent and ("RECV_F" | "RECV_B", stage, mb) received. Without explicit
    receives an input from another rank is available once its producer has run (sends never block).
    """
    topo, place = schedule.topology, schedule.placement
    explicit = has_communication(schedule)
    out = []
    for r, steps in enumerate(schedule.actions):
        row = []
        for step in steps:
            if type(step) is Action and step.kind in COMM_KINDS:
                s, m, kind = step.stage, step.microbatch, step.kind
                if kind.startswith("SEND"):
                    msg = ("S", message_of(schedule, step)[:3])
                    row.append(((("F" if kind == "SEND_F" else "G", s, m),), (msg,)))
                else:
                    row.append(((("S", message_of(schedule, step)[:3]),), ((kind, s, m),)))
                continue
            need, made = [], []
            for a in parts(step):
                s, m = a.stage, a.microbatch
                if a.kind == "F":
                    p = topo.prev[s]
                    if p >= 0:
                        need.append(("RECV_F", s, m) if explicit and place[p] != r else ("F", p, m))
                    made.append(("F", s, m))
                elif a.kind in ("B", "I"):
                    n = topo.next[s]
                    need.append(("F", s, m))
                    if n >= 0:
                        need.append(("RECV_B", s, m) if explicit and place[n] != r else ("G", n, m))
                    made.append(("G", s, m))
                else:
                    need.append(("G", s, m))
            row.append((tuple(need), tuple(made)))
        out.append(row)
    return out


def _owner(schedule: Schedule, key: tuple, rank: int) -> int:
    """The rank whose progress produces ``key``."""
    if key[0] == "S":
        return schedule.placement[key[1][1]]
    if key[0] in ("F", "G"):
        return schedule.placement[key[1]]
    return rank  # a receive this rank has not posted yet


def _execute(schedule: Schedule) -> None:
    rows = schedule.actions
    deps = _dependencies(schedule)
    pos = [0] * len(rows)
    done: set[tuple] = set()
    waiting: dict[tuple, list[int]] = {}
    blocked_on: dict[int, tuple] = {}
    ready = deque(range(len(rows)))
    while ready:
        r = ready.popleft()
        row = deps[r]
        i = pos[r]
        while i < len(row):
            need, made = row[i]
            missing = next((k for k in need if k not in done), None)
            if missing is not None:
                waiting.setdefault(missing, []).append(r)
                blocked_on[r] = missing
                break
            i += 1
            for key in made:
                done.add(key)
                if key in waiting:
                    ready.extend(waiting.pop(key))
        pos[r] = i
    stuck = [r for r in range(len(rows)) if pos[r] < len(rows[r])]
    if not stuck:
        return
    # Follow "waits for" edges from the first stuck rank until a rank repeats: that is the circular wait.
    chain, r = [], stuck[0]
    while r not in chain:
        chain.append(r)
        r = _owner(schedule, blocked_on[r], r)
    cycle = chain[chain.index(r):]
    lines = []
    for c in cycle:
        key = blocked_on[c]
        what = {"S": "message", "F": "the forward", "G": "the backward"}.get(key[0], "its own receive of")
        detail = key[1] if key[0] == "S" else f"of stage {key[1]} micro-batch {key[2]}"
        lines.append(f"{_where(c, pos[c], rows[c][pos[c]])} waits for {what} {detail} "
                     f"from rank {_owner(schedule, key, c)}")
    raise ScheduleError("deadlock: circular wait among ranks " + ", ".join(map(str, cycle)) + ":\n  "
                        + "\n  ".join(lines))


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` naming the first offending action if ``schedule`` cannot run correctly."""
    if len(schedule.microbatches) != len(schedule.chains):
        raise ScheduleError(f"{len(schedule.chains)} chains but {len(schedule.microbatches)} micro-batch counts")
    staged = sorted(s for c in schedule.chains for s in c)
    if staged != list(range(schedule.num_stages)):
        raise ScheduleError(f"chains must cover stages 0..{schedule.num_stages - 1} once each, got {schedule.chains}")
    if any(not 0 <= r < schedule.num_ranks for r in schedule.placement):
        raise ScheduleError(f"placement {schedule.placement} names ranks outside 0..{schedule.num_ranks - 1}")
    _check_steps(schedule)
    _check_channels(schedule)
    _execute(schedule)
