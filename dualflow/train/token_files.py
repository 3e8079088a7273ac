"""Tokens: a tokenizer from a local ``tokenizer.json``, and pre-tokenised token files (flat arrays of
``uint16``/``uint32`` ids, one or many shards, memory-mapped).

Two layouts are read, the ones nanoGPT-style pipelines write:

- raw: the file is the ids, little-endian (nanoGPT's ``prepare.py`` writes ``train.bin``/``val.bin`` of
  ``uint16`` this way); the dtype comes from the config (``data.dtype``);
- with a header (llm.c and modded-nanoGPT shards): 256 little-endian int32, of which the first three are
  the magic 20240520, the version (1: ``uint16`` ids, 2: ``uint32``) and the number of ids, then the ids.

:func:`write_shard` writes the header layout, which says its own dtype. :class:`TokenStream` reads any
number of arrays as one without loading them. :func:`load_tokenizer` needs the ``tokenizers`` package
(``pip install 'dualflow[hf]'``), imported only there.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = 20240520
HEADER_INTS = 256
_VERSIONS = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def _header(path: Path) -> np.ndarray | None:
    """The header of ``path`` if it has a valid one (magic, known version, size that matches), else None."""
    size = path.stat().st_size
    if size < HEADER_INTS * 4:
        return None
    head = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    dtype = _VERSIONS.get(int(head[1]))
    if int(head[0]) != MAGIC or dtype is None or size != HEADER_INTS * 4 + int(head[2]) * dtype.itemsize:
        return None
    return head


def read_tokens(path: str | Path, dtype: str = "uint16") -> np.ndarray:
    """The ids of one token file, memory-mapped (header layout detected, else raw ``dtype``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} does not exist")
    head = _header(path)
    if head is not None:
        return np.memmap(path, dtype=_VERSIONS[int(head[1])], mode="r", offset=HEADER_INTS * 4, shape=(int(head[2]),))
    if dtype not in DTYPES:
        raise ValueError(f"data.dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    width = DTYPES[dtype].itemsize
    if path.stat().st_size % width or path.stat().st_size == 0:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is not a whole, non-zero number of {dtype} ids and "
                         f"the file has no token-shard header; check data.dtype (uint16 or uint32)")
    return np.memmap(path, dtype=DTYPES[dtype], mode="r")


def write_shard(path: str | Path, ids: np.ndarray) -> Path:
    """Write ``ids`` with the header (uint16 when every id fits, else uint32); returns the path."""
    ids = np.asarray(ids)
    wide = ids.size and int(ids.max()) >= 1 << 16
    dtype, version = (np.dtype("<u4"), 2) if wide else (np.dtype("<u2"), 1)
    head = np.zeros(HEADER_INTS, dtype="<i4")
    head[:3] = (MAGIC, version, ids.size)
    path = Path(path)
    with path.open("wb") as fh:
        fh.write(head.tobytes())
        fh.write(ids.astype(dtype).tobytes())
    return path


class TokenStream:
    """Arrays read as one 1-D stream: ``len`` and slicing (a slice across a boundary joins the pieces)."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = [p for p in parts if len(p)]
        self.starts = [0]
        for p in self.parts:
            self.starts.append(self.starts[-1] + len(p))
        self.dtype = self.parts[0].dtype if self.parts else np.dtype("<u2")

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a token stream is read by contiguous slices")
        start, stop, _ = key.indices(len(self))
        pieces = []
        i = bisect.bisect_right(self.starts, start) - 1
        while start < stop and i < len(self.parts):
            lo = start - self.starts[i]
            hi = min(stop, self.starts[i + 1]) - self.starts[i]
            pieces.append(self.parts[i][lo:hi])
            start, i = self.starts[i] + hi, i + 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)


def load_tokenizer(path: str | Path) -> Any:
    """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json`` (nothing is downloaded)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ImportError("a tokenizer.json needs the tokenizers package: pip install 'dualflow[hf]' "
                          "(or pip install tokenizers)") from exc
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist (expected a tokenizer.json)")
    return Tokenizer.from_file(str(path))


def token_id(tokenizer: Any, token: str) -> int:
    """The id of ``token`` in ``tokenizer``'s vocabulary; an error naming it if it has none."""
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary; give one it has (its special "
                         "tokens are listed under added_tokens in tokenizer.json) or none")
    return int(found)
