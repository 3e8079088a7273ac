"""Host time of one ``Fp8Linear`` forward + backward beside ``nn.Linear``'s: what the Python side of the layer costs.

    python benchmarks/fp8_host.py [--repeat 200] [--shape TOKENS N K] [--profile 25] [--json PATH] [--smoke]

On a GPU: the real backends (``auto``) at 4096x7168x7168 in BF16; host time is the wall time of issuing one
step on an idle GPU (synchronised before, not after), median over ``--repeat`` steps. On the CPU: the
reference backends at a small shape (128x128x128 in FP32 by default, where the arithmetic is small beside
the per-call overhead); there the whole step is host time. The weight is not updated between steps, so
its FP8 copy is served by the layer's cache, as for every micro-batch after the first of an optimizer
step. ``--profile N`` prints the N most expensive functions of the FP8 step (cProfile, cumulative time).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

if (Path(__file__).resolve().parents[1] / "dualflow").is_dir():  # a checkout (installed: dualflow/benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualflow.fp8 import Fp8Linear, Fp8Recipe
from dualflow.utils.timing import Table, write_record


def _step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def fn():
        xx = x.detach().requires_grad_(True)
        module(xx).backward(dy)
    return fn


def _host_us(fn, repeat: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _d: None)
    for _ in range(3):  # warm-up: kernels compiled, caches filled, backends probed
        fn()
    samples = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    sync(device)
    return 1e6 * statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--shape", type=int, nargs=3, metavar=("TOKENS", "N", "K"))
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="few runs")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens, n, k = args.shape or ((4096, 7168, 7168) if cuda else (128, 128, 128))
    repeat = 5 if args.smoke else args.repeat
    recipe = Fp8Recipe() if cuda else Fp8Recipe(backend="reference", quant_backend="reference")
    torch.manual_seed(0)
    bf16 = nn.Linear(k, n, bias=False, device=dev, dtype=dtype)
    fp8 = Fp8Linear(k, n, bias=False, device=dev, dtype=dtype, recipe=recipe)
    fp8.load_state_dict(bf16.state_dict())
    x = torch.randn(tokens, k, device=dev, dtype=dtype)
    dy = torch.randn(tokens, n, device=dev, dtype=dtype)
    fns = {"nn.Linear": _step(bf16, x, dy), "Fp8Linear": _step(fp8, x, dy)}
    host = {name: _host_us(fn, repeat, dev) for name, fn in fns.items()}
    table = Table(["layer", "shape", "dtype", "backend", "host us"],
                  title=f"host time of forward + backward on {dev.type}, median of {repeat}")
    rows = []
    for name, us in host.items():
        row = {"layer": name, "shape": f"{tokens}x{n}x{k}", "dtype": str(dtype).removeprefix("torch."),
               "backend": "-" if name == "nn.Linear" else f"{recipe.backend}/{recipe.quant_backend}", "host us": us}
        table.add(**row)
        rows.append(row)
    table.print()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(repeat):
            fns["Fp8Linear"]()
        profiler.disable()
        print(f"Fp8Linear step, {repeat} runs:")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    if args.json:
        write_record(args.json, "fp8_host", rows, repeat=repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
