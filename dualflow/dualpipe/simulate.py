"""Cost simulation of a schedule: timeline, makespan, bubbles, activation memory, parameter copies.

Each rank runs its steps in order; a step starts when the rank is free and its inputs exist (the
forward of the previous stage, the backward of the next stage, plus ``latency`` when they come from
another rank) and lasts its cost:

    F, B (full backward), W (weight gradients), I = B - W (input gradients),
    F&B = ``FB`` (default: the F plus the B or I of the pair), minus W when the pair's backward is an I.

Costs are numbers or per-stage tuples. Activations of a (stage, micro-batch) are alive from the start
of its F to the end of its B, or of its W when the backward is split (W needs the saved inputs); inside
an F&B the forward allocates before the backward frees, as when the two run interleaved.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from dualflow.dualpipe.schedule import Action, Overlap, Schedule, Step

Cost = float | tuple[float, ...]


@dataclass(frozen=True)
class Costs:
    """Durations of F, B, W and the F&B pair, and the p2p latency; each a number or one per stage."""

    F: Cost = 1.0
    B: Cost = 2.0
    W: Cost = 1.0
    FB: Cost | None = None
    latency: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Costs:
        """``"F=1,B=2,W=1,FB=2.5,latency=0.1"`` (keys case-insensitive; ``F&B`` is accepted for FB)."""
        names = {"f": "F", "b": "B", "w": "W", "fb": "FB", "f&b": "FB", "latency": "latency"}
        values: dict[str, float] = {}
        for item in filter(None, (t.strip() for t in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key.strip().lower() not in names:
                raise ValueError(f"cannot parse cost {item!r}; expected KEY=NUMBER with KEY one of "
                                 "F, B, W, FB, latency")
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not (math.isfinite(number) and number >= 0):
                raise ValueError(f"cost {item!r}: {value.strip()!r} is not a finite number >= 0; expected "
                                 "KEY=NUMBER, e.g. F=1,B=2,W=1")
            values[names[key.strip().lower()]] = number
        return cls(**values)

    def scaled(self, factor: float) -> Costs:
        """Compute costs times ``factor`` (latency unchanged): the same model cut into stages 1/factor as large."""
        def mul(v: Cost | None) -> Cost | None:
            return None if v is None else tuple(x * factor for x in v) if isinstance(v, tuple) else v * factor
        return Costs(mul(self.F), mul(self.B), mul(self.W), mul(self.FB), self.latency)

    @property
    def uniform(self) -> bool:
        return not any(isinstance(getattr(self, k), tuple) for k in ("F", "B", "W", "FB"))

    def at(self, name: str, stage: int) -> float:
        value = getattr(self, name)
        return float(value[stage] if isinstance(value, tuple) else value)

    def check(self, num_stages: int) -> None:
        for name in ("F", "B", "W", "FB"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != num_stages:
                raise ValueError(f"costs.{name} has {len(value)} per-stage values; the schedule has "
                                 f"{num_stages} stages")
            for s in range(num_stages) if value is not None else ():
                if self.at(name, s) < 0:
                    raise ValueError(f"costs.{name} must be >= 0, got {self.at(name, s)} for stage {s}")
                if name == "W" and self.at("W", s) > self.at("B", s):
                    raise ValueError(f"costs.W ({self.at('W', s)}) exceeds costs.B ({self.at('B', s)}) at stage {s}: "
                                     "B is the full backward, W the weight-gradient part of it")
        if self.latency < 0:
            raise ValueError(f"costs.latency must be >= 0, got {self.latency}")

    def duration(self, step: Step) -> float:
        if type(step) is Overlap:
            f, b = step.forward, step.backward
            minus_w = self.at("W", b.stage) if b.kind == "I" else 0.0
            if self.FB is not None:
                return self.at("FB", f.stage) - minus_w
            return self.at("F", f.stage) + self.at("B", b.stage) - minus_w
        if step.kind == "I":
            return self.at("B", step.stage) - self.at("W", step.stage)
        return self.at(step.kind, step.stage)


@dataclass(frozen=True)
class Interval:
    start: float
    end: float
    step: Step


@dataclass(frozen=True)
class Simulation:
    """The outcome of :func:`simulate`; per-rank tuples are indexed by rank."""

    schedule: Schedule
    costs: Costs
    timeline: tuple[tuple[Interval, ...], ...]
    makespan: float
    busy: tuple[float, ...]
    peak_activations: tuple[int, ...]
    param_copies: tuple[int, ...]

    @property
    def bubble(self) -> tuple[float, ...]:
        """Idle time of each rank within the makespan."""
        return tuple(self.makespan - b for b in self.busy)

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)


def peak_activations(steps: Sequence[Step]) -> int:
    """Most (stage, micro-batch) activations alive at once when ``steps`` run in order on one rank."""
    alive = peak = 0
    for step in steps:
        acts = (step.forward, step.backward) if type(step) is Overlap else (step,)
        for a in acts:
            if a.kind == "F":
                alive += 1
                peak = max(peak, alive)
            elif a.kind in ("B", "W"):
                alive -= 1
    return peak


def simulate(schedule: Schedule, costs: Costs | None = None) -> Simulation:
    """Run ``schedule`` with ``costs`` (default F=1, B=2, W=1, F&B=F+B, latency 0) on a virtual clock."""
    costs = costs or Costs()
    costs.check(schedule.num_stages)
    prev, nxt = schedule.topology.prev, schedule.topology.next
    place, lat = schedule.placement, costs.latency
    rows = schedule.actions
    # ready[key] = time the output of a finished action is available on its own rank;
    # key = (0, stage, mb) forward done, (1, stage, mb) input gradient done, (2, ...) I done.
    ready: dict[tuple[int, int, int], float] = {}
    waiting: dict[tuple[int, int, int], list[int]] = {}
    clock = [0.0] * len(rows)
    busy = [0.0] * len(rows)
    pos = [0] * len(rows)
    timeline: list[list[Interval]] = [[] for _ in rows]
    queue = deque(range(len(rows)))

    def needs(a: Action, rank: int) -> list[tuple[tuple[int, int, int], float]]:
        s, m = a.stage, a.microbatch
        if a.kind == "F":
            p = prev[s]
            return [] if p < 0 else [((0, p, m), lat if place[p] != rank else 0.0)]
        if a.kind == "W":
            return [((2, s, m), 0.0)]
        n = nxt[s]
        out = [((0, s, m), 0.0)]
        if n >= 0:
            out.append(((1, n, m), lat if place[n] != rank else 0.0))
        return out

    while queue:
        r = queue.popleft()
        row = rows[r]
        while pos[r] < len(row):
            step = row[pos[r]]
            acts = (step.forward, step.backward) if type(step) is Overlap else (step,)
            start = clock[r]
            blocked = None
            for a in acts:
                for key, delay in needs(a, r):
                    t = ready.get(key)
                    if t is None:
                        blocked = key
                        break
                    start = max(start, t + delay)
                if blocked:
                    break
            if blocked:
                waiting.setdefault(blocked, []).append(r)
                break
            end = start + costs.duration(step)
            timeline[r].append(Interval(start, end, step))
            busy[r] += end - start
            clock[r] = end
            pos[r] += 1
            for a in acts:
                s, m = a.stage, a.microbatch
                keys = {"F": ((0, s, m),), "B": ((1, s, m),), "I": ((1, s, m), (2, s, m)), "W": ()}[a.kind]
                for key in keys:
                    ready[key] = end
                    queue.extend(waiting.pop(key, ()))
    stuck = [r for r in range(len(rows)) if pos[r] < len(rows[r])]
    if stuck:
        r = stuck[0]
        raise ValueError(f"schedule cannot finish: rank {r} waits at step {pos[r]} ({rows[r][pos[r]]}); "
                         "run dualflow.dualpipe.validate(schedule) for the circular wait")
    return Simulation(
        schedule=schedule,
        costs=costs,
        timeline=tuple(tuple(t) for t in timeline),
        makespan=max(clock),
        busy=tuple(busy),
        peak_activations=tuple(peak_activations(row) for row in rows),
        param_copies=tuple(len(schedule.stages_of(r)) for r in range(len(rows))),
    )


def formula_bubble(kind: str, num_model_stages: int, costs: Costs) -> float | None:
    """The published bubble for ``kind`` with PP = ``num_model_stages`` (None where none is published)."""
    PP = num_model_stages
    F, B, W = (costs.at(k, 0) for k in ("F", "B", "W"))
    FB = costs.at("FB", 0) if costs.FB is not None else F + B
    return {
        "1f1b": (PP - 1) * (F + B),
        "zb1p": (PP - 1) * (F + B - 2 * W),
        "dualpipe": (PP / 2 - 1) * (FB + B - 3 * W),
        "dualpipev": (PP / 2 - 1) * (FB + B - 3 * W),
    }.get(kind)


def formula_activations(kind: str, num_model_stages: int) -> int | None:
    """The published activation memory (micro-batches on the busiest rank) for ``kind``."""
    PP = num_model_stages
    return {"1f1b": PP, "zb1p": PP, "dualpipe": PP + 1, "dualpipev": PP + 1}.get(kind)


def formula_scope(kind: str, schedule: Schedule, costs: Costs) -> str | None:
    """Why the published bubble/activation formulas do not describe this case exactly, or None if they do.

    Found by simulation and stated in docs/schedules.md: the formulas count the idle slots of the
    idealised figures, which assume enough micro-batches to reach the steady phase, equal costs on every
    stage, no latency, and (zero-bubble kinds) W chunks that fit the gaps they fill; DualPipe's figure
    further has the input-gradient chunk as long as the forward (B = F + W).
    """
    if formula_bubble(kind, schedule.num_model_stages, costs) is None:
        return "no published formula for this kind"
    if not costs.uniform or costs.latency:
        return "the formulas assume equal costs on every stage and no latency"
    PP, N = schedule.num_model_stages, schedule.num_microbatches
    F, B, W = costs.at("F", 0), costs.at("B", 0), costs.at("W", 0)
    if kind in ("1f1b", "zb1p") and N < PP:
        return f"fewer micro-batches ({N}) than stages ({PP}): the pipeline never fills"
    if kind == "zb1p" and not min(F, B - W) >= W:
        return "the ZB-H1 figure needs W <= F and W <= B - W (a W must fit the gap it fills)"
    if kind in ("dualpipe", "dualpipev"):
        need = 2 * PP if kind == "dualpipe" else PP
        if need > N:
            return f"fewer micro-batches ({N}) than the {need} the reference requires"
        if kind == "dualpipe" and N % 2:
            return "an odd number of micro-batches splits unevenly between the two directions"
        if abs(B - F - W) > 1e-12 or W > F:
            return "the DualPipe figure has the input-gradient chunk as long as the forward (B = F + W) and W <= F"
    return None
