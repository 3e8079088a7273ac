"""Where each worker's output goes: ``LOG_DIR/rank-N.log`` for every rank, the console for rank 0 only.

A torchrun ``LogsSpecs``: the elastic agent asks it, at every (re)start of the workers, for each local
rank's files. torchrun's own bookkeeping (error files, per-attempt folders) stays in
``LOG_DIR/.torchelastic``; a restart keeps the previous attempt's log as ``rank-N.attempt-K.log``.
Workers run through :mod:`dualflow.launcher.worker`, which sends stderr to the same file as stdout.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, LogsDest, Std

from dualflow.launcher.env import env_int


class RankLogsSpecs(DefaultLogsSpecs):
    """Every rank to ``log_dir/rank-N.log``; global rank 0 also to the console (torchrun's tee)."""

    def __init__(self, log_dir: str | None = None, redirects: Std | dict[int, Std] = Std.NONE,
                 tee: Std | dict[int, Std] = Std.NONE, local_ranks_filter: set[int] | None = None) -> None:
        if not log_dir:
            raise ValueError("RankLogsSpecs needs a log directory (torchrun --log-dir DIR)")
        self._rank_dir = Path(log_dir).resolve()
        # The policy is fixed: redirects/tee/filters given on torchrun's command line do not apply.
        super().__init__(log_dir=str(self._rank_dir / ".torchelastic"), redirects=Std.OUT)

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        dest = super().reify(envs)  # error files, and TORCHELASTIC_ERROR_FILE in each worker's env
        self._rank_dir.mkdir(parents=True, exist_ok=True)
        dest.tee_stdouts.clear()
        dest.tee_stderrs.clear()
        for local_rank, env in envs.items():
            rank = env["RANK"]
            path = self._rank_dir / f"rank-{rank}.log"
            attempt = env_int(env, "TORCHELASTIC_RESTART_COUNT") or 0
            if attempt > 0:
                # On a shared file system another node may have moved it first (ranks can change hosts).
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, self._rank_dir / f"rank-{rank}.attempt-{attempt - 1}.log")
            dest.stdouts[local_rank] = str(path)
            if rank == "0":
                dest.tee_stdouts[local_rank] = str(path)
        return dest

    def __repr__(self) -> str:
        return f"RankLogsSpecs(log_dir={self._rank_dir})"
