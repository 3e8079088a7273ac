"""Small shared helpers: NVTX ranges, timing and tables for benchmarks, rank-aware logging, atomic files."""

from dualflow.utils import nvtx
from dualflow.utils.files import atomic_write_text, fsync_dir
from dualflow.utils.logging import current_rank, get_logger, print_rank0
from dualflow.utils.timing import Table, Timing, cuda_graphed, time_fn, time_fns, write_record

__all__ = [
    "Table", "Timing", "atomic_write_text", "cuda_graphed", "current_rank", "fsync_dir", "get_logger", "nvtx",
    "print_rank0", "time_fn", "time_fns", "write_record",
]
