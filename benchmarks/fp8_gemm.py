"""FP8 block-scaled GEMM throughput: dualflow's backends beside torch's BF16 and block-scaled matmuls.

    python benchmarks/fp8_gemm.py [--smoke] [--json PATH] [--backends triton,cutlass] [--repeat N]

Rows are the shapes of DeepSeek's GEMM library table (M x N x K; M tokens, weight N x K) in the forward
layout (1x128 x 128x128, BF16 out), two weight-gradient shapes (1x128 x 1x128 along the tokens, FP32
out), the grouped contiguous layout (4 experts x 8192 rows) and an Fp8Linear forward+backward against
nn.Linear in BF16. TFLOPS = 2*M*N*K / median time (x3 for forward+backward; 1 TFLOPS = 1e12 FLOP/s).
``error`` is ``1 - 2 sum(xy) / sum(x^2 + y^2)`` (float64) against the float64 product of the unquantized
inputs (DeepSeek's metric; FP8 passes below 1e-3). Operands are quantized outside the timed region;
each timed run starts with a cold L2. On a GPU each GEMM is captured in a CUDA graph and the graph is
timed, so that Python and launch overhead (which would dominate the M = 64 rows) stay out of every
implementation's number alike (``--eager`` times the plain calls). The implementations of one shape are
timed interleaved (run i of each, then run i + 1): a GPU's clocks drift under sustained load by more than
the differences measured here, and back-to-back blocks of runs would hand the drift to whichever ran
last. ``--smoke`` runs tiny shapes on whatever device there is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

if (Path(__file__).resolve().parents[1] / "dualflow").is_dir():  # a checkout (installed: dualflow/benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualflow.fp8 import (
    BackendUnavailable,
    Fp8ErrorFlag,
    Fp8Linear,
    Fp8Recipe,
    available_backends,
    fp8_gemm,
    fp8_grouped_gemm,
    quantize_1x128,
    quantize_128x128,
    resolve_backend,
    torch_scaled,
)
from dualflow.utils.logging import print_rank0
from dualflow.utils.timing import Table, cuda_graphed, time_fns, write_record

FORWARD = [(m, n, k) for m in (64, 128, 4096) for n, k in ((2112, 7168), (24576, 1536), (4096, 7168), (7168, 16384))]
WGRAD = [(7168, 2112, 4096), (4096, 7168, 4096)]  # [out, in] = dy.T @ x over 4096 tokens
GROUPED = (4, 8192, 4096, 7168)  # groups, rows per group, N, K
LINEAR = (4096, 7168, 7168)  # tokens, in, out
SMOKE_FORWARD = [(64, 256, 512), (128, 384, 256)]
SMOKE_WGRAD = [(256, 128, 512)]
SMOKE_GROUPED = (2, 128, 256, 256)
SMOKE_LINEAR = (256, 256, 256)

COLUMNS = ["shape", "layout", "impl", "ms", "TFLOPS", "error", "note"]


def _error(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


class Bench:
    def __init__(self, device: torch.device, warmup: int, repeat: int, graphs: bool) -> None:
        self.device, self.warmup, self.repeat, self.graphs = device, warmup, repeat, graphs
        self.table = Table(COLUMNS, title=f"FP8 GEMM on {self._device_name()}")
        self.unavailable: dict[str, str] = {}  # impl -> why it could not run

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def rows(self, shape: str, layout: str, flops: float, exact: torch.Tensor | None,
             entries: list[tuple[str, object, str]], graph: bool = True) -> None:
        """Time the ``(impl, fn, note)`` entries of one shape against each other, their runs interleaved
        (:func:`time_fns`), and add one row each in the order given."""
        ready = {}
        for impl, fn, _ in entries:
            try:
                out = fn()
                timed, mode = cuda_graphed(fn, self.device) if graph and self.graphs else (fn, "eager")
            except BackendUnavailable as exc:
                self.unavailable.setdefault(impl, str(exc))
                continue
            ready[impl] = (timed, mode, out)
        times = time_fns({impl: r[0] for impl, r in ready.items()}, warmup=self.warmup, repeat=self.repeat,
                         device=self.device) if ready else {}
        for impl, _, note in entries:
            if impl not in ready:
                self.table.add(shape=shape, layout=layout, impl=impl, note="unavailable (below)")
                continue
            _, mode, out = ready[impl]
            t = times[impl].median
            error = _error(out, exact) if exact is not None else float("nan")
            self.table.add(shape=shape, layout=layout, impl=impl, ms=t * 1e3, TFLOPS=flops / t / 1e12, error=error,
                           note="; ".join(filter(None, [mode if self.device.type == "cuda" else "", note])))


def _gemm_rows(bench: Bench, m: int, n: int, k: int, backends: list[str], rowwise: bool) -> None:
    dev = bench.device
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    exact = x.double() @ w.double().T
    a, sa = quantize_1x128(x)
    b, sb = (quantize_1x128 if rowwise else quantize_128x128)(w)
    out_dtype = torch.float32 if rowwise else torch.bfloat16
    shape, flops = f"{m}x{n}x{k}", 2.0 * m * n * k
    layout = "1x128.1x128" if rowwise else "1x128.128x128"
    try:
        torch_call = torch_scaled.prepare(a, sa, b, sb, out_dtype, rowwise)
    except BackendUnavailable as exc:
        torch_call = _raiser(exc)
    bench.rows(shape, layout, flops, exact, [
        ("torch bf16 matmul", lambda: x @ w.T, ""),
        ("torch block-scaled", torch_call, "F.scaled_mm (cuBLASLt), scales converted beforehand"),
        *((f"dualflow {name}", lambda name=name: fp8_gemm(a, sa, b, sb, out_dtype, backend=name), "")
          for name in backends)])


def _raiser(exc: Exception):
    def fn():
        raise exc

    return fn


def _grouped_rows(bench: Bench, groups: int, rows: int, n: int, k: int, backends: list[str]) -> None:
    dev = bench.device
    x = torch.randn(groups * rows, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(groups, n, k, device=dev, dtype=torch.bfloat16)
    exact = torch.cat([x[g * rows:(g + 1) * rows].double() @ w[g].double().T for g in range(groups)])
    a, sa = quantize_1x128(x)
    parts = [quantize_128x128(w[g]) for g in range(groups)]
    b, sb = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    offsets = torch.arange(groups + 1, device=dev, dtype=torch.int32) * rows
    errors = Fp8ErrorFlag(dev)  # the offsets checked on the device, as in training: no host synchronisation
    shape, flops = f"{groups}x{rows}x{n}x{k}", 2.0 * groups * rows * n * k
    bench.rows(shape, "grouped contiguous", flops, exact, [
        ("torch bf16 matmul per group", lambda: torch.cat([x[g * rows:(g + 1) * rows] @ w[g].T
                                                           for g in range(groups)]), ""),
        *((f"dualflow {name}", lambda name=name: fp8_grouped_gemm(a, sa, b, sb, group_offsets=offsets, backend=name,
                                                                  errors=errors), "") for name in backends)])
    errors.check()


def _linear_rows(bench: Bench, tokens: int, d_in: int, d_out: int, backends: list[str]) -> None:
    dev = bench.device
    ref = nn.Linear(d_in, d_out, bias=False, device=dev, dtype=torch.bfloat16)
    x = torch.randn(tokens, d_in, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, d_out, device=dev, dtype=torch.bfloat16)
    exact = x.detach().double() @ ref.weight.detach().double().T

    def step(module):
        def fn():
            y = module(x)
            y.backward(dy)
            return y.detach()

        return fn

    shape, flops = f"{tokens}x{d_out}x{d_in}", 3 * 2.0 * tokens * d_in * d_out
    entries = [("nn.Linear bf16", step(ref), "")]
    for backend in backends:
        fp8 = Fp8Linear(d_in, d_out, bias=False, device=dev, dtype=torch.bfloat16,
                        recipe=Fp8Recipe(backend=backend))
        fp8.load_state_dict(ref.state_dict())
        label = f"{backend}: {resolve_backend(backend, dev)}" if backend == "auto" else backend
        entries.append((f"Fp8Linear ({label})", step(fp8), "quantization included; weight cached"))
    bench.rows(shape, "linear fwd+bwd", flops, exact, entries, graph=False)


def _profile_linear(device: torch.device, tokens: int, d_in: int, d_out: int) -> None:
    """Where an Fp8Linear step's device time goes: torch.profiler's kernel table for 5 steps."""
    fp8 = Fp8Linear(d_in, d_out, bias=False, device=device, dtype=torch.bfloat16)
    x = torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, d_out, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        fp8(x).backward(dy)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            fp8(x).backward(dy)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print_rank0(f"Fp8Linear {tokens}x{d_out}x{d_in} forward+backward x5 ({resolve_backend('auto', device)}):")
    print_rank0(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few runs (seconds on a CPU)")
    parser.add_argument("--json", type=Path, help="append the rows as a JSON record to this file")
    parser.add_argument("--backends", help="dualflow backends to time (default: every available one but the "
                                           "reference on a GPU; the reference on a CPU)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per row (default 50, smoke 2)")
    parser.add_argument("--eager", action="store_true", help="time plain calls instead of CUDA graph replays")
    parser.add_argument("--profile", action="store_true",
                        help="print the kernels of one Fp8Linear forward+backward (auto backend), by device time")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",")]
    elif device.type == "cuda":
        usable = available_backends(device)
        backends = [b for b in ("triton", "cutlass") if usable[b] is None]
    else:
        backends = ["reference"]
    repeat = args.repeat or (2 if args.smoke else 50)
    bench = Bench(device, warmup=1 if args.smoke else 5, repeat=repeat, graphs=not args.eager)
    forward, wgrad = (SMOKE_FORWARD, SMOKE_WGRAD) if args.smoke else (FORWARD, WGRAD)
    with torch.no_grad():
        for m, n, k in forward:
            _gemm_rows(bench, m, n, k, backends, rowwise=False)
        for m, n, k in wgrad:
            _gemm_rows(bench, m, n, k, backends, rowwise=True)
        _grouped_rows(bench, *(SMOKE_GROUPED if args.smoke else GROUPED),
                      [b for b in backends if available_backends(device, "contiguous")[b] is None])
    _linear_rows(bench, *(SMOKE_LINEAR if args.smoke else LINEAR), ["auto", *backends])
    if args.profile:
        _profile_linear(device, *(SMOKE_LINEAR if args.smoke else LINEAR))
    bench.table.print()
    for impl, why in bench.unavailable.items():
        print_rank0(f"{impl}: {why}")
    if args.json:
        write_record(args.json, "fp8_gemm", bench.table.rows, smoke=args.smoke, backends=backends, repeat=repeat,
                     graphs=not args.eager, unavailable=bench.unavailable)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
