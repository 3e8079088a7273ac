"""FP8 quantization bandwidth: every quantizer beside a device-to-device copy of the same input.

    python benchmarks/fp8_quant.py [--smoke] [--json PATH] [--backends cuda,triton,reference] [--repeat N]
                                   [--shape ROWS COLS ...] [--weights] [--sweep]

GB/s = bytes moved / median time (1 GB = 1e9 bytes): the BF16 input read once, every FP8 byte and FP32
scale written. The copy row moves the input once in and once out (2 x its bytes); ``of copy`` is the
quantizer's GB/s over the copy's, i.e. how close it runs to the memory bandwidth the same run measured.
Shapes: DeepSeek-V3 activations (4096 and 16384 tokens x hidden 7168, 4096 x 18432 expert input) and a
weight (7168 x 16384, 128x128 blocks); ``--shape`` (repeatable) replaces them with the shapes given, every
quantizer on each (e.g. a training step's: ``--shape 98304 2048 --shape 16384 2048``). On a GPU every row
times CUDA graph replays (as fp8_gemm.py does; ``--eager`` times plain calls). ``--smoke`` runs tiny shapes
on whatever device there is. The ``cuda`` backend (where the CUDA library is built) has rows of its own
for the activation layouts (1x128, 128x1, both): its 128x128 layout is Triton's kernel.
``--weights`` adds a table of FP32 master weights quantized as the FP8 layers do, 128x128 blocks with the
transposed copy the input gradient reads (``quantize_128x128_transposed``, per expert for stacked experts),
beside the 128x128 quantization followed by a transposing copy (what it replaced) and an FP32 copy: the
stacks of DeepSeek-V2-Lite's 64 experts (gate/up 64 x 2816 x 2048, down 64 x 2048 x 1408) and a dense
weight.
``--swiglu`` adds a table of the MoE experts' SwiGLU and its backward fused with both layouts' quantization
of their results (``dualflow.fp8.moe``'s operators on each backend: ``cuda`` the library's one-pass kernel,
``triton`` the Triton kernel and its column quantizer, ``reference`` plain torch), beside a copy of ``h``:
DeepSeek-V2-Lite's experts (98,304 rows of 2 x 1408) and gpu1.toml's (34,816 rows of 2 x 512).
``--sweep`` (GPU) adds a table of the Triton kernel's launch settings (rows and columns per program, warps) for
every layout (on the first ``--shape``, else 16384 x 7168): the tuning behind
``dualflow.fp8.kernels.quant.launch_settings``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if (Path(__file__).resolve().parents[1] / "dualflow").is_dir():  # a checkout (installed: dualflow/benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualflow.fp8 import (
    cuda_quant,
    quantize_1x128,
    quantize_1x128_and_128x1,
    quantize_128x1,
    quantize_128x128,
    quantize_128x128_transposed,
)
from dualflow.fp8.quant import num_blocks
from dualflow.utils.timing import Table, cuda_graphed, time_fns, write_record

ACTIVATIONS = [(4096, 7168), (16384, 7168), (4096, 18432)]
WEIGHTS = [(7168, 16384)]
SMOKE_ACTIVATIONS = [(256, 384)]
SMOKE_WEIGHTS = [(256, 256)]
# (experts, rows per expert, columns): FP32 master weights as the FP8 layers quantize them (--weights)
MASTER_WEIGHTS = [(64, 2816, 2048), (64, 2048, 1408), (1, 2048, 3072)]
SMOKE_MASTER_WEIGHTS = [(2, 256, 384), (1, 128, 256)]
# (rows, hidden): the experts' SwiGLU over h [rows, 2 * hidden] (--swiglu)
SWIGLU = [(98304, 1408), (34816, 512)]
SMOKE_SWIGLU = [(256, 128)]


def _out_bytes(name: str, r: int, c: int) -> int:
    row = r * c + 4 * r * num_blocks(c)  # fp8 [r, c] + fp32 scales [r, c/128]
    col = r * c + 4 * c * num_blocks(r)  # fp8 [c, r] + fp32 scales [c, r/128]
    return {"quantize_1x128": row, "quantize_128x1": col, "quantize_1x128_and_128x1": row + col,
            "quantize_128x128": r * c + 4 * num_blocks(r) * num_blocks(c)}[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few runs (seconds on a CPU)")
    parser.add_argument("--json", type=Path, help="append the rows as a JSON record to this file")
    parser.add_argument("--backends", help="quantization backends (default: cuda where the CUDA library is built, "
                                           "triton and reference on a GPU; reference on a CPU)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per row (default 50, smoke 2)")
    parser.add_argument("--eager", action="store_true", help="time plain calls instead of CUDA graph replays")
    parser.add_argument("--sweep", action="store_true", help="also time the Triton kernel's launch settings")
    parser.add_argument("--weights", action="store_true",
                        help="also time FP32 weights quantized with their transposes (as the FP8 layers do)")
    parser.add_argument("--swiglu", action="store_true",
                        help="also time SwiGLU and its backward fused with their results' quantization")
    parser.add_argument("--shape", type=int, nargs=2, action="append", metavar=("ROWS", "COLS"),
                        help="a shape to time every quantizer on (repeatable; replaces the default shapes)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.sweep and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--sweep times the Triton kernel: it needs a CUDA GPU, or TRITON_INTERPRET=1 on a CPU")
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",")]
    else:
        backends = ["triton", "reference"] if device.type == "cuda" else ["reference"]
        if device.type == "cuda" and cuda_quant.unavailable_reason(device) is None:
            backends.insert(0, "cuda")  # the CUDA library's activation quantizer
    repeat = args.repeat or (2 if args.smoke else 50)
    warmup = 1 if args.smoke else 5
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table = Table(["shape", "op", "backend", "ms", "GB/s", "of copy"], title=f"FP8 quantization on {name}")
    activations, weights = (SMOKE_ACTIVATIONS, SMOKE_WEIGHTS) if args.smoke else (ACTIVATIONS, WEIGHTS)
    if args.shape:
        activations, weights = [tuple(s) for s in args.shape], [tuple(s) for s in args.shape]
    if any(r < 1 or c < 1 for r, c in activations):
        parser.error(f"--shape: rows and columns must be >= 1, got {args.shape}")
    cases = [(shape, fn) for shape in activations
             for fn in (quantize_1x128, quantize_128x1, quantize_1x128_and_128x1)]
    cases += [(shape, quantize_128x128) for shape in weights]
    copy_gbs: dict[tuple[int, int], float] = {}

    def graphed(fn):
        return fn if args.eager else cuda_graphed(fn, device)[0]

    def timed(fn) -> float:
        return time_fns({"fn": graphed(fn)}, warmup=warmup, repeat=repeat, device=device)["fn"].median

    ops: dict[tuple[int, int], list] = {}
    for shape, fn in cases:
        ops.setdefault(shape, []).append(fn)
    for (r, c), fns in ops.items():
        x = torch.randn(r, c, device=device, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        calls = {("copy (bf16)", "torch"): (lambda x=x, y=y: y.copy_(x), 2 * x.nbytes)}
        calls.update({(fn.__name__, backend): (lambda fn=fn, backend=backend, x=x: fn(x, backend=backend),
                                               x.nbytes + _out_bytes(fn.__name__, r, c))
                      for fn in fns for backend in backends if _runs(fn.__name__, backend)})
        copy_gbs[(r, c)] = _add_rows(table, {"shape": f"{r}x{c}"}, calls, graphed, warmup, repeat, device)
    table.print()
    if args.json:
        write_record(args.json, "fp8_quant", table.rows, smoke=args.smoke, backends=backends, repeat=repeat,
                     graphs=not args.eager and device.type == "cuda")
    if args.weights:
        weights_table = _weights(SMOKE_MASTER_WEIGHTS if args.smoke else MASTER_WEIGHTS, device, backends, graphed,
                                 warmup, repeat)
        weights_table.print()
        if args.json:
            write_record(args.json, "fp8_quant_weights", weights_table.rows, smoke=args.smoke, backends=backends,
                         repeat=repeat)
    if args.swiglu:
        swiglu_table = _swiglu(SMOKE_SWIGLU if args.smoke else SWIGLU, device, backends, graphed, warmup, repeat)
        swiglu_table.print()
        if args.json:
            write_record(args.json, "fp8_quant_swiglu", swiglu_table.rows, smoke=args.smoke, backends=backends,
                         repeat=repeat)
    if args.sweep:
        sweep_shape = activations[0] if args.shape else activations[-1] if args.smoke else (16384, 7168)
        sweep = _sweep(sweep_shape, device, timed, copy_gbs)
        sweep.print()
        if args.json:
            write_record(args.json, "fp8_quant_sweep", sweep.rows, smoke=args.smoke, repeat=repeat)
    return 0


def _runs(op: str, backend: str) -> bool:
    # the cuda backend has its own kernel for the activation layouts only (128x128 is Triton's: no own row)
    return backend != "cuda" or op != "quantize_128x128"


def _weights(stacks, device: torch.device, backends: list[str], graphed, warmup: int, repeat: int) -> Table:
    """FP32 weight stacks ``[G*R, C]``: 128x128 blocks and each expert's transpose from one call, against the
    blocks followed by a transposing copy, and an FP32 copy (interleaved, per stack)."""
    table = Table(["weight", "op", "backend", "ms", "GB/s", "of copy"], title="FP32 weights to FP8 with transposes")
    for g, r, c in stacks:
        w = torch.randn(g * r, c, device=device)
        y = torch.empty_like(w)
        out = 2 * g * r * c + 2 * 4 * g * num_blocks(r) * num_blocks(c)  # q and qt, their scales
        calls = {("copy (fp32)", "torch"): (lambda w=w, y=y: y.copy_(w), 2 * w.nbytes)}
        for backend in filter(lambda b: _runs("quantize_128x128", b), backends):
            calls[("quantize_128x128_transposed", backend)] = (
                lambda w=w, g=g, b=backend: quantize_128x128_transposed(w, groups=g, backend=b), w.nbytes + out)
            # what it replaced: the blocks, then the transpose of each expert's block by a copy
            calls[("quantize_128x128 + transposing copy", backend)] = (
                lambda w=w, g=g, r=r, c=c, b=backend:
                quantize_128x128(w, backend=b)[0].view(g, r, c).transpose(1, 2).contiguous(), w.nbytes + out)
        _add_rows(table, {"weight": f"{g}x{r}x{c}"}, calls, graphed, warmup, repeat, device)
    return table


def _swiglu(shapes, device: torch.device, backends: list[str], graphed, warmup: int, repeat: int) -> Table:
    """SwiGLU forward and backward with both layouts' quantization of their results, per backend, beside a
    copy of ``h`` (interleaved, per shape). Bytes moved: the operands read once, the FP8 bytes and scales
    written (what a one-pass kernel must move)."""
    from dualflow.fp8.moe import run_swiglu_backward_quantize, run_swiglu_quantize

    table = Table(["rows x hidden", "op", "backend", "ms", "GB/s", "of copy"],
                  title="SwiGLU fused with FP8 quantization (1x128 and 128x1)")
    for t, hidden in shapes:
        h = torch.randn(t, 2 * hidden, device=device, dtype=torch.bfloat16) * 2
        da = torch.randn(t, hidden, device=device, dtype=torch.bfloat16)
        y = torch.empty_like(h)
        fwd = h.nbytes + _out_bytes("quantize_1x128_and_128x1", t, hidden)
        bwd = h.nbytes + da.nbytes + _out_bytes("quantize_1x128_and_128x1", t, 2 * hidden)
        calls = {("copy (bf16 h)", "torch"): (lambda h=h, y=y: y.copy_(h), 2 * h.nbytes)}
        for backend in backends:
            fused = backend != "reference"
            calls[("swiglu", backend)] = (
                lambda h=h, f=fused, b=backend: run_swiglu_quantize(h, False, f, b, None), fwd)
            calls[("swiglu backward", backend)] = (
                lambda h=h, da=da, f=fused, b=backend: run_swiglu_backward_quantize(h, da, False, f, b, None), bwd)
        _add_rows(table, {"rows x hidden": f"{t}x{hidden}"}, calls, graphed, warmup, repeat, device)
    return table


def _add_rows(table: Table, label: dict, calls: dict, graphed, warmup: int, repeat: int,
              device: torch.device) -> float:
    """Time ``calls`` (``{(op, backend): (fn, bytes moved)}``, the copy first) interleaved, so that clock
    drift reaches all alike; add a row each, its GB/s beside the copy's; returns the copy's GB/s."""
    keys = {f"{op}/{backend}": (op, backend) for op, backend in calls}
    times = time_fns({key: graphed(calls[k][0]) for key, k in keys.items()}, warmup=warmup, repeat=repeat,
                     device=device)
    copy_gbs = None
    for key, (op, backend) in keys.items():
        t = times[key].median
        gbs = calls[(op, backend)][1] / t / 1e9
        copy_gbs = copy_gbs or gbs  # the first call is the copy
        table.add(**label, op=op, backend=backend, ms=t * 1e3, **{"GB/s": gbs, "of copy": gbs / copy_gbs})
    return copy_gbs


def _sweep(shape: tuple[int, int], device: torch.device, timed, copy_gbs: dict) -> Table:
    from dualflow.fp8.kernels.quant import quantize as kernel

    r, c = shape
    x = torch.randn(r, c, device=device, dtype=torch.bfloat16)
    if shape not in copy_gbs:
        y = torch.empty_like(x)
        copy_gbs[shape] = 2 * x.nbytes / timed(lambda: y.copy_(x)) / 1e9
    table = Table(["layout", "tile_r", "tile_c", "warps", "ms", "GB/s", "of copy"],
                  title=f"Triton quantizer launch sweep, {r}x{c}")
    # (layout, op, rows per program, columns per program, modes): a layout alone may narrow its own tiles
    layouts = (("1x128", "quantize_1x128", (32, 64, 128), (128,), (True, False, False)),
               ("128x1", "quantize_128x1", (128,), (32, 64, 128), (False, True, False)),
               ("1x128+128x1", "quantize_1x128_and_128x1", (128,), (128,), (True, True, False)),
               ("128x128", "quantize_128x128", (128,), (128,), (False, False, True)))
    for layout, name, tiles_r, tiles_c, (rowwise, colwise, blockwise) in layouts:
        moved = x.nbytes + _out_bytes(name, r, c)
        for tile_r in tiles_r:
            for tile_c in tiles_c:
                for warps in (1, 2, 4, 8, 16):
                    if tile_r * tile_c < 32 * warps * 8:  # fewer than 8 elements a thread: never faster
                        continue
                    t = timed(lambda tile_r=tile_r, tile_c=tile_c, warps=warps, m=(rowwise, colwise, blockwise):
                              kernel(x, rowwise=m[0], colwise=m[1], blockwise=m[2], pow2_scales=False,
                                     tile_r=tile_r, tile_c=tile_c, num_warps=warps))
                    gbs = moved / t / 1e9
                    table.add(layout=layout, tile_r=tile_r, tile_c=tile_c, warps=warps, ms=t * 1e3,
                              **{"GB/s": gbs, "of copy": gbs / copy_gbs[shape]})
    return table


if __name__ == "__main__":
    raise SystemExit(main())
