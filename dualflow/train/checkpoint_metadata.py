"""The metadata file of a checkpoint, read without running code: an exact allow-list and a DCP reader.

``torch.distributed.checkpoint`` keeps a checkpoint's index (keys, shapes, dtypes, where each tensor's
bytes are) in a pickle, ``.metadata``. A pickle can name any importable object and call it, so it is
unpickled here by :class:`_MetadataUnpickler`, which resolves only the exact ``(module, name)`` pairs
in :data:`ALLOWED`: every global that DCP's metadata of a tensor-only checkpoint references (found by
recording the globals of real checkpoints' metadata with every dtype below; tests/train/
test_checkpoint.py repeats that on whatever torch it runs with). No dotted names, no other attribute of
those modules. The object is read once and handed to DCP through :class:`MetadataReader`, so DCP's own
``pickle.load`` never sees the file.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_DCP = "torch.distributed.checkpoint"

# The tensor dtypes a checkpoint may hold (pickled as ``torch.<name>``); ``save`` refuses any other, so
# that nothing is written that could not be read back.
DTYPES = ("float64", "float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "int64", "int32",
          "int16", "int8", "uint8", "bool")

ALLOWED = frozenset({
    # DCP's metadata dataclasses (Metadata -> TensorStorageMetadata -> TensorProperties, ChunkStorageMetadata;
    # storage_data: MetadataIndex -> _StorageInfo; storage_meta: StorageMeta)
    (f"{_DCP}.metadata", "Metadata"),
    (f"{_DCP}.metadata", "TensorStorageMetadata"),
    (f"{_DCP}.metadata", "TensorProperties"),
    (f"{_DCP}.metadata", "ChunkStorageMetadata"),
    (f"{_DCP}.metadata", "MetadataIndex"),
    (f"{_DCP}.metadata", "StorageMeta"),
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"),  # an Enum: TensorProperties' memory format
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    # the one function: torch pickles a layout as _get_layout("torch.strided"), a lookup among torch's layouts
    ("torch.serialization", "_get_layout"),
    # StorageMeta.checkpoint_id, the directory written (the class lives in pathlib._local from Python 3.13)
    ("pathlib", "PosixPath"),
    ("pathlib._local", "PosixPath"),
    *(("torch", name) for name in DTYPES),
})


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint metadata references something other than checkpoint metadata."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise UnsafeCheckpointError(
                f"checkpoint metadata references {module}.{name}, which is not one of the checkpoint metadata "
                "types; refusing to load it (nothing from it was run). A checkpoint written by dualflow never "
                "does this: the file was altered or comes from elsewhere; resume from another checkpoint")
        # resolved here, not by pickle's lookup, which would also follow dotted names and compat mappings
        obj = getattr(importlib.import_module(module), name, None)
        if obj is None:
            raise pickle.UnpicklingError(f"checkpoint metadata references {module}.{name}, which this torch lacks")
        if module == "torch" and name != "Size" and not isinstance(obj, torch.dtype):
            raise UnsafeCheckpointError(f"checkpoint metadata references torch.{name}, which is not a dtype")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("checkpoint metadata holds a persistent id, which DCP's metadata never does")


def read_metadata(path: Path) -> Metadata:
    """Unpickle ``path/.metadata`` with the restricted unpickler; raise if it references anything else."""
    meta = _MetadataUnpickler(io.BytesIO((Path(path) / ".metadata").read_bytes())).load()
    if not isinstance(meta, Metadata):
        raise UnsafeCheckpointError(f"{path}/.metadata holds a {type(meta).__name__}, not DCP's Metadata")
    return meta


class MetadataReader(FileSystemReader):
    """DCP's file reader, given the metadata already read by :func:`read_metadata` (DCP does not read it)."""

    def __init__(self, path: str | Path, metadata: Metadata) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # DCP's fallback to per-rank metadata files, which are never written
            raise FileNotFoundError(f"{self.path} has no per-rank metadata; dualflow checkpoints have one .metadata")
        meta = self._metadata
        # what FileSystemReader.read_metadata does after its own unpickling
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta
