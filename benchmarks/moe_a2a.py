"""MoE dispatch/combine bandwidth per backend, beside NCCL's (or gloo's) plain all_to_all_single on the same bytes.

    torchrun --nproc-per-node 8 benchmarks/moe_a2a.py [--backends torch,kernels] [--tokens 512,1024,2048,4096]
    python benchmarks/moe_a2a.py --smoke [--json PATH]      # 2 gloo ranks on the CPU, seconds

Setting (DeepEP's normal-kernel benchmark): 4096 tokens per rank, hidden 7168, top-8 of 256 experts
chosen uniformly at random, FP8 dispatch (7168 bytes + 56 FP32 scales per row), BF16 combine, plus a
sweep of token counts. Bytes are the payload rows a rank sends (a token counts once per destination
rank; top-k ids and weights are not counted). Units as nccl-tests: algbw = bytes / time, busbw = algbw x
(n-1)/n (all-to-all), GB = 1e9 bytes; ``remote GB/s`` counts only the bytes that leave the rank (its
own rows excluded), which is what DeepEP's NVLink figures measure. Times are the slowest rank's median;
the backends and the peer of one token count are timed interleaved (run i of each, then run i + 1).

``--limit-groups M`` adds DeepSeek-V3's group- (node-) limited routing beside the free top-k: the experts
form ``--groups`` groups of consecutive ids (default: one per rank, so a group is a rank's experts; the
number of nodes makes them nodes), a token's experts come from its M best groups
(``dualflow.train.model.select_experts``), and ``bytes/token`` / ``remote bytes/token`` (rank 0's
dispatch layout: bytes it sends per token, all destinations / other ranks only) show what the limit saves.
Without torchrun the script starts its own ranks (``--ranks``, default 2) on gloo.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

if (Path(__file__).resolve().parents[1] / "dualflow").is_dir():  # a checkout (installed: dualflow/benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualflow.comm import Buffer, KernelConfig, get_dispatch_layout
from dualflow.utils.timing import Table, time_fns, write_record

FULL = dict(tokens=[512, 1024, 2048, 4096], hidden=7168, experts=256, topk=8)
SMOKE = dict(tokens=[16, 64], hidden=256, experts=16, topk=4)


def _routing(tokens: int, experts: int, topk: int, seed: int, device: torch.device, groups: int = 1,
             limit: int = 1) -> torch.Tensor:
    """Uniformly random affinities; top-k of all experts, or of the ``limit`` best of ``groups`` groups."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=g)
    if groups == 1:
        return scores.topk(topk, dim=1).indices.to(device)
    from dualflow.train.model import select_experts  # the training job's routing, loaded only for this

    return select_experts(scores, topk, groups, limit).to(device)


