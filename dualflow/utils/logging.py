"""Rank-aware logging: every line says which rank wrote it; ``rank0`` helpers print once per job."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s [%(rank)s] %(name)s %(levelname)s: %(message)s"


def current_rank() -> int:
    """The global rank: from torch.distributed when initialised, else from the launcher's environment."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:
        pass
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = f"rank {current_rank()}"
        return True


def get_logger(name: str = "dualflow", level: int | str | None = None) -> logging.Logger:
    """A logger whose lines carry the rank. The handler is attached once per logger name.

    The level comes from ``level``, else ``DUALFLOW_LOG_LEVEL``, else INFO.
    """
    logger = logging.getLogger(name)
    if not any(getattr(h, "_dualflow", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        handler._dualflow = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level or os.environ.get("DUALFLOW_LOG_LEVEL", "INFO").upper())
    return logger


def print_rank0(*args, **kwargs) -> None:
    """print() on global rank 0 only."""
    if current_rank() == 0:
        print(*args, **kwargs, flush=True)
