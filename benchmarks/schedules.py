"""Schedule generation, validation and simulation speed.

Claim checked here (not in a unit test): generating, validating and simulating a DualPipe schedule for
64 ranks and 512 micro-batches takes under 2 seconds. Peer in the same run: torch.distributed.pipelining
building ScheduleDualPipeV's per-rank orders (through its private ``get_schedule_ops``) for the same sizes.

    python benchmarks/schedules.py [--smoke] [--json PATH] [--ranks 64] [--microbatches 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if (Path(__file__).resolve().parents[1] / "dualflow").is_dir():  # a checkout (installed: dualflow/benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualflow.dualpipe.schedule import generate
from dualflow.dualpipe.simulate import simulate
from dualflow.dualpipe.validate import validate
from dualflow.utils.timing import Table, time_fn, write_record

TARGET_S = 2.0


def _torch_dualpipev(ranks: int, microbatches: int):
    try:
        from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    except ImportError:
        return None
    return lambda: get_schedule_ops("DualPipeV", ranks, microbatches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes, few repeats (seconds on a CPU)")
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="append the results as a JSON record")
    args = parser.parse_args(argv)
    P, N, repeat = (8, 32, 2) if args.smoke else (args.ranks, args.microbatches, args.repeat)

    table = Table(["kind", "ranks", "microbatches", "steps", "generate_s", "validate_s", "simulate_s", "total_s",
                   "target"], title=f"schedule generation + validation + simulation, median of {repeat} runs")
    rows = []
    for kind in ("dualpipe", "dualpipev", "1f1b", "zb1p"):
        schedule = generate(kind, P, N)
        gen = time_fn(lambda kind=kind: generate(kind, P, N), warmup=1, repeat=repeat).median
        val = time_fn(lambda schedule=schedule: validate(schedule), warmup=1, repeat=repeat).median
        sim = time_fn(lambda schedule=schedule: simulate(schedule), warmup=1, repeat=repeat).median
        total = gen + val + sim
        row = dict(kind=kind, ranks=P, microbatches=N, steps=sum(len(r) for r in schedule.actions), generate_s=gen,
                   validate_s=val, simulate_s=sim, total_s=total,
                   target=(f"< {TARGET_S:g} s: {'met' if total < TARGET_S else 'MISSED'}"
                           if kind == "dualpipe" else ""))
        table.add(**row)
        rows.append(row)
    peer = _torch_dualpipev(P, N)
    if peer is not None:
        t = time_fn(peer, warmup=0, repeat=max(1, min(repeat, 3))).median
        row = dict(kind="torch ScheduleDualPipeV (generate only)", ranks=P, microbatches=N, generate_s=t)
        table.add(**row)
        rows.append(row)
    table.print()
    if args.json:
        write_record(args.json, "schedules", rows, smoke=args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
