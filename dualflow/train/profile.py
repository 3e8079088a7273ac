"""Where a training step's time goes: one step under ``torch.profiler``, summarised as text.

``train.profile_step = N`` profiles step N (1-based; 0 = off) on every rank and writes
``RUN_DIR/profile-rank{R}.txt``: the step's wall time, the time the GPU was busy (the union of its
kernels' intervals) and the host time spent issuing work, then the top operators by device time and by
host time. ``train.profile_trace = true`` also writes the Chrome trace next to it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


def _busy_us(events: list[Any]) -> float:
    """Total length of the union of the device kernels' [start, end) intervals (overlaps counted once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    busy, end = 0.0, float("-inf")
    for lo, hi in spans:
        if hi <= end:
            continue
        busy += hi - max(lo, end)
        end = hi
    return busy


def _device_kernels(prof: torch.profiler.profile) -> list[Any]:
    device = torch.autograd.DeviceType.CUDA
    return [e for e in prof.events() if e.device_type == device and e.time_range.end > e.time_range.start]


def summarize(prof: torch.profiler.profile, wall_s: float, rows: int = 40) -> str:
    """The text of profile-rank*.txt for a profiled step that took ``wall_s`` seconds."""
    kernels = _device_kernels(prof)
    busy_ms = _busy_us(kernels) / 1e3
    wall_ms = wall_s * 1e3
    lines = [f"step wall time {wall_ms:.2f} ms; device busy {busy_ms:.2f} ms "
             f"({100 * busy_ms / wall_ms if wall_ms else 0:.1f}% of the step), {len(kernels)} kernels"]
    averages = prof.key_averages()
    if kernels:
        lines += ["", "top operators by device time:",
                  averages.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70)]
    lines += ["", "top operators by host time:",
              averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70)]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def profiled(enabled: bool, out: Path, trace: bool = False,
             sync: Callable[[], None] | None = None) -> Iterator[None]:
    """Profile the body when ``enabled`` and write the summary to ``out`` (and ``out``.json with ``trace``)."""
    if not enabled:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        yield
        if sync is not None:
            sync()
        wall = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(summarize(prof, wall))
    if trace:
        prof.export_chrome_trace(str(out.with_suffix(".json")))
