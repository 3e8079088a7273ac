"""Training throughput of the main job: tokens/s, step time and MFU, BF16 vs FP8, with and without the F&B overlap.

    python benchmarks/train_throughput.py CONFIG [--nproc N] [--steps 40] [--warmup 10]
                                          [--variants base,fp8,base-serial,fp8-serial] [--json PATH] [--smoke]

Each variant is one run of ``dualflow launch --nproc-per-node N -- -m dualflow train CONFIG --fresh`` with
the overrides below, into a temporary run directory; the numbers come from that run's metrics.jsonl
(written by rank 0): medians over the steps after ``--warmup`` (compilation, allocator and routing
warm-up stay out), MFU where the trainer reports it (a known GPU peak, not under FP8), peak memory.
The ratio column divides each variant's tokens/s by the first variant's, measured in the same
invocation. Variants run one after the other: on a GPU compare them within one invocation only.

- ``base``: the config as it is, FP8 off, overlap on;  ``fp8``: FP8 linears (and FP8 dispatch as the
  config says), overlap on;  ``*-serial``: the same with ``parallel.overlap = false``;  ``*-eager``: the
  same without the CUDA-graph replay of a one-GPU step (``train.cuda_graph = off``);  ``*-nocompile``: the
  same without compiling the compute phases (``train.compile = off``);  ``fp8-cutlass``: ``fp8`` with the
  CUTLASS GEMMs first (``train.fp8_backend = "cutlass,torch"``: the experts' weight gradients on the
  k-grouped CUTLASS kernel, cuBLAS where CUTLASS does not run a shape);  ``fp8-cutlass-wgrad``: ``fp8``
  with only the experts' weight gradients on that CUTLASS kernel (``train.fp8_wgrad_backend = "cutlass"``);
  ``fp8-snapshots``: ``fp8`` with the weights quantized once a step (``train.fp8_weight_snapshots``);
  ``fp8-cuda-quant``: ``fp8`` with the CUDA library's activation quantizer (``train.fp8_quant_backend =
  "cuda"``: what ``auto`` takes where the library is built; this variant fails where it is not);
  ``fp8-triton-quant``: ``fp8`` with Triton's quantizers only (``train.fp8_quant_backend = "triton"``).
- ``hf-eager``, ``hf-grouped_mm``: the peer, transformers' ``DeepseekV3ForCausalLM`` at the same widths,
  batch and data (benchmarks/hf_peer.py; one GPU, MLA configs; transformers must be installed).

A variant named twice runs twice (the second as ``fp8#2``): the run-to-run spread of its times, and a
line saying whether its per-step training losses repeat the first run's bit for bit (or where they
first differ). ``--rounds R`` runs the whole list R times in turn (``base,fp8,base,fp8,...``: the
variants interleaved, so that clock and thermal drift reach them alike): each row is then the median
of its rounds, ``spread`` the rounds' step times' (max - min) / median, and every later round's losses
are compared with the variant's first run as above.
``--set SECTION.KEY=VALUE`` (repeatable) overrides the config for every variant, the peer included.
``val loss`` is the validation loss after the last step (``--val-batches`` batches, 1 by default): with
the same seed and data it compares the variants' quality, e.g. FP8 against BF16 after 300 steps
(``--steps 300 --val-batches 8 --variants base,fp8``); ``val gap`` is it relative to the first variant's
(the quality target's measure: a loss near 1 needs more digits than the loss column shows).
``--profile`` profiles one step after the warm-up of each dualflow variant and prints where its time
went (host vs device, top kernels; train/profile.py); the full text stays in the run directory.
No variant writes a checkpoint (``checkpoint.enabled = false``): a model of this size with its optimizer
state would fill a GPU machine's disk.

``--smoke`` runs configs/tiny_moe.toml on 2 CPU processes for a few steps (seconds per variant).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # a checkout, or the installed package (configs/ beside us)
CHECKOUT = (ROOT / "dualflow").is_dir()
if CHECKOUT:
    sys.path.insert(0, str(ROOT))

from dualflow.utils.timing import Table, write_record  # noqa: E402

VARIANTS = {
    "base": ["--train.fp8=false", "--parallel.overlap=true"],
    "fp8": ["--train.fp8=true", "--parallel.overlap=true"],
    "base-serial": ["--train.fp8=false", "--parallel.overlap=false"],
    "fp8-serial": ["--train.fp8=true", "--parallel.overlap=false"],
    "base-eager": ["--train.fp8=false", "--train.cuda_graph=off"],
    "fp8-eager": ["--train.fp8=true", "--train.cuda_graph=off"],
    "base-nocompile": ["--train.fp8=false", "--train.compile=off"],
    "fp8-nocompile": ["--train.fp8=true", "--train.compile=off"],
    "fp8-cutlass": ["--train.fp8=true", "--train.fp8_backend=cutlass,torch"],
    "fp8-cutlass-wgrad": ["--train.fp8=true", "--train.fp8_wgrad_backend=cutlass"],
    "fp8-snapshots": ["--train.fp8=true", "--train.fp8_weight_snapshots=true"],
    "fp8-cuda-quant": ["--train.fp8=true", "--train.fp8_quant_backend=cuda"],
    "fp8-triton-quant": ["--train.fp8=true", "--train.fp8_quant_backend=triton"],
    "hf-eager": [],
    "hf-grouped_mm": [],
}
COLUMNS = ["variant", "steps", "tokens/s", "ratio", "step ms", "spread", "MFU", "peak MB", "final loss", "val loss",
           "val gap"]


def summarize(metrics: Path, warmup: int) -> dict:
    """Medians of a run's metrics.jsonl over the steps after ``warmup``."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r]
    vals = [r for r in records if "val_loss" in r and r["step"] > 0]
    timed = [r for r in steps if r["step"] > warmup] or steps
    if not timed:
        raise ValueError(f"{metrics} holds no training step")
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {
        "steps": len(timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "step_ms": 1e3 * statistics.median(r["step_time_s"] for r in timed),
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_mb": max(r.get("peak_memory_mb") or 0.0 for r in timed),
        "final_loss": steps[-1]["loss"],
        "losses": [r["loss"] for r in steps],
        "val_loss": vals[-1]["val_loss"] if vals else None,  # at the last step (val_every = steps)
    }


def val_gap(val: float | None, base: float | None) -> str:
    """``val`` relative to ``base`` as a signed percentage with two decimals (``-`` where either is missing)."""
    if val is None or base is None or base == 0:
        return "-"
    return f"{100 * (val - base) / base:+.2f}%"


def combine_rounds(runs: list[dict]) -> dict:
    """One variant's summaries from several rounds as one: medians of the rounds' medians (tokens/s, step
    time, MFU), the largest peak, the first round's losses, and ``spread``: the rounds' step times'
    (max - min) / median (None for one round)."""
    times = [r["step_ms"] for r in runs]
    mfu = [r["mfu"] for r in runs if r.get("mfu") is not None]
    step_ms = statistics.median(times)
    return {**runs[0], "steps": sum(r["steps"] for r in runs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs), "step_ms": step_ms,
            "mfu": statistics.median(mfu) if mfu else None,
            "peak_mb": max(r.get("peak_mb") or 0.0 for r in runs),
            "spread": (max(times) - min(times)) / step_ms if len(runs) > 1 and step_ms else None}


def compare_losses(first: list[float], again: list[float]) -> str:
    """Whether a repeated run's per-step training losses are the first run's, bit for bit (JSON keeps the
    float's shortest exact repr, so equal values are equal bits); else where they first differ."""
    for step, (a, b) in enumerate(zip(first, again), start=1):
        if a != b:
            return f"first differs at step {step} ({a!r} against {b!r})"
    if len(first) != len(again):
        return f"the same over {min(len(first), len(again))} steps, then {len(first)} against {len(again)} steps"
    return f"bit-identical over {len(first)} steps"


def _run(config: Path, nproc: int, steps: int, extra: list[str], run_dir: Path, log: Path) -> None:
    cmd = [sys.executable, "-m", "dualflow", "launch", "--nproc-per-node", str(nproc), "--log-dir",
           str(run_dir / "logs"), "--", "-m", "dualflow", "train", str(config.resolve()), "--fresh",
           f"--train.steps={steps}", f"--train.run_dir={run_dir}", f"--train.val_every={steps}",
           "--checkpoint.enabled=false", *extra]
    _call(cmd, log)


def _run_peer(config: Path, experts: str, steps: int, warmup: int, sets: list[str], out: Path, log: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "hf_peer.py"), str(config), "--experts", experts,
           "--steps", str(steps), "--warmup", str(warmup), "--json-out", str(out),
           *(f"--override={s}" for s in sets)]
    _call(cmd, log)
    return json.loads(out.read_text())


