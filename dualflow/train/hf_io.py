"""transformers-format directories (config.json, safetensors shards, an index) and ``dualflow export-hf``.

    dualflow export-hf runs/tiny_mla/checkpoints OUT_DIR [--dtype bfloat16] [--max-shard-size 5GB]

reads a sharded training checkpoint of any pipeline/expert-parallel layout (the latest one under a
checkpoint root, or one ``step-NNNNNNNN`` directory), takes the model's shape from the ``model.toml`` the
trainer writes beside the weights (or ``--config``, a training TOML), and writes what
``DeepseekV3ForCausalLM.from_pretrained(OUT_DIR)`` loads. ``load_hf`` reads such a directory back (also
one written by transformers or DeepSeek), which ``dualflow train CONFIG --init-from-hf DIR`` starts from.
Needs ``safetensors`` (``pip install 'dualflow[hf]'``), not transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from dualflow.train.hf import from_hf, hf_model_config, to_hf, width_mismatches
from dualflow.train.model import ModelConfig

INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# kept in FP32 whatever the export dtype (DeepSeek-V3 keeps gating in high precision, transformers too)
_FP32_SUFFIXES = (".mlp.gate.weight", ".e_score_correction_bias")


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as exc:
        raise ImportError("reading and writing transformers checkpoints needs safetensors: "
                          "pip install 'dualflow[hf]' (or pip install safetensors)") from exc
    return safetensors.torch


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"1e9"`` -> bytes (GB = 1e9 bytes)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise ValueError(f"size {text!r}: expected a number of bytes with an optional KB/MB/GB suffix")
    return int(float(m.group(1)) * {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "K": 1e3, "M": 1e6,
                                     "G": 1e9}[m.group(2)])


def save_hf(out_dir: str | Path, config: dict[str, Any], weights: dict[str, torch.Tensor], *,
            dtype: torch.dtype = torch.float32, max_shard_bytes: int = 5 * 10**9) -> list[Path]:
    """Write config.json, ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` (a
    larger tensor gets a shard of its own) and the index; returns the shard paths."""
    st = _safetensors()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    cast = {k: v.to(torch.float32 if k.endswith(_FP32_SUFFIXES) else dtype) for k, v in weights.items()}
    for name in sorted(cast):
        n = cast[name].numel() * cast[name].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    paths, weight_map = [], {}
    for i, names in enumerate(shards):
        path = out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # one owner per tensor: the fused-weight halves and tied copies share storage otherwise
        st.save_file({k: cast[k].detach().contiguous().clone() for k in names}, str(path), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, path.name))
        paths.append(path)
    total = sum(t.numel() * t.element_size() for t in cast.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    full = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "torch_dtype": str(dtype).removeprefix("torch."), **config}
    (out / "config.json").write_text(json.dumps(full, indent=2) + "\n")
    return paths


def _files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no {INDEX} and no *.safetensors file; is it a transformers checkpoint?")
    return files


def load_hf(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json's content, every weight) of a transformers checkpoint directory."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}/config.json not found: give a transformers checkpoint directory")
    st = _safetensors()
    weights: dict[str, torch.Tensor] = {}
    for path in _files(folder):
        weights.update(st.load_file(str(path)))
    return json.loads((folder / "config.json").read_text()), weights


def weight_names(folder: str | Path) -> list[str]:
    """The weights' names of a checkpoint directory, from its index or the shards' headers (no data read)."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    _safetensors()  # a clear error where it is missing
    from safetensors import safe_open

    names: list[str] = []
    for path in _files(folder):
        with safe_open(str(path), "pt") as fh:
            names += list(fh.keys())
    return names


def hf_config_of(folder: str | Path) -> ModelConfig:
    """The ModelConfig of a transformers checkpoint directory (config.json and the weights' names only)."""
    folder = Path(folder)
    return hf_model_config(json.loads((folder / "config.json").read_text()), weight_names(folder))


def check_widths(folder: str | Path, cfg: ModelConfig) -> None:
    """Raise, naming each one, if the checkpoint's widths differ from ``cfg``'s."""
    bad = width_mismatches(hf_config_of(folder), cfg)
    if bad:
        raise ValueError(f"{folder} has another shape than the training config: " + "; ".join(bad)
                         + " -- set these in the config (or pick a checkpoint of this shape)")


def checkpoint_step_dir(path: str | Path) -> Path:
    """``path`` if it is one checkpoint, else the latest ``step-*`` checkpoint under it."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    steps = sorted(p for p in path.glob("step-*") if (p / ".metadata").is_file())
    if not steps:
        raise FileNotFoundError(f"{path} is neither a checkpoint (no .metadata) nor a directory of step-* checkpoints")
    return steps[-1]


def checkpoint_model_config(step_dir: Path, config_file: Path | None = None) -> ModelConfig:
    """The model shape of a checkpoint: ``--config`` (a training TOML) if given, else its ``model.toml``."""
    from dualflow.launcher.config import load_config

    if config_file is not None:
        from dualflow.train.config import TrainConfig

        return load_config(TrainConfig, config_file).model
    path = step_dir / "model.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (checkpoints written before it existed): pass the run's "
                                "training config with --config CONFIG.toml")
    return load_config(ModelConfig, path)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                      max_shard_bytes: int = 5 * 10**9, config_file: Path | None = None) -> list[Path]:
    """A training checkpoint as a transformers directory (see the module docstring); returns the shards."""
    from dualflow.train.checkpoint import read_model_state

    step = checkpoint_step_dir(checkpoint)
    cfg = checkpoint_model_config(step, config_file)
    config, weights = to_hf(cfg, read_model_state(step))
    return save_hf(out_dir, config, weights, dtype=dtype, max_shard_bytes=max_shard_bytes)


def load_for_training(folder: str | Path, cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weights of a transformers checkpoint by our global names, for a model of ``cfg``'s widths.

    Returns ``(state, notes)``: the notes name the settings that differ without changing shapes (the
    training config's apply) and missing multi-token prediction modules (they keep their initialisation).
    """
    check_widths(folder, cfg)
    theirs, state = from_hf(*load_hf(folder))
    notes = [f"model.{f.name}: {getattr(theirs, f.name)} in the checkpoint, {getattr(cfg, f.name)} used"
             for f in dataclasses.fields(theirs)
             if f.name != "mtp_depth" and getattr(theirs, f.name) != getattr(cfg, f.name)]
    if theirs.mtp_depth < cfg.mtp_depth:
        notes.append(f"the checkpoint has {theirs.mtp_depth} multi-token prediction module(s), the config "
                     f"{cfg.mtp_depth}: the others start from their initialisation")
    elif theirs.mtp_depth > cfg.mtp_depth:
        notes.append(f"the checkpoint has {theirs.mtp_depth} multi-token prediction module(s), the config "
                     f"{cfg.mtp_depth}: the deeper ones are not used")
    state = {k: v for k, v in state.items() if not k.startswith("mtp.") or int(k.split(".")[1]) <= cfg.mtp_depth}
    return state, notes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_DIR",
                        help="a step-NNNNNNNN checkpoint, or a checkpoint root (its latest checkpoint is used)")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="where config.json and the shards go")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                        help="weights' dtype (default float32, the training master weights; the router stays FP32)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB (default 5GB)")
    parser.add_argument("--config", type=Path, metavar="CONFIG.toml",
                        help="the run's training config, for checkpoints without model.toml")


def run(args: argparse.Namespace) -> int:
    try:
        paths = export_checkpoint(args.checkpoint, args.out_dir, dtype=_DTYPES[args.dtype],
                                  max_shard_bytes=parse_size(args.max_shard_size), config_file=args.config)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"dualflow export-hf: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}/config.json, {len(paths)} shard(s) and {INDEX}; load it with "
          f"transformers.DeepseekV3ForCausalLM.from_pretrained({str(args.out_dir)!r})")
    return 0
