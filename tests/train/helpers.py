"""A tiny training config for the tests, and a worker that trains it on every rank."""

from __future__ import annotations

import dataclasses

from dualflow.train.config import CheckpointConfig, RunConfig, TrainConfig
from dualflow.train.data import DataConfig
from dualflow.train.model import ModelConfig
from dualflow.train.optim import OptimConfig
from dualflow.train.parallel import ParallelConfig

MODEL = ModelConfig(dim=32, n_layers=4, n_dense_layers=1, n_heads=4, dense_hidden=64, expert_hidden=32,
                    n_routed_experts=4, top_k=2, bias_update_speed=0.01)


def tiny(run_dir, *, model=None, parallel=None, data=None, optim=None, train=None, checkpoint=None) -> TrainConfig:
    """The test config with sections replaced field by field (``train=dict(steps=3)``)."""
    base = TrainConfig(
        model=MODEL,
        parallel=ParallelConfig(pp=1, dp=1, microbatches=4),
        data=DataConfig(seq_len=16, max_bytes=200_000),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=RunConfig(steps=4, global_batch=8, log_every=1, val_every=2, val_batches=1, run_dir=str(run_dir)),
        checkpoint=CheckpointConfig(every=0, keep=2),
    )
    parts = {}
    for name, change in (("model", model), ("parallel", parallel), ("data", data), ("optim", optim),
                         ("train", train), ("checkpoint", checkpoint)):
        if change:
            parts[name] = dataclasses.replace(getattr(base, name), **change)
    return dataclasses.replace(base, **parts)


def train_worker(rank, world, cfg, resume=False):
    """Train ``cfg`` on this rank; return the summary's per-step losses and validation losses."""
    from dualflow.train.trainer import Trainer

    summary = Trainer(cfg).train(resume=resume)
    return summary.losses, summary.val_losses


def train_worker_params(rank, world, cfg):
    """Like :func:`train_worker`, plus this rank's final parameters and balancing biases."""
    from dualflow.train.trainer import Trainer

    trainer = Trainer(cfg)
    summary = trainer.train()
    state = {k: v.clone() for s in trainer.stages for k, v in s.state_dict().items()}
    return summary.losses, state


def train_worker_overlap_counts(rank, world, cfg):
    """Like :func:`train_worker`, plus how many F&B pairs ran phase by phase / fell back, on this rank."""
    from dualflow.train.trainer import Trainer

    trainer = Trainer(cfg)
    summary = trainer.train()
    modules = trainer.engine.modules
    return summary.losses, sum(m.interleaved for m in modules), sum(m.fallbacks for m in modules)


def train_worker_comm_checks(rank, world, cfg):
    """Like :func:`train_worker`, plus the ``checks`` of the expert exchange's buffer on this rank."""
    from dualflow.train.trainer import Trainer

    trainer = Trainer(cfg)
    summary = trainer.train()
    checks = {layer.exchange.buffer.checks for s in trainer.stages for layer in s.layers.values()
              if getattr(layer, "exchange", None) is not None}
    return summary.losses, sorted(checks)
