"""Sharded checkpoints with ``torch.distributed.checkpoint``: atomic, pruned, space-checked, safe to load.

Under the checkpoint root (every rank writes its shard; rank 0 alone renames and deletes):

- ``step-NNNNNNNN``: a complete checkpoint; DCP writes its ``.metadata`` last, after every rank's data.
- ``.tmp-step-NNNNNNNN``: a save in progress. A crash leaves it; it is never taken for a checkpoint and
  the next save removes it.
- ``.old-step-NNNNNNNN``: a checkpoint of the same step being replaced. A new checkpoint goes in by
  (1) renaming the existing one aside, (2) renaming the new one in, (3) deleting the aside one, so that
  after a crash between any two of these the step still has a complete checkpoint: the aside one
  counts for its step while no ``step-NNNNNNNN`` is there, and the next save puts it back or removes it.
- ``.del-*``: being deleted. A checkpoint is renamed out of the listing before its files go, so a
  deletion cut short never leaves a half-deleted checkpoint that looks complete.

Before anything is written the ranks agree, over tensors: every rank checks its state (tensors of a
storable dtype only) and reports its keys' sizes and the free space it sees; the checkpoint's size
(replicated keys counted once, plus a margin) must fit the smallest. On any failure every rank raises,
the earlier checkpoints stay as they were and the partial directory is removed.

State is a flat ``{key: tensor}`` dict. Keys are global names (a replicated tensor has the same key on
every rank that holds it and is written once), so a checkpoint does not depend on which rank wrote
what. Loading reads tensor data with ``weights_only`` and the metadata through
:mod:`dualflow.train.checkpoint_metadata`, which admits only the checkpoint metadata classes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from dualflow.train.checkpoint_metadata import DTYPES, MetadataReader, UnsafeCheckpointError, read_metadata
from dualflow.utils.files import fsync_dir
from dualflow.utils.logging import get_logger

__all__ = ["FREE_BYTES_ENV", "CheckpointManager", "CheckpointSaveError", "UnsafeCheckpointError", "read_metadata",
           "read_model_state"]

_STEP = re.compile(r"^(\.old-)?step-(\d{8})$")
_log = get_logger("dualflow.train")

# The most a checkpoint may use on its filesystem, in bytes, when the filesystem's free space is not the
# limit (a quota, which statvfs does not see); the smaller of the two counts.
FREE_BYTES_ENV = "DUALFLOW_CHECKPOINT_FREE_BYTES"
# Margins over the tensors' bytes (measured with torch 2.13: ~1.6 KB of torch.save records per tensor and
# ~2 bytes of .metadata per character of its key; the rest is one partly filled filesystem block per file).
_RANK_MARGIN = 1 << 20
_TENSOR_MARGIN = 4096
_KEY_MARGIN = 4


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (no space, or a write failed); the earlier ones are intact."""


def _group_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where the group's collectives run: CUDA for NCCL groups, else the CPU."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _key_id(key: str) -> int:
    """A 64-bit id of a key, equal on every rank: replicated keys are recognised without sending names."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


def _disk_free(path: Path) -> int:
    """Bytes free to this process on the filesystem of ``path`` (or its nearest existing parent); -1 unknown."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return -1
    return -1


def _free_limit(value: int | None) -> int | None:
    if value is None:
        text = os.environ.get(FREE_BYTES_ENV, "").strip()
        if not text:
            return None
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{FREE_BYTES_ENV}={text!r}: expected a whole number of bytes (e.g. 500000000000 for "
                             f"500 GB); unset it to use the filesystem's free space") from None
    if value < 0:
        raise ValueError(f"checkpoint free-space limit {value}: expected bytes >= 0 (from free_bytes or "
                         f"{FREE_BYTES_ENV})")
    return value


def _state_problem(state: dict[str, torch.Tensor]) -> TypeError | None:
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        return TypeError(f"checkpoint state must hold only tensors, under str keys; not so for: {bad[:5]}")
    odd = [f"{k} ({v.dtype})" for k, v in state.items() if str(v.dtype).removeprefix("torch.") not in DTYPES]
    if odd:
        return TypeError(f"checkpoint state holds tensors of dtypes a checkpoint does not store: {odd[:5]}; "
                         f"convert them to one of {', '.join(DTYPES)}")
    return None


