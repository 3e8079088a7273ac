"""The training job's configuration: one frozen dataclass per TOML section."""

from __future__ import annotations

import dataclasses

from dualflow.train.data import DataConfig
from dualflow.train.model import ModelConfig
from dualflow.train.optim import OptimConfig
from dualflow.train.parallel import ParallelConfig

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """``[train]``: length, batch, precision, logging and where the run's files go."""

    steps: int = 300
    global_batch: int = 16
    seed: int = 0
    dtype: str = "float32"
    fp8: bool = False
    fp8_dispatch: bool = True
    log_every: int = 10
    val_every: int = 50
    val_batches: int = 4
    run_dir: str = "runs/default"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"train.dtype={self.dtype!r}: expected one of {DTYPES} (FP8 is train.fp8 = true)")
        for name in ("steps", "global_batch", "log_every", "val_every", "val_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """``[checkpoint]``: every ``every`` steps and at the end into ``dir`` (default: RUN_DIR/checkpoints)."""

    every: int = 100
    keep: int = 2
    dir: str = ""

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise ValueError(f"checkpoint.every={self.every} must be >= 0 (0 = only at the end) and "
                             f"checkpoint.keep={self.keep} >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: RunConfig = dataclasses.field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        local, chunks = self.train.global_batch / self.parallel.dp, self.parallel.microbatches
        if local != int(local) or int(local) % chunks:
            raise ValueError(f"train.global_batch={self.train.global_batch} must split into parallel.dp="
                             f"{self.parallel.dp} ranks x parallel.microbatches={chunks} equal micro-batches")
        if self.model.n_routed_experts % self.parallel.dp and self.model.has_moe:
            raise ValueError(f"model.n_routed_experts={self.model.n_routed_experts} must be a multiple of the "
                             f"expert-parallel size parallel.dp={self.parallel.dp}")
        if self.train.fp8 and self.model.dim % 128 and self.parallel.dp > 1 and self.train.fp8_dispatch:
            raise ValueError(f"FP8 dispatch needs model.dim a multiple of 128 (got {self.model.dim}); "
                             "set train.fp8_dispatch = false or change the width")
        # what uses the embedding on the head's rank, and the setting that turns it off
        shares = {"tie_embeddings": "false", "mtp_depth": "0"}
        used = [n for n in shares if getattr(self.model, n)]
        if used and self.parallel.pp > 1 and self.parallel.schedule in ("1f1b", "zb1p"):
            raise ValueError(f"model.{used[0]} needs the embedding and the head on one rank; with "
                             f"{self.parallel.schedule} they are on the first and last pipeline rank: use "
                             f"dualpipev or dualpipe, or set model.{used[0]} = {shares[used[0]]}")
        if self.data.seq_len <= self.model.mtp_depth:
            raise ValueError(f"data.seq_len={self.data.seq_len} leaves nothing to predict for model.mtp_depth="
                             f"{self.model.mtp_depth}: lengthen the sequences or lower the depth")
