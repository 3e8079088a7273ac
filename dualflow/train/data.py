"""Token streams and a deterministic, resumable, data-parallel batch loader.

Sources (``DataConfig.source``):
- ``stdlib``: byte-level tokens of the Python standard library's ``.py`` files, read at run time from the
  running interpreter (always on the machine, nothing to download). Files are taken in sorted order up
  to ``max_bytes``;
- ``text``: the user's text files (paths or glob patterns), byte-level, or tokenised at start-up with a
  local ``tokenizer.json`` (``data.tokenizer``, the ``tokenizers`` package);
- ``binary``: pre-tokenised token files, ``uint16`` or ``uint32``, one or many shards (paths or glob
  patterns), memory-mapped: raw arrays (nanoGPT's train.bin/val.bin; ``data.dtype`` says which width) or
  shards with the llm.c header (``dualflow tokenize`` writes those); see ``dualflow.train.token_files``.

Text documents are joined with a 0 byte (tokenised: with ``data.eos_token``, if given). Each document
(each token file) gives its last ``val_fraction`` to the validation stream, so both streams see every kind
of text, unless ``data.val_paths`` names separate validation token files.

The loader cuts a stream into windows of ``seq_len + 1`` tokens at stride ``seq_len`` and visits them in
a fresh permutation per epoch (seeded by ``(seed, epoch)``). A global batch is the next
``global_batch`` windows of that order; data-parallel rank r takes the r-th contiguous slice. Its whole
state is the number of windows consumed, so a checkpoint restores it exactly.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

from dualflow.launcher.config import ConfigError, OneOf, Range, check_fields
from dualflow.train.token_files import DTYPES, TokenStream, load_tokenizer, read_tokens, token_id


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"
    paths: tuple[str, ...] = ()
    max_bytes: int = 4_000_000
    val_fraction: float = 0.05
    seq_len: int = 64
    seed: int = 1234
    # binary: separate validation files, and the id width of raw files (shards with a header say theirs)
    val_paths: tuple[str, ...] = ()
    dtype: str = "uint16"
    # text: a local tokenizer.json (empty: bytes) and the token that ends each document (empty: none)
    tokenizer: str = ""
    eos_token: str = ""

    def __post_init__(self) -> None:
        check_fields(self, "data", source=OneOf("stdlib", "text", "binary"), max_bytes=Range(ge=1),
                     val_fraction=Range(gt=0, lt=1), seq_len=Range(ge=1), seed=Range(ge=0, lt=2**63),
                     dtype=OneOf(*sorted(DTYPES)))
        if self.source != "stdlib" and not self.paths:
            raise ConfigError([f"data.paths: data.source={self.source!r} needs files or glob patterns, got none"],
                              "invalid data config")
        problems = []
        if self.val_paths and self.source != "binary":
            problems.append("data.val_paths: read with data.source = 'binary' only; text sources take "
                            "data.val_fraction of each document")
        if (self.tokenizer or self.eos_token) and self.source != "text":
            problems.append(f"data.tokenizer and data.eos_token apply to data.source = 'text' (got {self.source!r}); "
                            "pre-tokenise with `dualflow tokenize` for 'binary'")
        if self.eos_token and not self.tokenizer:
            problems.append("data.eos_token: needs data.tokenizer (byte-level text ends documents with a 0 byte)")
        if problems:
            raise ConfigError(problems, "invalid data config")


@dataclasses.dataclass(frozen=True)
class Streams:
    """The train and validation token streams (1-D integer arrays, or :class:`TokenStream` over several
    files) and the largest token id + 1 bound."""

    train: np.ndarray | TokenStream
    val: np.ndarray | TokenStream
    vocab_bound: int


def _expand(patterns: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise FileNotFoundError(f"data.paths entry {pattern!r} matches no file")
        files += [Path(m) for m in matches if Path(m).is_file()]
    return files


def stdlib_files() -> list[Path]:
    """The standard library's Python sources of this interpreter, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library directory {root}")
    return files


def _split_documents(docs: list[bytes], val_fraction: float) -> Streams:
    train, val = [], []
    for doc in docs:
        cut = len(doc) - int(len(doc) * val_fraction)
        train.append(doc[:cut] + b"\0")
        val.append(doc[cut:] + b"\0")
    return Streams(np.frombuffer(b"".join(train), dtype=np.uint8), np.frombuffer(b"".join(val), dtype=np.uint8),
                   256)


