"""The training job's configuration: one frozen dataclass per TOML section."""

from __future__ import annotations

import dataclasses

from dualflow.launcher.config import ConfigError, OneOf, Range, check_fields
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
    # fp8_backend: the FP8 GEMM backend (Fp8Recipe.backend: "auto", a name or a comma list tried in order,
    # e.g. "cutlass,torch"); "auto" takes what measured fastest for each GEMM
    fp8_backend: str = "auto"
    # fp8_wgrad_backend: the routed experts' weight-gradient kernel (Fp8Recipe.wgrad_backend: "auto",
    # "cutlass", "triton")
    fp8_wgrad_backend: str = "auto"
    # fp8_quant_backend: the quantizers (Fp8Recipe.quant_backend: "auto" = "cuda" where the CUDA library is
    # built, else "triton"; "cuda" = the CUDA library's activation quantizer with Triton for the rest;
    # "triton"; "reference")
    fp8_quant_backend: str = "auto"
    # fp8_weight_snapshots: compiled FP8 layers read their weights' FP8 copies from snapshots rewritten
    # once per optimizer step (dualflow.fp8.enable_fp8_snapshots) instead of quantizing them for every
    # micro-batch. Off by default: on V2-Lite (one H200) they saved 3.5 ms of a 373 ms step and held 4 GB
    # more at the peak, above BF16's (benchmarks/NOTES_gpu.md row 17)
    fp8_weight_snapshots: bool = False
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
    # compile: torch.compile each compute phase (train/compile.py): "auto" = on CUDA GPUs, "on" = also on the
    # CPU (an error where it cannot run), "off"
    compile: str = "auto"

    def __post_init__(self) -> None:
        check_fields(self, "train", steps=Range(ge=1), global_batch=Range(ge=1), seed=Range(ge=0, lt=2**63),
                     dtype=OneOf(*DTYPES), log_every=Range(ge=1), val_every=Range(ge=1), val_batches=Range(ge=1),
                     profile_step=Range(ge=0), cuda_graph=OneOf("auto", "on", "off"),
                     compile=OneOf("auto", "on", "off"), fp8_wgrad_backend=OneOf("auto", "cutlass", "triton"),
                     fp8_quant_backend=OneOf("auto", "triton", "cuda", "reference"))
        if self.fp8_backend != "auto":
            from dualflow.fp8 import Fp8Recipe

            try:
                Fp8Recipe(backend=self.fp8_backend)
            except ValueError as exc:
                raise ConfigError([f"train.fp8_backend: {exc}"], "invalid train config") from None
        if not self.run_dir.strip():
            raise ConfigError(["train.run_dir: expected a folder for the run's files, got ''"], "invalid train config")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """``[checkpoint]``: every ``every`` steps and at the end into ``dir`` (default: RUN_DIR/checkpoints)."""

    every: int = 100
    keep: int = 2
    dir: str = ""
    enabled: bool = True  # false: no checkpoint at all, not even the final one (benchmarks)

    def __post_init__(self) -> None:
        check_fields(self, "checkpoint", every=Range(ge=0, note="0: only at the end"), keep=Range(ge=1))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: RunConfig = dataclasses.field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        m, par, run, problems = self.model, self.parallel, self.train, []
        local, chunks = run.global_batch / par.dp, par.microbatches
        if local != int(local) or int(local) % chunks:
            problems.append(f"train.global_batch={run.global_batch} must split into parallel.dp={par.dp} ranks x "
                            f"parallel.microbatches={chunks} equal micro-batches")
        if m.n_routed_experts % par.dp and m.has_moe:
            problems.append(f"model.n_routed_experts={m.n_routed_experts} must be a multiple of the expert-parallel "
                            f"size parallel.dp={par.dp}")
        if run.fp8 and m.dim % 128 and par.dp > 1 and run.fp8_dispatch:
            problems.append(f"FP8 dispatch needs model.dim a multiple of 128 (got {m.dim}); set "
                            "train.fp8_dispatch = false or change the width")
        # what uses the embedding on the head's rank, and the setting that turns it off
        shares = {"tie_embeddings": "false", "mtp_depth": "0"}
        used = [n for n in shares if getattr(m, n)]
        if used and par.pp > 1 and par.schedule in ("1f1b", "zb1p"):
            problems.append(f"model.{used[0]} needs the embedding and the head on one rank; with {par.schedule} "
                            f"they are on the first and last pipeline rank: use dualpipev or dualpipe, or set "
                            f"model.{used[0]} = {shares[used[0]]}")
        if self.data.seq_len > m.max_seq_len:
            problems.append(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}, the "
                            "positions whose rotary tables the model precomputes: raise model.max_seq_len")
        if self.data.seq_len <= m.mtp_depth:
            problems.append(f"data.seq_len={self.data.seq_len} leaves nothing to predict for model.mtp_depth="
                            f"{m.mtp_depth}: lengthen the sequences or lower the depth")
        if problems:
            raise ConfigError(problems, "invalid training config")
