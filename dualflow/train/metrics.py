"""What rank 0 reports: a console line with a progress bar, JSON lines, and the loss curve as a PNG."""

from __future__ import annotations

import json
import math
import resource
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

import torch

from dualflow.utils.files import atomic_write_text

# Dense BF16 tensor-core peaks (FLOP/s) of GPUs whose figure is published; MFU is reported only for these.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}


def peak_flops(device: torch.device, fp8: bool) -> float | None:
    """The device's dense BF16 peak, or None where it is unknown or would be the wrong yardstick (FP8)."""
    if fp8 or device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = min(width, round(width * done / max(total, 1)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a torn last line is dropped with a warning (see MetricsLog)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif i == last:
            warnings.warn(f"{path}: line {i + 1} is cut short (a run killed while writing it?); dropping it: "
                          f"{line[:80]!r}", RuntimeWarning, stacklevel=3)
        else:
            raise ValueError(f"{path}: line {i + 1} is not a JSON object: {line[:80]!r}; repair or delete that "
                             "line (or start over with --fresh)")
    return records


class MetricsLog:
    """Appends one JSON object per record to ``run_dir/metrics.jsonl`` and prints a line per ``log_every``."""

    def __init__(self, run_dir: Path, total_steps: int, log_every: int, enabled: bool,
                 stream: TextIO | None = None) -> None:
        self.enabled, self.total, self.every = enabled, total_steps, log_every
        self.stream = stream or sys.stdout
        self.path = run_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)

    def start(self, step: int) -> None:
        """Begin at ``step``: keep the records of an earlier run up to it (a resume), drop the rest.

        The file is replaced atomically. A last line cut short (a kill during an append) is dropped with a
        warning; an unreadable line anywhere else is an error naming it.
        """
        if not self.enabled:
            return
        old = read_records(self.path) if step and self.path.exists() else []
        self.records = [r for r in old if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def step(self, record: dict[str, Any]) -> None:
        self.write(record)
        step = record["step"]
        if self.enabled and (step % self.every == 0 or step == self.total or "val_loss" in record):
            parts = [f"step {step:>5}/{self.total} {progress_bar(step, self.total)}", f"loss {record['loss']:.4f}"]
            if "val_loss" in record:
                parts.append(f"val {record['val_loss']:.4f}")
            mtp = [v for k, v in record.items() if k.startswith("mtp_loss_")]
            if mtp:  # multi-token prediction: each depth's loss
                parts.append("mtp " + "/".join(f"{v:.4f}" for v in mtp))
            parts += [f"{record['tokens_per_s']:,.0f} tok/s", f"{record['step_time_s'] * 1e3:.0f} ms/step",
                      f"lr {record['lr']:.2e}", f"load max/mean {record['expert_load_max_over_mean']:.2f}",
                      f"mem {record['peak_memory_mb']:.0f} MB"]
            if record.get("mfu") is not None:
                parts.append(f"MFU {100 * record['mfu']:.1f}%")
            print(" | ".join(parts), file=self.stream, flush=True)

    def info(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def plot(self, path: Path) -> Path | None:
        """The training and validation loss curves as a PNG; None (and a note) when matplotlib is missing."""
        if not self.enabled:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.info("loss curve not drawn: matplotlib is not installed (pip install matplotlib)")
            return None
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r and math.isfinite(r["loss"])]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
