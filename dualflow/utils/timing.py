"""Timing and reporting shared by every benchmark.

- :func:`cuda_graphed`: a callable replaying ``fn`` from a CUDA graph (short kernels without launch gaps).
- :func:`time_fn`: warm-up, then the median of many runs; CUDA events on a GPU (with an L2 flush before
  each run unless asked not to), ``time.perf_counter`` on the CPU. :func:`time_fns`: the same for
  several implementations at once, their runs interleaved.
- :class:`Table`: a fixed-width table printed on rank 0 only.
- :func:`write_record`: one JSON record per run (rows plus the environment they were measured in).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dualflow.utils.logging import current_rank


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call over ``len(samples)`` timed runs."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how much to trust a difference between two medians."""
        s = sorted(self.samples)
        lo, hi = s[round(0.1 * (len(s) - 1))], s[round(0.9 * (len(s) - 1))]
        return (hi - lo) / self.median if self.median > 0 else 0.0


class _L2Flusher:
    """Writes a buffer larger than the L2 cache so that each timed run starts cold."""

    def __init__(self, device: torch.device) -> None:
        props = torch.cuda.get_device_properties(device)
        size = max(2 * int(getattr(props, "L2_cache_size", 64 << 20)), 64 << 20)
        self.buf = torch.empty(size, dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def cuda_graphed(fn: Callable[[], Any], device: torch.device | str) -> tuple[Callable[[], Any], str]:
    """``fn`` as replays of a CUDA graph, which removes launch gaps from the timing of short kernels.

    ``fn`` runs once on a side stream first (lazy initialisation must not be captured). Off the GPU, or
    when capture fails (host synchronisation inside ``fn``), ``fn`` itself comes back. The second value
    names the mode used: ``"graph"``, ``"eager"`` or ``"eager (capture failed)"``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return fn, "eager"
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return fn, "eager (capture failed)"
    return graph.replay, "graph"


def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeat: int = 20,
    device: torch.device | str | None = None,
    flush_l2: bool = True,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeat`` timed ones.

    ``device`` selects the clock: a CUDA device uses events on its current stream (``setup`` and the L2
    flush run before each start event, outside the timed region); anything else uses perf_counter.
    """
    return time_fns({"fn": fn}, warmup=warmup, repeat=repeat, device=device, flush_l2=flush_l2, setup=setup)["fn"]


def time_fns(
    fns: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    repeat: int = 20,
    device: torch.device | str | None = None,
    flush_l2: bool = True,
    setup: Callable[[], Any] | None = None,
) -> dict[str, Timing]:
    """Time several implementations of one thing against each other, interleaved: run ``i`` of every
    function follows run ``i`` of the one before (round-robin), so that a drift of the clocks during the
    measurement (a GPU settling from boost to its sustained clocks under load) reaches all of them alike
    instead of whichever happened to be timed last. Otherwise as :func:`time_fn`.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    for _ in range(warmup):
        for fn in fns.values():
            if setup:
                setup()
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    if dev.type == "cuda":
        flusher = _L2Flusher(dev) if flush_l2 else None
        torch.cuda.synchronize(dev)
        events = {name: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                         for _ in range(repeat)] for name in fns}
        for i in range(repeat):
            for name, fn in fns.items():
                if setup:
                    setup()
                if flusher:
                    flusher()
                start, end = events[name][i]
                start.record()
                fn()
                end.record()
        torch.cuda.synchronize(dev)
        for name in fns:
            samples[name] = [s.elapsed_time(e) / 1e3 for s, e in events[name]]
    else:
        for _ in range(repeat):
            for name, fn in fns.items():
                if setup:
                    setup()
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: Timing(tuple(v)) for name, v in samples.items()}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or math.isnan(value) or math.isinf(value):
            return f"{value:g}"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


class Table:
    """Rows of named columns rendered as fixed-width text, printed by rank 0 only."""

    def __init__(self, columns: Sequence[str], title: str = "") -> None:
        self.columns = list(columns)
        self.title = title
        self.rows: list[dict[str, Any]] = []

    def add(self, **values: Any) -> None:
        unknown = set(values) - set(self.columns)
        if unknown:
            raise KeyError(f"unknown columns {sorted(unknown)}; the table has {self.columns}")
        self.rows.append(values)

    def render(self) -> str:
        cells = [[_fmt(r.get(c, "")) for c in self.columns] for r in self.rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.columns)]
        line = "  ".join(c.rjust(w) for c, w in zip(self.columns, widths))
        out = [self.title] if self.title else []
        out += [line, "-" * len(line)]
        out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(out)

    def print(self) -> None:
        if current_rank() == 0:
            print(self.render(), flush=True)


def environment() -> dict[str, Any]:
    """Where a measurement was taken: host, versions, device."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["num_devices"] = torch.cuda.device_count()
    else:
        env["device"] = f"cpu ({os.cpu_count()} cores)"
    return env


def write_record(path: str | os.PathLike, name: str, rows: Sequence[dict[str, Any]], **meta: Any) -> Path:
    """Append one JSON line ``{"benchmark", "environment", "meta", "rows"}`` to ``path`` (rank 0 only)."""
    path = Path(path)
    if current_rank() != 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "environment": environment(), "meta": meta, "rows": list(rows)}
    with path.open("a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
    return path
