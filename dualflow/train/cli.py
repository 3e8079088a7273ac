"""``dualflow train CONFIG.toml [--resume] [--section.key=value ...]``: the training job.

A config file is required (an empty one trains the defaults). One process trains a config whose
``parallel.pp * parallel.dp`` is 1; more processes come from the launcher, which every rank then joins
through ``init_distributed``:

    dualflow launch --nproc-per-node 4 -- -m dualflow train configs/tiny_moe.toml

A worker group restarted by the launcher (``--max-restarts``) resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dualflow.launcher.config import ConfigError, add_config_arguments, config_from_args, log_config
from dualflow.launcher.env import LauncherError, env_int, launched


def example_configs() -> Path | None:
    """The folder of the example configs: shipped in the package, or the checkout's ``configs/``."""
    here = Path(__file__).resolve().parents[1]
    return next((d for d in (here / "configs", here.parent / "configs") if d.is_dir()), None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dualflow.train.config import TrainConfig

    examples = example_configs()
    parser.add_argument("config_file", nargs="?", type=Path, metavar="CONFIG.toml",
                        help="the job's configuration, required (here or as --config); keys it leaves out keep "
                             "their defaults, so an empty file trains the defaults. Examples: "
                             f"{examples or 'configs/'} (tiny_moe.toml is the CPU demo)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in the run directory, if there is one")
    start.add_argument("--fresh", action="store_true",
                       help="start at step 0 even if the run directory holds checkpoints (they are deleted)")
    parser.add_argument("--init-from-hf", type=Path, metavar="DIR",
                        help="start from the weights of a transformers DeepseekV3 checkpoint directory (its widths "
                             "must be the config's; a resumed checkpoint takes precedence)")
    add_config_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    import torch

    from dualflow.train.checkpoint import CheckpointSaveError, UnsafeCheckpointError
    from dualflow.train.config import TrainConfig
    from dualflow.train.trainer import Trainer, TrainingDiverged

    if args.config_file is not None:
        if args.config is not None:
            print("dualflow train: give the config once (positional or --config)", file=sys.stderr)
            return 2
        args.config = args.config_file
    if args.config is None:
        examples = example_configs()
        print("dualflow train: no config given; expected `dualflow train CONFIG.toml` (an empty file trains the "
              f"defaults), e.g. {examples / 'tiny_moe.toml' if examples else 'configs/tiny_moe.toml'}", file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(TrainConfig, args)
        # every variable read below, checked before anything starts
        is_launched = launched(os.environ)
        restarted = (env_int(os.environ, "TORCHELASTIC_RESTART_COUNT") or 0) > 0
    except (ConfigError, LauncherError) as exc:
        print(f"dualflow train: {exc}", file=sys.stderr)
        return 2
    world = cfg.parallel.world
    if world > 1 and not is_launched:
        cmd = f"dualflow launch --nproc-per-node {world} -- -m dualflow train {args.config or ''}".rstrip()
        print(f"dualflow train: this config needs {world} processes (parallel.pp={cfg.parallel.pp} x "
              f"parallel.dp={cfg.parallel.dp}); start it with:\n  {cmd}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if is_launched:
        from dualflow.launcher import init_distributed

        try:
            device = init_distributed().device
        except LauncherError as exc:
            print(f"dualflow train: {exc}", file=sys.stderr)
            return 2
    log_config(cfg, cfg.train.run_dir)
    # A worker group restarted by the launcher continues from its last checkpoint.
    resume = args.resume or restarted
    try:
        if args.init_from_hf is not None:
            from dualflow.train.hf_io import check_widths

            check_widths(args.init_from_hf, cfg.model)  # before any process group work
        trainer = Trainer(cfg, device)
        if args.init_from_hf is not None:
            _init_from_hf(trainer, args.init_from_hf)
        summary = trainer.train(resume=resume, fresh=args.fresh and not resume)
    except (FileExistsError, FileNotFoundError, ValueError, UnsafeCheckpointError, CheckpointSaveError) as exc:
        print(f"dualflow train: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"dualflow train: {exc}", file=sys.stderr)
        return 3
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if summary.val_losses:
        first, last = min(summary.val_losses), max(summary.val_losses)
        from dualflow.utils.logging import print_rank0

        print_rank0(f"done: step {summary.last_step}, validation loss {summary.val_losses[first]:.4f} (step {first}) "
                    f"-> {summary.val_losses[last]:.4f} (step {last}); checkpoint {summary.checkpoint}")
    return 0


def _init_from_hf(trainer, folder: Path) -> None:
    from dualflow.train.hf_io import load_for_training
    from dualflow.utils.logging import print_rank0

    state, notes = load_for_training(folder, trainer.cfg.model)
    trainer.load_model_state(state, str(folder), optional=("mtp.",))
    print_rank0(f"initialised from {folder}" + "".join(f"\n  note: {n}" for n in notes))
