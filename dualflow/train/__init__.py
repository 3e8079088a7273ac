"""The end-to-end job: a small DeepSeek-V3-style MoE model trained with DualPipe, expert parallelism and FP8.

See docs/train.md. The model and its pieces work alone (``Stage``, ``LocalExchange``); the modules that
bring in the other subpackages load them when used: ``dualflow.train.ep`` (``dualflow.comm``),
``dualflow.train.pipeline`` (``dualflow.dualpipe``), FP8 conversion (``dualflow.fp8``). The optional
``hf`` extra (safetensors, tokenizers, transformers) is imported only by the functions that need it.
"""

from dualflow.train.checkpoint import CheckpointManager, CheckpointSaveError, UnsafeCheckpointError, read_model_state
from dualflow.train.compile import PhaseCompiler
from dualflow.train.config import CheckpointConfig, RunConfig, TrainConfig
from dualflow.train.data import BatchLoader, DataConfig, load_streams, validation_batches
from dualflow.train.exchange import Exchange, LocalExchange, Received
from dualflow.train.hf import from_hf, to_hf
from dualflow.train.hf_io import export_checkpoint, load_hf, save_hf
from dualflow.train.model import ModelConfig, Stage, cross_entropy, select_experts
from dualflow.train.mtp import Objective, drop_mtp, split_logits
from dualflow.train.optim import AdamW, OptimConfig, learning_rate
from dualflow.train.parallel import ParallelConfig, ParallelLayout
from dualflow.train.partition import balanced_partition, rank_stages, stage_costs
from dualflow.train.stage import OverlappedStage, PipelineStage
from dualflow.train.token_files import TokenStream, load_tokenizer, read_tokens, write_shard
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
    "Objective",
    "OptimConfig",
    "OverlappedStage",
    "ParallelConfig",
    "ParallelLayout",
    "PhaseCompiler",
    "PipelineStage",
    "Received",
    "RunConfig",
    "Stage",
    "Summary",
    "TokenStream",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "UnsafeCheckpointError",
    "balanced_partition",
    "cross_entropy",
    "drop_mtp",
    "export_checkpoint",
    "from_hf",
    "learning_rate",
    "load_hf",
    "load_streams",
    "load_tokenizer",
    "rank_stages",
    "read_model_state",
    "read_tokens",
    "save_hf",
    "select_experts",
    "split_logits",
    "stage_costs",
    "to_hf",
    "validation_batches",
    "write_shard",
]