def _call(cmd: list[str], log: Path) -> None:
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT if CHECKOUT else None, stdout=fh, stderr=subprocess.STDOUT,
                              env=dict(os.environ))
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"training run failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path, help="training config (TOML); --smoke: tiny_moe")
    parser.add_argument("--nproc", type=int, default=None, help="processes (default: the config's world size)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 40, smoke 4)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the medians (default 10, smoke 1)")
    parser.add_argument("--variants", default="base,fp8,base-serial,fp8-serial",
                        help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--keep", type=Path, help="keep each run's directory under this path")
    parser.add_argument("--json", type=Path, help="append the table as a JSON record to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny_moe on 2 CPU processes, a few steps")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every variant (repeatable)")
    parser.add_argument("--profile", action="store_true", help="profile one step of each dualflow variant")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the variant list this many times in turn; rows are medians over the rounds")
    parser.add_argument("--val-batches", type=int, default=1,
                        help="validation batches at the last step (the val loss column; more for a quality comparison)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    config = args.config or (ROOT / "configs" / "tiny_moe.toml" if args.smoke else None)
    if config is None or not config.is_file():
        parser.error(f"config {config} not found" if config else "give a config (or --smoke)")
    steps = args.steps or (4 if args.smoke else 40)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10)
    sets = [s.removeprefix("--") for s in args.set]
    if args.smoke:  # 2 processes: 1 pipeline rank x 2 expert-parallel ranks, a small batch
        sets = ["parallel.pp=1", "parallel.dp=2", "parallel.microbatches=2", "train.global_batch=4", *sets]
    extra = [f"--{s}" for s in sets] + [f"--train.val_batches={args.val_batches}"]
    if args.profile:
        extra.append(f"--train.profile_step={min(warmup + 2, steps)}")
    nproc = args.nproc or (2 if args.smoke else _world(config))
    table = Table(COLUMNS, title=f"training throughput: {config.name}, {nproc} process(es), {steps} steps, "
                                 f"medians after step {warmup}"
                                 + (f", {args.rounds} rounds in turn" if args.rounds > 1 else ""))
    # a variant named again runs again, as name#2, ...
    labels = [name if variants[:i + 1].count(name) == 1 else f"{name}#{variants[:i + 1].count(name)}"
              for i, name in enumerate(variants)]
    repeats = {}  # a repeated run's label -> how its per-step losses compare with the variant's first run
    losses = {}
    results: dict[str, list[dict]] = {label: [] for label in labels}
    with tempfile.TemporaryDirectory(prefix="dualflow-train-bench-") as tmp:
        root = args.keep or Path(tmp)
        for rnd in range(1, args.rounds + 1):  # the list in turn, so that drift reaches every variant alike
            for name, label in zip(variants, labels):
                tag = label if args.rounds == 1 else f"{label} (round {rnd})"
                run_dir = root / label if args.rounds == 1 else root / label / f"round{rnd}"
                run_dir.mkdir(parents=True, exist_ok=True)
                print(f"train_throughput: {tag} ...", file=sys.stderr, flush=True)
                if name.startswith("hf-"):
                    s = _run_peer(config, name[3:], steps, warmup, sets, run_dir / "peer.json",
                                  run_dir / "launch.log")
                    s["mfu"] = None
                else:
                    _run(config, nproc, steps, [*extra, *VARIANTS[name]], run_dir, run_dir / "launch.log")
                    s = summarize(run_dir / "metrics.jsonl", warmup)
                    if args.profile and rnd == 1:
                        _show_profile(name, run_dir / "profile-rank0.txt")
                if "losses" in s:
                    if name in losses:
                        repeats[tag] = compare_losses(losses[name], s["losses"])
                    else:
                        losses[name] = s["losses"]
                results[label].append(s)
    rows = []
    base = base_val = None
    for label in labels:
        s = combine_rounds(results[label])
        base = base or s["tokens_per_s"]
        val = s.get("val_loss")
        base_val = base_val if base_val is not None else val
        row = {"variant": label, "steps": s["steps"], "tokens/s": s["tokens_per_s"],
               "ratio": s["tokens_per_s"] / base, "step ms": s["step_ms"],
               "spread": "-" if s["spread"] is None else f"{100 * s['spread']:.1f}%",
               "MFU": s["mfu"] if s["mfu"] is not None else "-", "peak MB": s["peak_mb"],
               "final loss": s["final_loss"], "val loss": "-" if val is None else val,
               "val gap": val_gap(val, base_val)}
        table.add(**row)
        rows.append(row)
    table.print()
    for tag, verdict in repeats.items():
        print(f"{tag}: training losses {verdict} against {tag.split('#')[0].split(' ')[0]}")
    if args.json:
        write_record(args.json, "train_throughput", rows, config=str(config), nproc=nproc, steps=steps,
                     warmup=warmup, smoke=args.smoke, repeats=repeats, rounds=args.rounds)
    return 0


def _show_profile(name: str, path: Path, lines: int = 40) -> None:
    if not path.is_file():
        print(f"train_throughput: {name}: no profile written ({path})", file=sys.stderr)
        return
    head = path.read_text().splitlines()[:lines]
    print(f"--- profile of {name} (first {lines} lines of {path}) ---", *head, sep="\n", file=sys.stderr, flush=True)


def _world(config: Path) -> int:
    from dualflow.launcher.config import load_config
    from dualflow.train.config import TrainConfig

    return load_config(TrainConfig, config).parallel.world


if __name__ == "__main__":
    raise SystemExit(main())
