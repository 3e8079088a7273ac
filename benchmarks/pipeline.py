"""Pipeline runtime: step time, per-action overhead and measured bubble, against torch.distributed.pipelining.

On the same stage modules and micro-batches, in one run:
  dualflow   DualPipe, DualPipeV, 1F1B, ZB1P (this runtime)
  torch      ScheduleDualPipeV, Schedule1F1B (torch.distributed.pipelining)

Two workloads:
  tiny   one small Linear per stage: the step is almost all scheduling, so step time / actions per rank
         is the runtime's overhead per action (target: at most half of torch's);
  timed  stages whose forward, input-gradient and weight-gradient parts take known times (sleeps on the
         CPU, so that ranks sharing cores do not disturb each other; matmuls on GPUs), so the measured
         bubble (step time minus this rank's busy time) can be compared with the simulator's.

    python benchmarks/pipeline.py [--smoke] [--ranks 4] [--microbatches 8] [--json PATH]
    torchrun --nproc-per-node 8 benchmarks/pipeline.py --device cuda          # NCCL on GPUs
Without torchrun the script starts ``--ranks`` processes itself (gloo on the CPU, NCCL with --device cuda).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

if (Path(__file__).resolve().parents[1] / "dualflow").is_dir():  # a checkout (installed: dualflow/benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualflow.dualpipe import Costs, DualPipe, DualPipeV, PipelineEngine, generate, simulate
from dualflow.utils.timing import Table, write_record


class _Sleep(torch.autograd.Function):
    """Identity that takes ``fwd`` seconds in forward and ``bwd`` seconds in backward."""

    @staticmethod
    def forward(ctx, x, fwd: float, bwd: float):
        ctx.bwd = bwd
        time.sleep(fwd)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.bwd)
        return g, None, None


class SleepStage(nn.Module):
    """F, I and W of known duration on the CPU: the input path sleeps F (forward) and I (backward), the
    weight path sleeps W (backward). Sleeping ranks do not compete for the machine's few cores."""

    def __init__(self, d: int, F_s: float, I_s: float, W_s: float) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.costs = (F_s, I_s, W_s)

    def forward(self, x):
        F_s, I_s, W_s = self.costs
        return F.linear(_Sleep.apply(x, F_s, I_s), _Sleep.apply(self.lin.weight, 0.0, W_s), self.lin.bias)


def _stages(workload: str, n: int, args, device) -> list[nn.Module]:
    torch.manual_seed(0)
    d = args.hidden
    if workload == "tiny":
        return [nn.Linear(d, d).to(device) for _ in range(n)]
    if device.type == "cpu":
        return [SleepStage(d, args.f_ms / 1e3, args.i_ms / 1e3, args.w_ms / 1e3) for _ in range(n)]
    h = args.gpu_hidden  # compute-heavy on a GPU: a transformer MLP block
    return [nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h)).to(device, torch.bfloat16)
            for _ in range(n)]


def _stage_costs(stage: nn.Module, x: torch.Tensor, device, args) -> Costs:
    """Durations of one stage's F, B and W for one micro-batch (known for sleeping stages, timed on GPUs)."""
    if device.type == "cpu":
        return Costs(F=args.f_ms / 1e3, B=(args.i_ms + args.w_ms) / 1e3, W=args.w_ms / 1e3)
    from dualflow.dualpipe.backward import backward_split
    from dualflow.utils.timing import time_fn

    x = x.detach().requires_grad_()
    g = torch.randn_like(stage(x))
    box: dict = {}

    def forward():
        box["out"] = stage(x)

    def split():
        forward()
        box["w"] = backward_split([box["out"]], [g], [x])[1]

    f = time_fn(forward, device=device, flush_l2=False).median
    b = time_fn(lambda: box["out"].backward(g), setup=forward, device=device, flush_l2=False).median
    w = time_fn(lambda: box["w"](), setup=split, device=device, flush_l2=False).median
    return Costs(F=f, B=b, W=min(w, b))


def _loss(out, y):
    return F.mse_loss(out, y)


def _dualflow(kind: str, P: int, rank: int, mods: list[nn.Module]):
    s = generate(kind, P, 2 * P)
    local = [mods[s.topology.position[st]] for st in s.stages_of(rank)]
    if kind == "dualpipe":
        return DualPipe(tuple(local)), s
    if kind == "dualpipev":
        return DualPipeV(tuple(local)), s
    return PipelineEngine(local, kind), s


def _run_dualflow(kind, P, rank, N, mods, x, y):
    engine, s = _dualflow(kind, P, rank, mods)
    s = engine.schedule_for(N)
    starts = [c for c, st in enumerate(s.chains) if s.placement[st[0]] == rank]
    ends = [c for c, st in enumerate(s.chains) if s.placement[st[-1]] == rank]
    per_mb = x.shape[0] // N
    off = [sum(s.microbatches[:c]) * per_mb for c in range(len(s.chains))]

    def part(t, c):
        return t[off[c]:off[c] + s.microbatches[c] * per_mb]

    inp = part(x, starts[0]) if starts else None
    lab = (part(y, ends[0]),) if ends else ()

    def step():
        engine.zero_grad(set_to_none=True)
        engine.step(inp, num_chunks=N, criterion=_loss, labels=lab)

    return step, s


