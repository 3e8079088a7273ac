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
    # profile_step: profile this step (1-based; 0 = off) into RUN_DIR/profile-rank{R}.txt (train/profile.py)
    profile_step: int = 0
    profile_trace: bool = False
    # cuda_graph: replay the step as a CUDA graph (train/graphs.py): "auto" = where it can run (one GPU, one
    # process), "on" = required (an error where it cannot), "off"
    cuda_graph: str = "auto"

    def __post_init__(self) -> None:
        if self.cuda_graph not in ("auto", "on", "off"):
            raise ValueError(f"train.cuda_graph={self.cuda_graph!r}: expected 'auto', 'on' or 'off'")
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
    enabled: bool = True  # false: no checkpoint at all, not even the final one (benchmarks)

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
        if self.model.n_routed_experts % self.parallel.dp and self.model.n_dense_layers < self.model.n_layers:
            raise ValueError(f"model.n_routed_experts={self.model.n_routed_experts} must be a multiple of the "
                             f"expert-parallel size parallel.dp={self.parallel.dp}")
        if self.train.fp8 and self.model.dim % 128 and self.parallel.dp > 1 and self.train.fp8_dispatch:
            raise ValueError(f"FP8 dispatch needs model.dim a multiple of 128 (got {self.model.dim}); "
                             "set train.fp8_dispatch = false or change the width")
        if self.model.tie_embeddings and self.parallel.pp > 1 and self.parallel.schedule in ("1f1b", "zb1p"):
            raise ValueError("model.tie_embeddings needs the embedding and the head on one rank; with "
                             f"{self.parallel.schedule} they are on the first and last pipeline rank: use "
                             "dualpipev or dualpipe, or untie them")
