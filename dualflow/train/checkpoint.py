"""Sharded checkpoints with ``torch.distributed.checkpoint``: atomic, pruned, and safe to load.

- A checkpoint is a directory ``step-NNNNNNNN`` under the checkpoint root. Every rank writes its shard
  into ``.tmp-step-NNNNNNNN``; after all ranks finished, rank 0 renames it into place (one atomic
  rename), so a crash mid-save leaves only a temporary directory, which is ignored and later removed.
- The newest ``keep`` checkpoints are kept; older ones are deleted after a new one is in place.
- State is a flat ``{key: tensor}`` dict. Keys are global names (a replicated tensor has the same key on
  every rank that holds it and is written once), so a checkpoint does not depend on which rank wrote
  what. Only tensors are accepted: loading reads tensor data with ``weights_only`` and the metadata
  file through an unpickler that admits only the checkpoint metadata classes.
"""

from __future__ import annotations

import io
import pickle
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

_NAME = re.compile(r"^step-(\d{8})$")

# (module, name) pairs the metadata file may reference: dataclasses of DCP's metadata, torch's value
# types and paths. Anything else (a callable, an arbitrary class) is refused before it is constructed.
_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                 "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                 ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
                 *((mod, cls) for mod in ("pathlib", "pathlib._local") for cls in ("PosixPath", "WindowsPath"))}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint metadata references something other than checkpoint metadata."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module in _SAFE_MODULES and not name.startswith("__")) or (module, name) in _SAFE_GLOBALS
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            allowed = True
        if not allowed:
            raise UnsafeCheckpointError(f"checkpoint metadata references {module}.{name}, which is not a "
                                        "checkpoint metadata type; refusing to load it")
        return super().find_class(module, name)


def read_metadata(path: Path):
    """Unpickle ``path/.metadata`` with the restricted unpickler; raise if it references anything else."""
    return _MetadataUnpickler(io.BytesIO((path / ".metadata").read_bytes())).load()


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        read_metadata(Path(self.path))
        return super().read_metadata(*args, **kwargs)


def _barrier(group: dist.ProcessGroup | None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


class CheckpointManager:
    """Saves and restores flat tensor dicts under ``root``; every rank of ``group`` takes part."""

    def __init__(self, root: str | Path, keep: int = 2, group: dist.ProcessGroup | None = None,
                 files: dict[str, str] | None = None) -> None:
        """``files``: text files (name -> content) that rank 0 writes into every checkpoint directory before
        it is published (the model's configuration, which readers of the checkpoint need)."""
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep}: keep at least the latest checkpoint")
        self.root, self.keep, self.group = Path(root), keep, group
        self.files = dict(files or {})
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _NAME.match(p.name) and (p / ".metadata").is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    @staticmethod
    def step_of(path: Path) -> int:
        return int(_NAME.match(path.name).group(1))

    def save(self, step: int, state: dict[str, torch.Tensor]) -> Path:
        """Write ``state`` as checkpoint ``step`` (collective), then prune; returns the final directory."""
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"checkpoint state must hold only tensors; not tensors: {bad[:5]}")
        final, tmp = self.path(step), self.root / f".tmp-step-{step:08d}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier(self.group)
        cpu_state = {k: v.detach().cpu() for k, v in state.items()}
        dcp.save(cpu_state, storage_writer=FileSystemWriter(tmp), process_group=self.group)
        _barrier(self.group)
        if self.rank == 0:
            for name, text in self.files.items():
                (tmp / name).write_text(text)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.list()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in self.root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier(self.group)
        return final

    def load(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        """Fill the tensors of ``state`` in place from checkpoint ``path`` (collective)."""
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata)")
        problems = self._mismatches(path, state)
        if dist.is_initialized():  # every rank stops before the collective load if any rank would fail
            flag = torch.tensor([float(bool(problems))])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            if flag.item() and not problems:
                problems = ["another rank found this checkpoint incompatible (see its error)"]
        if problems:
            raise ValueError(f"cannot restore {path}: " + "; ".join(problems[:8]) + " -- it was written for "
                             "another model or parallel layout; start a fresh run directory or match the config")
        cpu_state = {k: v.detach().cpu().clone() for k, v in state.items()}
        dcp.load(cpu_state, storage_reader=_SafeReader(path), process_group=self.group)
        with torch.no_grad():
            for k, v in state.items():
                v.copy_(cpu_state[k])

    @staticmethod
    def _mismatches(path: Path, state: dict[str, torch.Tensor]) -> list[str]:
        saved = read_metadata(path).state_dict_metadata
        out = []
        for k, v in state.items():
            if k not in saved:
                out.append(f"{k!r} is not in the checkpoint")
            elif tuple(getattr(saved[k], "size", ())) != tuple(v.shape):
                out.append(f"{k!r} has shape {tuple(saved[k].size)} in the checkpoint, {tuple(v.shape)} here")
        return out


def read_model_state(path: str | Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The tensors of checkpoint ``path`` whose keys start with ``prefix`` (prefix removed), whole, in this
    process (no process group): every shard of any pipeline/expert-parallel layout is read and assembled."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata); give a step-NNNNNNNN directory")
    meta = read_metadata(path).state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not state:
        raise ValueError(f"{path} holds no tensor named {prefix}*; is it a checkpoint of the training job?")
    dcp.load(state, storage_reader=_SafeReader(path), no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}