def _payload(tokens: int, hidden: int, device: torch.device):
    x = torch.randn(tokens, hidden, device=device)
    scales = x.view(tokens, hidden // 128, 128).abs().amax(-1).clamp(min=1e-4) / 448
    q = (x.view(tokens, hidden // 128, 128) / scales[..., None]).view(tokens, hidden).to(torch.float8_e4m3fn)
    return q, scales


def _slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _row(table, rows, *, backend, op, routing, tokens, seconds, sent, remote, world, sms):
    algbw = sent / seconds / 1e9
    row = dict(backend=backend, op=op, routing=routing, tokens=tokens, us=seconds * 1e6, **{
        "bytes/token": sent / tokens, "remote bytes/token": remote / tokens, "algbw GB/s": algbw,
        "busbw GB/s": algbw * (world - 1) / world, "remote GB/s": remote / seconds / 1e9, "SMs": sms})
    table.add(**row)
    rows.append(row)


def run(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    setting = SMOKE if args.smoke else FULL
    tokens_list = [int(t) for t in args.tokens.split(",")] if args.tokens else setting["tokens"]
    hidden, experts, topk = setting["hidden"], setting["experts"], setting["topk"]
    warmup, repeat = (1, 3) if args.smoke else (5, args.repeat)
    on_gpu = device.type == "cuda"
    backends = args.backends.split(",") if args.backends else (["torch", "kernels"] if on_gpu else ["torch"])
    table = Table(["backend", "op", "routing", "tokens", "us", "bytes/token", "remote bytes/token", "algbw GB/s",
                   "busbw GB/s", "remote GB/s", "SMs"],
                  title=f"MoE all-to-all, {world} ranks, hidden {hidden}, top-{topk} of {experts} experts, "
                        f"FP8 dispatch / BF16 combine ({torch.cuda.get_device_name() if on_gpu else 'cpu, gloo'})")
    rows: list[dict] = []
    fp8_row = hidden + hidden // 128 * 4
    peer_name = "nccl a2a" if on_gpu else "gloo a2a"
    # one buffer per (backend, SM count); the kernels backend is measured at every --num-sms value
    sm_counts = [int(v) for v in str(args.num_sms).split(",")]
    buffers = {}
    for backend in backends:
        for sms in (sm_counts if backend != "torch" else sm_counts[:1]):
            buffer = Buffer(None, hidden, max_tokens_per_rank=max(tokens_list), num_sms=sms, backend=backend,
                            kernel_config=KernelConfig(fp8=True, max_topk=topk))
            buffers[(buffer.backend, buffer.num_sms if buffer.backend == "kernels" else "-")] = buffer
    groups = args.groups or world
    routings = [(f"top-{topk}", 1, 1)]
    if args.limit_groups:
        if experts % groups or args.limit_groups > groups or topk > args.limit_groups * (experts // groups):
            raise SystemExit(f"--limit-groups {args.limit_groups} of --groups {groups}: the {experts} experts must "
                             f"split into the groups, and top-{topk} fit in {args.limit_groups} of them")
        routings.append((f"{args.limit_groups} of {groups} groups", groups, args.limit_groups))
    for tokens, (routing, n_group, limit) in ((t, r) for t in tokens_list for r in routings):
        idx = _routing(tokens, experts, topk, seed=rank, device=device, groups=n_group, limit=limit)
        w = torch.rand(tokens, topk, device=device)
        x = _payload(tokens, hidden, device)
        per_rank = get_dispatch_layout(idx, experts, world).num_tokens_per_rank.tolist()
        rows_sent, rows_remote = sum(per_rank), sum(per_rank) - per_rank[rank]
        # (label, op, bytes per row, SMs, call): every backend and the peer, timed interleaved so that
        # a drift of the clocks during the sweep reaches all of them alike
        cases = []
        for (name, sms), buffer in buffers.items():
            layout = buffer.get_dispatch_layout(idx, experts)
            recv = buffer.dispatch(x, idx, w, experts, layout=layout)
            y = torch.randn(recv[4].num_rows, hidden, device=device).bfloat16()
            cases += [
                (name, "dispatch", fp8_row, sms, partial(buffer.dispatch, x, idx, w, experts, layout=layout)),
                (name, "dispatch cached", fp8_row, sms, partial(buffer.dispatch, x, None, w, experts, handle=recv[4])),
                (name, "combine", 2 * hidden, sms, partial(buffer.combine, y, recv[4], recv[2])),
            ]
        for op, row_bytes in (("dispatch", fp8_row), ("combine", 2 * hidden)):
            # the peer: one all_to_all_single of the same bytes per direction
            send = torch.empty(rows_sent * row_bytes, dtype=torch.uint8, device=device)
            in_splits = [c * row_bytes for c in per_rank]
            out_splits = torch.empty(world, dtype=torch.int64, device=device)
            dist.all_to_all_single(out_splits, torch.tensor(in_splits, device=device))
            out_splits = out_splits.tolist()
            recv_buf = torch.empty(sum(out_splits), dtype=torch.uint8, device=device)
            cases.append((peer_name, op, row_bytes, "-",
                          partial(dist.all_to_all_single, recv_buf, send, out_splits, in_splits)))
        times = time_fns({f"{i}": case[4] for i, case in enumerate(cases)}, warmup=warmup, repeat=repeat,
                         device=device)
        for i, (name, op, row_bytes, sms, _) in enumerate(cases):
            seconds = _slowest(times[f"{i}"].median, device)
            _row(table, rows, backend=name, op=op, routing=routing, tokens=tokens, seconds=seconds,
                 sent=rows_sent * row_bytes, remote=rows_remote * row_bytes, world=world, sms=sms)
    table.print()
    if args.json:
        write_record(args.json, "moe_a2a", rows, world=world, hidden=hidden, experts=experts, topk=topk,
                     num_sms=args.num_sms, groups=groups, limit_groups=args.limit_groups)


def _spawn(ranks: int, argv: list[str]) -> int:
    """Start ``ranks`` copies of this script as a gloo group on this machine (no torchrun needed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(ranks):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env,
                                      stdout=None if r == 0 else subprocess.DEVNULL))
    return max(p.wait() for p in procs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on gloo ranks (seconds on a CPU)")
    parser.add_argument("--json", type=Path, help="append the rows as a JSON record to this file")
    parser.add_argument("--backends", help="comma list of torch, kernels, auto (default: torch and, on GPUs, kernels)")
    parser.add_argument("--tokens", help="comma list of tokens per rank (default 512,1024,2048,4096)")
    parser.add_argument("--num-sms", default="20,24",
                        help="comma list of SM counts for the kernels backend, each measured (default 20,24)")
    parser.add_argument("--repeat", type=int, default=30, help="timed runs per row (default 30)")
    parser.add_argument("--limit-groups", type=int, default=0, metavar="M",
                        help="also measure group-limited routing: each token's experts from its M best groups")
    parser.add_argument("--groups", type=int, default=0,
                        help="expert groups for --limit-groups (default: one per rank; nodes for node-limited)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks to start when not under torchrun (default 2)")
    args = parser.parse_args(argv)
    if "WORLD_SIZE" not in os.environ:
        return _spawn(args.ranks, argv)
    on_gpu = torch.cuda.is_available() and not args.smoke
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if on_gpu else "gloo")
    try:
        run(args)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
