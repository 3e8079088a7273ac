"""FP8 layers against their BF16 peers, forward + backward, eager: step time and host time per step.

    python benchmarks/fp8_layers.py [--repeat 30] [--json PATH] [--smoke]

- ``Fp8Linear`` vs ``nn.Linear`` (BF16 weights) at tokens x out x in = 4096x7168x7168, 8192x4096x4096,
  16384x2048x2048;
- the grouped expert layer ``Fp8GroupedLinear`` vs BF16 ``torch._grouped_mm`` over 4 experts x 8192 rows
  at N x K = 4096x7168 and 7168x2048.

Step time: median of CUDA-event timings of plain calls, the two implementations interleaved (the GPU
waits for the host where the host is slower, so this is what a training loop sees). Host time: the
wall time of issuing one step on an idle GPU (synchronised before), median of the same number of runs.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

if (Path(__file__).resolve().parents[1] / "dualflow").is_dir():  # a checkout (installed: dualflow/benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualflow.fp8 import Fp8GroupedLinear, Fp8Linear
from dualflow.utils.timing import Table, time_fns, write_record

LINEAR = [(4096, 7168, 7168), (8192, 4096, 4096), (16384, 2048, 2048)]
GROUPED = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048)]


def _host_ms(fn, repeat: int, device: torch.device) -> float:
    samples = []
    for _ in range(repeat):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    torch.cuda.synchronize(device)
    return 1e3 * statistics.median(samples)


def _step(module_call, x: torch.Tensor, dy: torch.Tensor):
    def fn():
        xx = x.detach().requires_grad_(True)
        module_call(xx).backward(dy)
    return fn


class _Bf16Grouped(nn.Module):
    def __init__(self, weight: torch.Tensor, ends: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.ends = nn.Parameter(weight), ends

    def forward(self, x):
        return torch._grouped_mm(x, self.weight.transpose(-2, -1), offs=self.ends)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="small shapes, few runs")
    parser.add_argument("--sweep-wgrad", action="store_true",
                        help="only time the token-grouped FP8 weight-gradient kernel's configurations against BF16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fp8_layers: needs a CUDA GPU (the FP8 GEMMs are Hopper kernels)")
    dev = torch.device("cuda")
    if args.sweep_wgrad:
        return _sweep_wgrad(dev, 3 if args.smoke else args.repeat)
    repeat = 3 if args.smoke else args.repeat
    linear = [(512, 256, 256)] if args.smoke else LINEAR
    grouped = [(2, 256, 256, 256)] if args.smoke else GROUPED
    table = Table(["layer", "shape", "BF16 ms", "FP8 ms", "speed-up", "BF16 host ms", "FP8 host ms"],
                  title="FP8 layers vs BF16, forward + backward, eager")
    rows = []
    for tokens, n, k in linear:
        torch.manual_seed(0)
        bf16 = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        fp8 = Fp8Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        fp8.load_state_dict(bf16.state_dict())
        x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16)
        dy = torch.randn(tokens, n, device=dev, dtype=torch.bfloat16)
        fns = {"bf16": _step(bf16, x, dy), "fp8": _step(fp8, x, dy)}
        rows.append(_row(table, "Linear", f"{tokens}x{n}x{k}", fns, repeat, dev))
    for groups, per, n, k in grouped:
        torch.manual_seed(0)
        w = torch.randn(groups, n, k, device=dev, dtype=torch.bfloat16) * k ** -0.5
        ends = torch.arange(1, groups + 1, device=dev, dtype=torch.int32) * per
        bf16 = _Bf16Grouped(w.clone(), ends)
        fp8 = Fp8GroupedLinear(groups, k, n, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            fp8.weight.copy_(w)
        sizes = [per] * groups
        x = torch.randn(groups * per, k, device=dev, dtype=torch.bfloat16)
        dy = torch.randn(groups * per, n, device=dev, dtype=torch.bfloat16)
        fns = {"bf16": _step(bf16, x, dy), "fp8": _step(lambda t, m=fp8, s=sizes: m(t, s), x, dy)}
        rows.append(_row(table, "grouped", f"{groups}x{per} rows, {n}x{k}", fns, repeat, dev))
    table.print()
    if args.json:
        write_record(args.json, "fp8_layers", rows, repeat=repeat)
    return 0


def _skewed_counts(experts: int, tokens: int, seed: int = 0) -> list[int]:
    """Per-expert token counts, multiples of 128 summing to ``tokens``, skewed as a trained router's are:
    weights ``1 / rank^0.8`` in a shuffled order, a few experts without tokens."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 0.8
    weights[torch.randperm(experts, generator=g)[: max(1, experts // 16)]] = 0.0
    weights = weights[torch.randperm(experts, generator=g)]
    share = weights / weights.sum() * (tokens // 128)
    blocks = share.floor().long()
    left = tokens // 128 - int(blocks.sum())  # the rounding remainder, to the largest fractions
    blocks[torch.argsort(share - blocks, descending=True)[:left]] += 1
    return [128 * int(b) for b in blocks]


def _sweep_wgrad(dev: torch.device, repeat: int) -> int:
    """The weight gradients of 64 experts over 98,304 tokens (V2-Lite's gate/up projection 2816 x 2048 and
    down projection 2048 x 1408), with 1,536 tokens per expert and with skewed counts: the Triton kernel's
    configurations and each CUTLASS k-grouped configuration against torch's BF16 grouped GEMM grouped along the
    tokens."""
    from dualflow.fp8 import cutlass
    from dualflow.fp8.kernels.grouped_wgrad import kgrouped_wgrad
    from dualflow.fp8.quant import quantize_128x1

    experts, tokens = 64, 98304
    table = Table(["case", "kernel", "ms", "TFLOPS"], title=f"token-grouped weight gradient: {experts} experts, "
                                                           f"{tokens} tokens")
    for (n, m), skewed in itertools.product(((2816, 2048), (2048, 1408)), (False, True)):
        counts = _skewed_counts(experts, tokens) if skewed else [tokens // experts] * experts
        case = f"{n}x{m}, {'skewed' if skewed else 'uniform'} (max {max(counts)}, {counts.count(0)} empty)"
        dy = torch.randn(tokens, n, device=dev, dtype=torch.bfloat16)
        x = torch.randn(tokens, m, device=dev, dtype=torch.bfloat16)
        offsets = torch.tensor([0, *itertools.accumulate(counts)], device=dev, dtype=torch.int32)
        (gt, gs), (xt, xs) = quantize_128x1(dy), quantize_128x1(x)
        out = torch.empty(experts, n, m, device=dev, dtype=torch.float32)
        fns = {"bf16 grouped_mm": lambda dy=dy, x=x, o=offsets: torch._grouped_mm(dy.t(), x, offs=o[1:])}
        for bn, bm, warps, stages in [(128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4), (128, 256, 8, 3),
                                      (256, 128, 8, 3), (64, 128, 4, 4)]:
            cfg = dict(block_n=bn, block_m=bm, num_warps=warps, num_stages=stages)
            fns[f"fp8 {bn}x{bm} w{warps} s{stages}"] = (
                lambda c=cfg, a=(gt, gs, xt, xs, offsets, out): kgrouped_wgrad(*a, **c))
        for config in (c.name for c in cutlass.CONFIGS if c.kind == "kgrouped_wgrad"):
            fns[f"fp8 cutlass {config}"] = (
                lambda c=config, a=(gt, gs, xt, xs, offsets): cutlass.kgrouped_wgrad(*a, config=c))
        for name in list(fns):  # a configuration that does not compile or launch here is reported and left out
            try:
                fns[name]()
            except Exception as exc:
                print(f"fp8_layers: {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
                del fns[name]
        flops = 2.0 * n * m * tokens
        for name, t in time_fns(fns, warmup=2, repeat=repeat, device=dev).items():
            table.add(case=case, kernel=name, ms=1e3 * t.median, TFLOPS=flops / t.median / 1e12)
        del dy, x, gt, xt, out
    table.print()
    return 0


def _row(table: Table, layer: str, shape: str, fns: dict, repeat: int, dev: torch.device) -> dict:
    t = time_fns(fns, warmup=3, repeat=repeat, device=dev, flush_l2=False)
    host = {name: _host_ms(fn, repeat, dev) for name, fn in fns.items()}
    row = {"layer": layer, "shape": shape, "BF16 ms": 1e3 * t["bf16"].median, "FP8 ms": 1e3 * t["fp8"].median,
           "speed-up": t["bf16"].median / t["fp8"].median, "BF16 host ms": host["bf16"], "FP8 host ms": host["fp8"]}
    table.add(**row)
    return row


if __name__ == "__main__":
    raise SystemExit(main())
