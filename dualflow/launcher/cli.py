"""``dualflow launch [FLAGS] -- SCRIPT|-m MODULE [ARGS...]``: start a job through torchrun."""

from __future__ import annotations

import argparse
import shlex
import sys

from dualflow.launcher.env import LauncherError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc-per-node", default="auto",
                        help="processes per node: a number, or 'auto' (visible GPUs; on a CPU-only machine a "
                             "few gloo workers). Default: auto")
    parser.add_argument("--nnodes", type=int, default=None,
                        help="number of nodes (read from SLURM under srun; default 1 elsewhere)")
    parser.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                        help="c10d rendezvous on the first node (multi-node without SLURM; under srun the "
                             "first host of the nodelist is used)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="restart the whole worker group up to K times after a failure (default 0)")
    parser.add_argument("--log-dir", default=None,
                        help="every rank's output goes to DIR/rank-N.log (default runs/<job>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the torchrun command and environment, start nothing")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- SCRIPT|-m MODULE [ARGS...]",
                        help="the program every worker runs")


def run(args: argparse.Namespace) -> int:
    from dualflow.launcher.launch import launch, plan_launch

    target = list(args.command)
    if target[:1] == ["--"]:
        target = target[1:]
    try:
        plan = plan_launch(target, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
                           rdzv_endpoint=args.rdzv_endpoint, max_restarts=args.max_restarts, log_dir=args.log_dir)
    except LauncherError as exc:
        print(f"dualflow launch: {exc}", file=sys.stderr)
        return 2
    print(plan.summary(), flush=True)
    if plan.differs:
        print("dualflow launch: keeping user settings that differ from the recommendation: "
              + ", ".join(plan.differs), flush=True)
    if args.dry_run:
        print("command: " + plan.command())
        print("environment: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(plan.env.items())))
        return 0
    return launch(plan)
