"""Pipeline schedules as data (1F1B, ZB1P, interleaved, DualPipe, DualPipeV), simulator, rendering, runtime.

    from dualflow.dualpipe import dualpipe, validate, simulate, render_text
    s = dualpipe(num_ranks=8, num_microbatches=20)
    validate(s)
    print(render_text(simulate(s)))
"""

from dualflow.dualpipe.comms import add_communication
from dualflow.dualpipe.render import render_png, render_svg, render_text, to_chrome_trace
from dualflow.dualpipe.schedule import (
    GENERATORS,
    Action,
    Overlap,
    Schedule,
    dualpipe,
    dualpipev,
    generate,
    interleaved_1f1b,
    one_f_one_b,
    parse_torch,
    zb1p,
)
from dualflow.dualpipe.simulate import Costs, Simulation, formula_activations, formula_bubble, simulate
from dualflow.dualpipe.validate import ScheduleError, validate

__all__ = [
    "GENERATORS",
    "Action",
    "Costs",
    "Overlap",
    "Schedule",
    "ScheduleError",
    "Simulation",
    "add_communication",
    "dualpipe",
    "dualpipev",
    "formula_activations",
    "formula_bubble",
    "generate",
    "interleaved_1f1b",
    "one_f_one_b",
    "parse_torch",
    "render_png",
    "render_svg",
    "render_text",
    "simulate",
    "to_chrome_trace",
    "validate",
    "zb1p",
]
