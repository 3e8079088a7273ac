"""The worker program of the launcher tests: init_distributed, gloo collectives, one JSON report per rank.

    python tests/launcher/job.py OUT_DIR [--die-once-on RANK] [--raise-on RANK]

Run by `dualflow launch`, mpirun and srun alike; the tests read the reports.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT",
            "TORCH_FR_DUMP_TEMP_FILE", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "DUALFLOW_LOG_DIR")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--die-once-on", type=int, default=None)
    parser.add_argument("--raise-on", type=int, default=None)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from dualflow.launcher import init_distributed

    ctx = init_distributed(timeout=120)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    print(f"hello from rank {ctx.rank} of {ctx.world_size} (attempt {attempt})", flush=True)
    if args.die_once_on == ctx.rank and attempt == 0:
        os._exit(7)
    if args.raise_on == ctx.rank:
        raise RuntimeError(f"deliberate failure on rank {ctx.rank}")

    total = torch.tensor([float(ctx.rank + 1)], device=ctx.device)
    dist.all_reduce(total)
    payload = torch.arange(4.0, device=ctx.device) * (ctx.rank + 1)  # only the source rank's values may survive
    dist.broadcast(payload, src=ctx.world_size - 1)
    peers: list = [None] * ctx.world_size
    dist.all_gather_object(peers, {"rank": ctx.rank, "local_rank": ctx.local_rank, "host": socket.gethostname(),
                                   "pid": os.getpid()})
    report = {
        "rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank,
        "local_world_size": ctx.local_world_size, "num_nodes": ctx.num_nodes, "device": str(ctx.device),
        "backend": ctx.backend, "source": ctx.source, "dist_rank": dist.get_rank(),
        "current_device": torch.cuda.current_device() if torch.cuda.is_available() else None,
        "dist_world_size": dist.get_world_size(), "sum": total.item(), "broadcast": payload.tolist(),
        "peers": peers, "attempt": attempt, "env": {k: os.environ.get(k) for k in ENV_KEYS},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{ctx.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
