"""Pictures of a simulated schedule: a text grid, PNG/SVG timelines (matplotlib), Chrome/Perfetto traces.

Every renderer takes a :class:`~dualflow.dualpipe.simulate.Simulation` (or a schedule, simulated with
default costs). Direction is shown by case in text (upper case: travelling toward higher ranks, lower
case: toward rank 0, as DualPipe's second direction and DualPipeV's way back) and by colour shade in
images; an F&B pair is ``F7+b3`` in text and a box split in two in images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dualflow.dualpipe.schedule import Action, Overlap, Schedule, Step
from dualflow.dualpipe.simulate import Costs, Interval, Simulation, simulate


def _sim(schedule_or_sim: Schedule | Simulation, costs: Costs | None) -> Simulation:
    if isinstance(schedule_or_sim, Simulation):
        return schedule_or_sim
    return simulate(schedule_or_sim, costs)


def returning(schedule: Schedule, stage: int) -> bool:
    """Whether ``stage``'s micro-batches travel toward rank 0 (DualPipe's second direction, DualPipeV's way back)."""
    place, topo = schedule.placement, schedule.topology
    for other, sign in ((topo.next[stage], 1), (topo.prev[stage], -1)):
        if other >= 0 and abs(place[other] - place[stage]) == 1:
            return (place[other] - place[stage]) * sign < 0
    return False


def _label(schedule: Schedule, a: Action) -> str:
    text = f"{a.kind}{a.microbatch}"
    return text.lower() if returning(schedule, a.stage) else text


def step_label(schedule: Schedule, step: Step) -> str:
    if type(step) is Overlap:
        return f"{_label(schedule, step.forward)}+{_label(schedule, step.backward)}"
    return _label(schedule, step)


def render_text(schedule_or_sim: Schedule | Simulation, costs: Costs | None = None, unit: float | None = None) -> str:
    """A grid like DeepSeek-V3's Figure 5: one row per rank, one cell per ``unit`` of time (default: the
    smallest step duration), each step labelled with its kind and micro-batch; ``.`` is idle time."""
    sim = _sim(schedule_or_sim, costs)
    s = sim.schedule
    durations = [iv.end - iv.start for row in sim.timeline for iv in row if iv.end > iv.start]
    unit = unit or (min(durations) if durations else 1.0)
    width = 1 + max((len(_label(s, a)) for row in s.actions for step in row
                     for a in ((step,) if type(step) is Action else ())), default=2)
    cols = math.ceil(sim.makespan / unit - 1e-9)
    lines = []
    head = f"rank {s.num_ranks - 1}".__len__()
    ruler = "".join(f"{t:<{width * 5}d}" for t in range(0, cols, 5))
    lines.append(" " * (head + 2) + ruler.rstrip())
    for r, row in enumerate(sim.timeline):
        cells = ["." + " " * (width - 1)] * cols
        for iv in row:
            a, b = round(iv.start / unit), max(round(iv.end / unit), round(iv.start / unit) + 1)
            span = width * (b - a)
            text = step_label(s, iv.step)[: span - 1].ljust(span)
            for k in range(a, min(b, cols)):
                cells[k] = text[(k - a) * width:(k - a + 1) * width]
        lines.append(f"rank {r}".rjust(head) + "  " + "".join(cells).rstrip())
    lines.append("")
    two_way = any(returning(s, st) for st in range(s.num_stages))
    lines.append("F forward, B backward, I input-gradient half, W weight-gradient half, X+y an overlapped F&B pair, "
                 ". idle" + ("; UPPER case travels toward higher ranks, lower case toward rank 0" if two_way else ""))
    return "\n".join(lines)


_COLOURS = {"F": ("#3b75af", "#8fb8de"), "B": ("#d9822b", "#f2b880"), "I": ("#c44e52", "#eba3a5"),
            "W": ("#55a868", "#a6d8b2")}


