"""The end-to-end job: a small DeepSeek-V3-style MoE model trained with DualPipe, expert parallelism and FP8.

See docs/train.md. The model and its pieces work alone (``Stage``, ``LocalExchange``); the modules that
bring in the other subpackages load them when used: ``dualflow.train.ep`` (``dualflow.comm``),
``dualflow.train.pipeline`` (``dualflow.dualpipe``), FP8 conversion (``dualflow.fp8``).
"""

from dualflow.train.checkpoint import CheckpointManager, CheckpointSaveError, UnsafeCheckpointError
from dualflow.train.config import CheckpointConfig, RunConfig, TrainConfig
from dualflow.train.data import BatchLoader, DataConfig, load_streams, validation_batches
from dualflow.train.exchange import Exchange, LocalExchange, Received
from dualflow.train.model import ModelConfig, Stage, cross_entropy
from dualflow.train.optim import AdamW, OptimConfig, learning_rate
from dualflow.train.parallel import ParallelConfig, ParallelLayout
from dualflow.train.partition import balanced_partition, rank_stages, stage_costs
from dualflow.train.stage import OverlappedStage, PipelineStage
from dualflow.train.trainer import Summary, Trainer, TrainingDiverged

__all__ = [
    "AdamW",
    "BatchLoader",
    "CheckpointConfig",
    "CheckpointManager",
    "CheckpointSaveError",
    "DataConfig",
    "Exchange",
    "LocalExchange",
    "ModelConfig",
    "OptimConfig",
    "OverlappedStage",
    "ParallelConfig",
    "ParallelLayout",
    "PipelineStage",
    "Received",
    "RunConfig",
    "Stage",
    "Summary",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "UnsafeCheckpointError",
    "balanced_partition",
    "cross_entropy",
    "learning_rate",
    "load_streams",
    "rank_stages",
    "stage_costs",
    "validation_batches",
]