def _tokenized(docs: list[bytes], cfg: DataConfig) -> Streams:
    tokenizer = load_tokenizer(cfg.tokenizer)
    end = [token_id(tokenizer, cfg.eos_token)] if cfg.eos_token else []
    train: list[int] = []
    val: list[int] = []
    for enc in tokenizer.encode_batch([d.decode("utf-8", errors="replace") for d in docs]):
        cut = len(enc.ids) - int(len(enc.ids) * cfg.val_fraction)
        train += enc.ids[:cut] + end
        val += enc.ids[cut:] + end
    return Streams(np.array(train, dtype=np.uint32), np.array(val, dtype=np.uint32), tokenizer.get_vocab_size())


def _stream(parts: list[np.ndarray]) -> np.ndarray | TokenStream:
    return parts[0] if len(parts) == 1 else TokenStream(parts)


def _token_files(cfg: DataConfig) -> Streams:
    arrays = [read_tokens(f, cfg.dtype) for f in _expand(cfg.paths)]
    if cfg.val_paths:
        train, val = arrays, [read_tokens(f, cfg.dtype) for f in _expand(cfg.val_paths)]
    else:
        cuts = [len(a) - int(len(a) * cfg.val_fraction) for a in arrays]
        train, val = [a[:c] for a, c in zip(arrays, cuts)], [a[c:] for a, c in zip(arrays, cuts)]
    width = max(a.dtype.itemsize for a in arrays + val)
    return Streams(_stream(train), _stream(val), 1 << (8 * width))


def load_streams(cfg: DataConfig) -> Streams:
    """Read the configured source into train/validation streams."""
    if cfg.source == "binary":
        return _token_files(cfg)
    files = stdlib_files() if cfg.source == "stdlib" else _expand(cfg.paths)
    docs, total = [], 0
    for f in files:
        if total >= cfg.max_bytes:
            break
        data = f.read_bytes()[: cfg.max_bytes - total]
        docs.append(data)
        total += len(data)
    return _tokenized(docs, cfg) if cfg.tokenizer else _split_documents(docs, cfg.val_fraction)


class BatchLoader:
    """Deterministic global batches of ``[inputs, labels]``, this data-parallel rank's slice of each."""

    def __init__(self, tokens: np.ndarray | TokenStream, seq_len: int, global_batch: int, *, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, vocab_size: int | None = None) -> None:
        if global_batch % dp_size:
            raise ValueError(f"global batch {global_batch} does not split over {dp_size} data-parallel ranks; "
                             "make it a multiple of the data-parallel size")
        self.tokens, self.seq_len, self.seed, self.vocab_size = tokens, seq_len, seed, vocab_size
        self.global_batch, self.local = global_batch, global_batch // dp_size
        self.offset = dp_rank * self.local
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < global_batch:
            raise ValueError(f"the stream has {len(tokens)} tokens, {self.num_windows} windows of {seq_len}; "
                             f"a global batch needs {global_batch}: use more data or a shorter seq_len")
        self.position = 0  # windows consumed, over all ranks
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.num_windows))
        return self._perm[1]

    def window(self, sample: int) -> torch.Tensor:
        """Tokens of global sample number ``sample`` (seq_len + 1 of them)."""
        epoch, i = divmod(sample, self.num_windows)
        start = int(self._order(epoch)[i]) * self.seq_len
        return torch.from_numpy(np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the next global batch: (inputs, labels), each [local_batch, seq_len]."""
        first = self.position + self.offset
        rows = torch.stack([self.window(first + j) for j in range(self.local)])
        self.position += self.global_batch
        if self.vocab_size is not None and int(rows.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(rows.max())} in the data is outside the model's vocabulary of "
                             f"{self.vocab_size}; raise model.vocab_size or check the tokenised file")
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"position": torch.tensor(self.position, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.position = int(state["position"])


def validation_batches(tokens: np.ndarray | TokenStream, seq_len: int, batch: int, num_batches: int, *,
                       dp_rank: int = 0, dp_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: ``num_batches`` global batches of windows spread evenly over the stream.

    Returns this rank's slices. The same windows every call, so validation losses are comparable.
    """
    windows = (len(tokens) - 1) // seq_len
    need = batch * num_batches
    if windows < need:
        raise ValueError(f"validation stream has {windows} windows of {seq_len} tokens; {need} are needed "
                         "(lower train.val_batches or raise data.val_fraction / data.max_bytes)")
    starts = np.linspace(0, windows - 1, need).round().astype(np.int64) * seq_len
    local = batch // dp_size
    out = []
    for b in range(num_batches):
        chosen = starts[b * batch + dp_rank * local: b * batch + (dp_rank + 1) * local]
        rows = torch.stack([torch.from_numpy(np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64))
                            for s in chosen])
        out.append((rows[:, :-1], rows[:, 1:]))
    return out