def _draw(sim: Simulation, path: Path, title: str | None) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    s = sim.schedule
    fig_w = min(max(8.0, sim.makespan * 0.22), 40.0)
    fig, ax = plt.subplots(figsize=(fig_w, 0.45 * s.num_ranks + 1.6))
    small = sim.makespan <= 160

    def box(iv_start: float, dur: float, y: float, h: float, a: Action) -> None:
        colour = _COLOURS[a.kind][returning(s, a.stage)]
        ax.broken_barh([(iv_start, dur)], (y, h), facecolors=colour, edgecolors="white", linewidth=0.5)
        if small and dur >= 0.6:
            ax.text(iv_start + dur / 2, y + h / 2, str(a.microbatch), ha="center", va="center", fontsize=6.5)

    for r, row in enumerate(sim.timeline):
        y = s.num_ranks - 1 - r
        for iv in row:
            dur = iv.end - iv.start
            if type(iv.step) is Overlap:
                box(iv.start, dur, y + 0.45, 0.4, iv.step.forward)
                box(iv.start, dur, y + 0.05, 0.4, iv.step.backward)
            else:
                box(iv.start, dur, y + 0.05, 0.8, iv.step)
    ax.set_yticks([s.num_ranks - 1 - r + 0.45 for r in range(s.num_ranks)],
                  [f"rank {r}" for r in range(s.num_ranks)])
    ax.set_xlim(0, sim.makespan)
    ax.set_xlabel("time")
    kinds = sorted({a.kind for row in s.actions for st in row
                    for a in ((st.forward, st.backward) if type(st) is Overlap else (st,))}, key="FBIW".index)
    names = {"F": "forward", "B": "backward", "I": "input grad", "W": "weight grad"}
    two_way = any(returning(s, st) for st in range(s.num_stages))
    handles = [Patch(color=_COLOURS[k][0], label=names[k] + (" (down)" if two_way else "")) for k in kinds]
    if two_way:
        handles += [Patch(color=_COLOURS[k][1], label=names[k] + " (up)") for k in kinds]
    handles.append(Patch(facecolor="white", edgecolor="grey", label="F&B: upper F, lower B"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(len(handles), 5),
              fontsize=8, frameon=False)
    ax.set_title(title or (f"{s.name}: {s.num_ranks} ranks, {s.num_microbatches} micro-batches - makespan "
                           f"{sim.makespan:g}, bubble {sim.max_bubble:g}, peak activations "
                           f"{max(sim.peak_activations)}"), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150 if path.suffix == ".png" else None)
    plt.close(fig)
    return path


def render_png(schedule_or_sim: Schedule | Simulation, path: str | Path, costs: Costs | None = None,
               title: str | None = None) -> Path:
    """Timeline image (one row per rank, colour by kind and direction, legend, makespan and bubble in
    the title) written to ``path``; needs matplotlib."""
    return _draw(_sim(schedule_or_sim, costs), Path(path).with_suffix(".png"), title)


def render_svg(schedule_or_sim: Schedule | Simulation, path: str | Path, costs: Costs | None = None,
               title: str | None = None) -> Path:
    """As :func:`render_png`, as SVG."""
    return _draw(_sim(schedule_or_sim, costs), Path(path).with_suffix(".svg"), title)


def to_chrome_trace(timeline: Simulation | Sequence[Sequence[Interval]], schedule: Schedule | None = None,
                    us_per_unit: float = 1000.0) -> dict[str, Any]:
    """Chrome trace-event JSON (open in Perfetto or chrome://tracing): one track per rank, one slice per step.

    ``timeline`` is a Simulation or its ``timeline``; one time unit becomes ``us_per_unit`` microseconds.
    """
    if isinstance(timeline, Simulation):
        schedule, timeline = timeline.schedule, timeline.timeline
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "pipeline"}}]
    for r, row in enumerate(timeline):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}})
        for iv in row:
            name = step_label(schedule, iv.step) if schedule else str(iv.step)
            kind = iv.step.kind
            events.append({"name": name, "cat": kind, "ph": "X", "pid": 0, "tid": r,
                           "ts": iv.start * us_per_unit, "dur": (iv.end - iv.start) * us_per_unit,
                           "args": {"step": str(iv.step)}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(timeline: Simulation | Sequence[Sequence[Interval]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_chrome_trace(timeline)))
    return path