def _describe_failure(exc: BaseException) -> tuple[int | None, str]:
    """The first OS error number in a failed DCP save (its ranks' exceptions), and a summary of them."""
    if isinstance(exc, OSError):
        return exc.errno, f"{type(exc).__name__}: {exc}"
    failures = getattr(exc, "failures", None) or {}
    code, parts = None, []
    for rank, failure in sorted(failures.items()):
        err = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(err, OSError) and code is None:
            code = err.errno
        parts.append(f"rank {rank}: {type(err).__name__}: {err}")
    return code, "; ".join(parts[:4]) or str(exc)


class CheckpointManager:
    """Saves and restores flat tensor dicts under ``root``; every rank of ``group`` takes part.

    ``free_bytes`` caps the space a save may use (default: ``$DUALFLOW_CHECKPOINT_FREE_BYTES``, else no
    cap beyond the filesystem's free space). ``files``: text files (name -> content) that rank 0 writes into
    every checkpoint directory before it is published (the model's configuration, which readers of the
    checkpoint need).
    """

    def __init__(self, root: str | Path, keep: int = 2, group: dist.ProcessGroup | None = None,
                 free_bytes: int | None = None, files: dict[str, str] | None = None) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep}: keep at least the latest checkpoint")
        self.root, self.keep, self.group = Path(root), keep, group
        self.files = dict(files or {})
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.free_bytes = _free_limit(free_bytes)

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first (one per step: a replaced one only while its successor is absent)."""
        if not self.root.is_dir():
            return []
        found: dict[int, Path] = {}
        for p in self.root.iterdir():
            m = _STEP.match(p.name)
            if m and (p / ".metadata").is_file() and (not m[1] or int(m[2]) not in found):
                found[int(m[2])] = p
        return [found[s] for s in sorted(found)]

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    @staticmethod
    def step_of(path: Path) -> int:
        return int(_STEP.match(path.name).group(2))

    def delete(self, path: Path) -> None:
        """Remove a checkpoint directory (one rank calls it); renamed out of the listing before its files go."""
        doomed = path.with_name(f".del-{path.name}-{uuid.uuid4().hex[:8]}")
        try:
            path.rename(doomed)
        except FileNotFoundError:
            return
        except OSError as exc:
            _log.warning("could not delete %s: %s", path, exc)
            return
        shutil.rmtree(doomed, ignore_errors=True)

    # ------------------------------------------------------------------------------------------- save
    def save(self, step: int, state: dict[str, torch.Tensor]) -> Path:
        """Write ``state`` as checkpoint ``step`` (collective), then prune; returns the final directory.

        Raises on every rank, before anything is written, if a rank's state is not storable or the
        checkpoint would not fit (:class:`CheckpointSaveError` naming the directory, bytes needed and
        bytes free); and :class:`CheckpointSaveError` if a write fails. Either way the earlier checkpoints
        are left as they were.
        """
        final, tmp = self.path(step), self.root / f".tmp-step-{step:08d}"
        problem: BaseException | None = _state_problem(state)
        if self.rank == 0 and problem is None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self._tidy()
            except OSError as exc:
                problem = CheckpointSaveError(f"cannot prepare checkpoint directory {self.root}: {exc}")
        self._agree(0)  # the directory exists before the ranks look at its filesystem
        self._check_space(step, state, problem)
        cpu_state = {k: v.detach().cpu() for k, v in state.items()}
        try:
            dcp.save(cpu_state, storage_writer=FileSystemWriter(tmp), process_group=self.group)
        except (OSError, CheckpointException) as exc:  # DCP raises these on every rank alike
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            code, what = _describe_failure(exc)
            free, hint = f"{max(_disk_free(self.root), 0):,} bytes free there now", ""
            if code == errno.ENOSPC:
                hint = f"The filesystem is full ({free}). "
            elif "unexpected pos" in what:  # torch.save's report of a failed write; it drops the OS error
                hint = f"torch.save reports a failed write this way, most often a full filesystem ({free}). "
            err = CheckpointSaveError(
                f"checkpoint step {step} could not be written to {tmp}: {what}. {hint}The partial directory was "
                f"removed; the earlier checkpoints are intact (latest: {self._latest_name()})")
            err.errno = code
            raise err from exc
        self._agree(0)  # every rank's shard is written
        failed: OSError | None = None
        if self.rank == 0:
            try:
                for name, text in self.files.items():
                    (tmp / name).write_text(text)
                self._publish(tmp, final)
            except OSError as exc:
                failed = exc
            else:
                for old in self.list()[: -self.keep]:
                    self.delete(old)
        if self._agree(int(failed is not None)):
            raise CheckpointSaveError(f"checkpoint step {step} was written to {tmp} but could not be moved to "
                                      f"{final}: {failed or 'see rank 0'}; the earlier checkpoints are intact "
                                      f"(latest: {self._latest_name()})")
        return final

    def _check_space(self, step: int, state: dict[str, torch.Tensor], problem: BaseException | None) -> None:
        """Every rank's verdict on the coming save, agreed over tensors; raises on every rank alike."""
        sizes = torch.zeros(0, 2, dtype=torch.int64)
        if problem is None:
            sizes = torch.tensor([[_key_id(k), v.nbytes + _TENSOR_MARGIN + _KEY_MARGIN * len(k)]
                                  for k, v in state.items()], dtype=torch.int64).reshape(-1, 2)
        free = _disk_free(self.root)
        capped = self.free_bytes is not None and (free < 0 or self.free_bytes < free)
        free = self.free_bytes if capped else free
        heads, tables = self._all_gather([len(sizes), int(problem is not None), free, int(capped)], sizes)
        failed = [r for r, h in enumerate(heads) if h[1]]
        if problem is not None:
            raise problem
        if failed:
            raise CheckpointSaveError(f"checkpoint step {step} was not written: rank(s) {failed} could not take "
                                      "part (see their error)")
        unique: dict[int, int] = {}
        for table in tables:
            for key, size in table.tolist():
                unique[key] = max(size, unique.get(key, 0))
        need = sum(unique.values()) + _RANK_MARGIN * len(heads)
        known = [(h[2], r, h[3]) for r, h in enumerate(heads) if h[2] >= 0]
        if not known or need <= min(known)[0]:
            return
        avail, rank, was_capped = min(known)
        seen = f" as rank {rank} sees it" if len(heads) > 1 else ""
        cap = f" (the limit set by {FREE_BYTES_ENV} or free_bytes)" if was_capped else ""
        err = CheckpointSaveError(
            f"not enough space for checkpoint step {step} in {self.root}: it needs about {need:,} bytes "
            f"({need / 1e9:.3g} GB: the tensors of {len(heads)} rank(s), replicated ones once, plus a margin), "
            f"{avail:,} bytes ({avail / 1e9:.3g} GB) are free{seen}{cap}. Nothing was written; the earlier "
            f"checkpoints are intact (latest: {self._latest_name()}). Free space there, lower checkpoint.keep, "
            "or set checkpoint.dir to a larger filesystem")
        err.errno = errno.ENOSPC
        raise err

    def _publish_ops(self, tmp: Path, final: Path) -> list[Callable[[], None]]:
        """The renames and the deletion that put ``tmp`` in place of ``final``, in order (module docstring)."""
        aside = final.with_name(f".old-{final.name}")
        ops: list[Callable[[], None]] = [partial(final.rename, aside)] if final.exists() else []
        return [*ops, partial(tmp.rename, final), partial(self.delete, aside)]

    def _publish(self, tmp: Path, final: Path) -> None:
        aside = final.with_name(f".old-{final.name}")
        try:
            for op in self._publish_ops(tmp, final):
                op()
        except OSError:
            if aside.exists() and not final.exists():
                aside.rename(final)  # the new one could not go in: the old one comes back
            raise
        fsync_dir(self.root)

    def _tidy(self) -> None:
        """Finish what a crash interrupted (rank 0, before a save): a checkpoint renamed aside goes back
        unless its successor is in place; partial saves and interrupted deletions are removed."""
        for p in self.root.iterdir():
            m = _STEP.match(p.name)
            if m and m[1]:
                final = self.root / p.name.removeprefix(".old-")
                if (final / ".metadata").is_file() or not (p / ".metadata").is_file():
                    self.delete(p)
                else:
                    if final.exists():
                        self.delete(final)
                    p.rename(final)
            elif p.name.startswith((".tmp-step-", ".del-")):
                shutil.rmtree(p, ignore_errors=True)

    def _latest_name(self) -> str:
        latest = self.latest()
        return latest.name if latest else "none"

    # ------------------------------------------------------------------------------------------- load
    def load(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        """Fill the tensors of ``state`` in place from checkpoint ``path`` (collective).

        The metadata is read once, by the restricted unpickler, and every rank checks keys and shapes;
        if any rank refuses, all raise before the collective load starts.
        """
        error: BaseException | None = None
        meta = None
        try:
            if not (path / ".metadata").is_file():
                raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata)")
            meta = read_metadata(path)
            problems = self._mismatches(meta, state)
            if problems:
                error = ValueError(f"cannot restore {path}: " + "; ".join(problems[:8]) + " -- it was written for "
                                   "another model or parallel layout; start a fresh run directory or match the config")
        except Exception as exc:
            error = exc
        worst = self._agree(0 if error is None else 2 if isinstance(error, UnsafeCheckpointError) else 1)
        if error is not None:
            raise error
        if worst == 2:
            raise UnsafeCheckpointError(f"another rank refused the metadata of {path} (see its error); nothing "
                                        "from it was run")
        if worst:
            raise ValueError(f"cannot restore {path}: another rank found it unreadable or incompatible (see its "
                             "error)")
        cpu_state = {k: v.detach().cpu().clone() for k, v in state.items()}
        dcp.load(cpu_state, storage_reader=MetadataReader(path, meta), process_group=self.group)
        with torch.no_grad():
            for k, v in state.items():
                v.copy_(cpu_state[k])

    @staticmethod
    def _mismatches(meta, state: dict[str, torch.Tensor]) -> list[str]:
        saved = meta.state_dict_metadata
        out = []
        for k, v in state.items():
            if k not in saved:
                out.append(f"{k!r} is not in the checkpoint")
            elif tuple(getattr(saved[k], "size", ())) != tuple(v.shape):
                out.append(f"{k!r} has shape {tuple(saved[k].size)} in the checkpoint, {tuple(v.shape)} here")
        return out

    # ------------------------------------------------------------------------------------------- collectives
    def _agree(self, value: int) -> int:
        """The largest ``value`` over the ranks (collective, so also a barrier); ``value`` alone in one process."""
        if not dist.is_initialized():
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_group_device(self.group))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def _all_gather(self, head: list[int], table: torch.Tensor) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Every rank's ``head`` (a few ints, the first being ``len(table)``) and ``(rows, 2)`` int64 table."""
        if not dist.is_initialized():
            return [head], [table]
        device, world = _group_device(self.group), dist.get_world_size(self.group)
        mine = torch.tensor(head, dtype=torch.int64, device=device)
        heads = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(heads, mine, group=self.group)
        counts = [int(h[0]) for h in heads]
        padded = torch.zeros(max(1, *counts), 2, dtype=torch.int64, device=device)
        padded[: len(table)] = table.to(device)
        tables = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(tables, padded, group=self.group)
        return [h.tolist() for h in heads], [t[:n].cpu() for t, n in zip(tables, counts)]


def read_model_state(path: str | Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The tensors of checkpoint ``path`` whose keys start with ``prefix`` (prefix removed), whole, in this
    process (no process group): every shard of any pipeline/expert-parallel layout is read and assembled."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata); give a step-NNNNNNNN directory")
    metadata = read_metadata(path)  # once, through the restricted unpickler; DCP gets this object
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not state:
        raise ValueError(f"{path} holds no tensor named {prefix}*; is it a checkpoint of the training job?")
    dcp.load(state, storage_reader=MetadataReader(path, metadata), no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}
