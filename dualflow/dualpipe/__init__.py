"""Pipeline schedules as data (1F1B, ZB1P, interleaved, DualPipe, DualPipeV), simulator, rendering, runtime.

    from dualflow.dualpipe import DualPipeV
    pipe = DualPipeV((stage_a, stage_b))          # rank r holds stages r and 2P-1-r
    loss, outputs = pipe.step(x, num_chunks=8, criterion=loss_fn, labels=(y,))

    from dualflow.dualpipe import dualpipe, validate, simulate, render_text
    s = dualpipe(num_ranks=8, num_microbatches=20)
    validate(s)
    print(render_text(simulate(s)))
"""

from dualflow.dualpipe.comms import add_communication
from dualflow.dualpipe.p2p import PipelineStallError
from dualflow.dualpipe.render import render_png, render_svg, render_text, to_chrome_trace
from dualflow.dualpipe.runtime import DualPipe, DualPipeV, PipelineEngine, StepStats
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
    "DualPipe",
    "DualPipeV",
    "Overlap",
    "PipelineEngine",
    "PipelineStallError",
    "Schedule",
    "ScheduleError",
    "Simulation",
    "StepStats",
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
