"""``dualflow schedule``: generate, validate, simulate and render a pipeline schedule.

    dualflow schedule --kind dualpipe --ranks 8 --microbatches 20 [--costs F=1,B=2,W=1] [--png out.png]

prints the schedule as a text grid and a side-by-side table of every schedule kind for the same
number of ranks and micro-batches: makespan, bubble (simulated, and the published formula where one
exists), peak activations and parameter copies per rank.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dualflow.dualpipe.render import render_png, render_svg, render_text, to_chrome_trace
from dualflow.dualpipe.schedule import GENERATORS, generate
from dualflow.dualpipe.simulate import Costs, Simulation, formula_activations, formula_bubble, formula_scope, simulate
from dualflow.dualpipe.validate import validate
from dualflow.utils.timing import Table


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", default="dualpipe", choices=sorted(GENERATORS), help="schedule to show")
    parser.add_argument("--ranks", type=_positive, default=8, help="pipeline ranks (devices)")
    parser.add_argument("--microbatches", type=_positive, default=20, help="micro-batches per step")
    parser.add_argument("--stages-per-rank", type=_positive, default=2, help="stages per rank of the interleaved kind")
    parser.add_argument("--costs", default="", help="durations, e.g. F=1,B=2,W=1,FB=2.5,latency=0 "
                        "(B is the full backward, FB an overlapped forward+backward pair)")
    parser.add_argument("--png", type=Path, help="write the timeline as PNG")
    parser.add_argument("--svg", type=Path, help="write the timeline as SVG")
    parser.add_argument("--trace", type=Path, help="write a Chrome/Perfetto trace (JSON)")
    parser.add_argument("--text", type=Path, help="write the schedule in dualflow's text form")
    parser.add_argument("--no-grid", action="store_true", help="print only the comparison table")


def _row(table: Table, kind: str, sim: Simulation, notes: list[str]) -> None:
    s = sim.schedule
    PP, per = s.num_model_stages, s.num_ranks / s.num_model_stages
    f_bubble = formula_bubble(kind, PP, sim.costs)
    f_act = formula_activations(kind, PP)
    table.add(kind=kind, PP=PP, makespan=float(sim.makespan), bubble=float(sim.max_bubble),
              formula_bubble="-" if f_bubble is None else float(f_bubble),
              activations=max(sim.peak_activations), formula_activations="-" if f_act is None else f_act,
              params=max(sim.param_copies), act_mem=float(max(sim.peak_activations) * per),
              param_mem=float(max(sim.param_copies) * per),
              note=_note(notes, None if f_bubble is None else formula_scope(kind, s, sim.costs) or "formulas exact"))


def _note(notes: list[str], text: str | None) -> str:
    if text is None or text == "formulas exact":
        return text or ""
    notes.append(text)
    return f"[{len(notes)}]"


def comparison(ranks: int, microbatches: int, costs: Costs, stages_per_rank: int = 2) -> str:
    """Every schedule kind simulated for the same ranks, micro-batches and model, as a table.

    ``costs`` are those of one stage of a model cut into ``ranks`` stages; a kind with PP = k * ranks
    stages runs stages k times smaller, so its per-stage costs are divided by k. activations/params are in
    units of that kind's stage (as in the published table), act_mem/param_mem in units of 1/ranks of the
    model. A kind that cannot take these sizes, or whose formulas do not apply exactly, gets a note why.
    """
    notes: list[str] = []
    table = Table(["kind", "PP", "makespan", "bubble", "formula_bubble", "activations", "formula_activations",
                   "params", "act_mem", "param_mem", "note"],
                  title=f"{ranks} ranks, {microbatches} micro-batches; per-stage costs F={costs.F} B={costs.B} "
                        f"W={costs.W} F&B={'F+B' if costs.FB is None else costs.FB} latency={costs.latency} "
                        f"for 1/{ranks} of the model")
    for kind in GENERATORS:
        options = {"stages_per_rank": stages_per_rank} if kind == "interleaved" else {}
        try:
            schedule = generate(kind, ranks, microbatches, **options)
        except ValueError as exc:
            table.add(kind=kind, note=_note(notes, f"not possible: {exc}"))
            continue
        validate(schedule)
        _row(table, kind, simulate(schedule, costs.scaled(ranks / schedule.num_model_stages)), notes)
    return table.render() + "".join(f"\n[{i}] {n}" for i, n in enumerate(notes, 1))


def run(args: argparse.Namespace) -> int:
    try:
        costs = Costs.parse(args.costs)
    except ValueError as exc:
        print(f"dualflow schedule: --costs {args.costs!r}: {exc}", file=sys.stderr)
        return 2
    try:
        options = {"stages_per_rank": args.stages_per_rank} if args.kind == "interleaved" else {}
        schedule = generate(args.kind, args.ranks, args.microbatches, **options)
        validate(schedule)
        sim = simulate(schedule, costs)
    except ValueError as exc:
        print(f"dualflow schedule: {exc}", file=sys.stderr)
        return 2
    if not args.no_grid:
        print(f"{schedule.name}: {schedule.num_ranks} ranks, {schedule.num_stages} stages, micro-batches "
              f"{'+'.join(map(str, schedule.microbatches))}")
        print(render_text(sim))
        print()
    print(comparison(args.ranks, args.microbatches, costs, args.stages_per_rank))
    for path, write in ((args.png, render_png), (args.svg, render_svg)):
        if path:
            print(f"wrote {write(sim, path)}")
    if args.trace:
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        args.trace.write_text(json.dumps(to_chrome_trace(sim)))
        print(f"wrote {args.trace}")
    if args.text:
        args.text.parent.mkdir(parents=True, exist_ok=True)
        args.text.write_text(schedule.to_text())
        print(f"wrote {args.text}")
    return 0