def _run_torch(kind, P, rank, N, mods, x, y, device):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

    if kind == "dualpipev":
        stages = [PipelineStage(mods[i], i, 2 * P, device) for i in (rank, 2 * P - 1 - rank)]
        sched = ScheduleDualPipeV(stages, N, loss_fn=_loss)
        first, last = rank == 0, rank == 0
        s = generate("dualpipev", P, N)
    else:
        sched = Schedule1F1B(PipelineStage(mods[rank], rank, P, device), N, loss_fn=_loss)
        first, last = rank == 0, rank == P - 1
        s = generate("1f1b", P, N)

    def step():
        for m in mods:
            m.zero_grad(set_to_none=True)
        args = (x,) if first else ()
        if last:
            sched.step(*args, target=y, losses=[])
        else:
            sched.step(*args)

    return step, s


def _measure(step, device, repeat: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall time of a step (its slowest rank) and median CPU time this rank's process spent in it.

    The CPU time (all threads of the process, so the backend's too) is the runtime's own cost; the wall
    time of tiny stages adds the latency of waking up the ranks that wait for each message.
    """
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(repeat):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    t = torch.tensor([statistics.median(wall), statistics.median(cpu)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    return t[0].item(), t[1].item()


def worker(rank: int, P: int, args, port: int = 0) -> list[dict]:
    """One rank of the benchmark; ``port`` > 0 starts its process group (else one is already up)."""
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if args.device == "cuda" else "cpu")
    if port:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=P,
                                init_method=f"tcp://127.0.0.1:{port}")
    torch.set_num_threads(1)
    N, mb = args.microbatches, args.microbatch_size
    table = Table(["workload", "runtime", "schedule", "ranks", "microbatches", "step_ms", "actions", "us_per_action",
                   "cpu_us_per_action", "bubble_ms", "sim_bubble_ms"],
                  title=f"pipeline runtime on {device.type} ({dist.get_backend()}), median of {args.repeat} steps")
    rows = []
    runs = [("dualflow", k) for k in ("dualpipe", "dualpipev", "1f1b", "zb1p")] + \
           [("torch", k) for k in ("dualpipev", "1f1b")]
    if P % 2:
        runs = [r for r in runs if r[1] != "dualpipe"]
    for workload in ("tiny", "timed"):
        overhead: dict[tuple[str, str], float] = {}
        for runtime, kind in runs:
            n_stages = 2 * P if kind in ("dualpipev",) else P
            mods = _stages(workload, n_stages, args, device)
            d = mods[0].weight.shape[1] if isinstance(mods[0], nn.Linear) else args.hidden if device.type == "cpu" \
                else args.gpu_hidden
            dtype = next(mods[0].parameters()).dtype
            torch.manual_seed(1)
            rows_per_mb = mb if device.type == "cpu" or workload == "tiny" else args.gpu_tokens
            x = torch.randn(N * rows_per_mb, d, device=device, dtype=dtype)
            y = torch.randn(N * rows_per_mb, d, device=device, dtype=dtype)
            if runtime == "dualflow":
                step, s = _run_dualflow(kind, P, rank, N, mods, x, y)
            else:
                try:
                    step, s = _run_torch(kind, P, rank, N, mods, x, y, device)
                except Exception as exc:  # an older torch without the schedule: say so in the table
                    table.add(workload=workload, runtime=runtime, schedule=kind, ranks=P, microbatches=N,
                              step_ms=f"n/a ({type(exc).__name__})")
                    continue
            t, cpu = _measure(step, device, args.repeat)
            row = dict(workload=workload, runtime=runtime, schedule=kind, ranks=P, microbatches=N, step_ms=t * 1e3,
                       actions=max(len(r) for r in s.actions))
            if workload == "tiny":
                row["us_per_action"] = t * 1e6 / row["actions"]
                row["cpu_us_per_action"] = cpu * 1e6 / row["actions"]
                overhead[(runtime, kind)] = (row["us_per_action"], row["cpu_us_per_action"])
            else:
                sim = simulate(s, _stage_costs(mods[0], x[:rows_per_mb], device, args))
                row["bubble_ms"] = (t - min(sim.busy)) * 1e3
                row["sim_bubble_ms"] = sim.max_bubble * 1e3
            table.add(**row)
            rows.append(row)
        for kind in ("dualpipev", "1f1b"):
            if ("torch", kind) in overhead and ("dualflow", kind) in overhead:
                ours, theirs = overhead[("dualflow", kind)], overhead[("torch", kind)]
                row = dict(workload=workload, runtime="dualflow / torch", schedule=kind, ranks=P, microbatches=N,
                           us_per_action=ours[0] / theirs[0], cpu_us_per_action=ours[1] / theirs[1])
                table.add(**row)
                rows.append(row)
    table.print()
    if rank == 0 and args.json:
        write_record(args.json, "pipeline", rows, device=str(device), smoke=args.smoke)
    dist.barrier()
    if port:
        dist.destroy_process_group()
    return rows


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 ranks, few steps: seconds on a CPU")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--microbatch-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--f-ms", type=float, default=10.0, help="forward time of a timed CPU stage")
    parser.add_argument("--i-ms", type=float, default=10.0, help="input-gradient time of a timed CPU stage")
    parser.add_argument("--w-ms", type=float, default=10.0, help="weight-gradient time of a timed CPU stage")
    parser.add_argument("--gpu-hidden", type=int, default=4096, help="hidden size of the GPU timed stages")
    parser.add_argument("--gpu-tokens", type=int, default=2048, help="rows per micro-batch of the GPU timed stages")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.smoke:
        args.ranks, args.microbatches, args.repeat, args.f_ms, args.i_ms, args.w_ms = 2, 4, 1, 0.5, 0.5, 0.5
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        worker(dist.get_rank(), dist.get_world_size(), args)
        return 0
    mp.start_processes(worker, args=(args.ranks, args, _free_port()), nprocs=args.ranks, start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
