"""``dualflow tokenize``: text files -> token shards for ``data.source = "binary"``, with a local tokenizer.json.

    dualflow tokenize --tokenizer tokenizer.json --out data/tok "corpus/**/*.txt" \\
        [--val-fraction 0.01] [--eos-token "<|endoftext|>"] [--shard-tokens 100000000]

Each file is a document: its ids (then the end token, if one is given) go to the training shards, its last
``--val-fraction`` to the validation shards (the split the loader makes of text). Shards are written in
the llm.c layout of ``dualflow.train.token_files`` (uint16 ids when the vocabulary fits, else uint32) as
``OUT/train_000000.bin ...`` and ``OUT/val_000000.bin ...``; a progress bar counts the bytes read, and the
command ends by printing the ``[data]`` section that trains on them.
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from dualflow.train.metrics import progress_bar
from dualflow.train.token_files import load_tokenizer, token_id, write_shard


class _ShardWriter:
    """Collects ids and writes them in shards of ``shard_tokens`` (the last one shorter)."""

    def __init__(self, out: Path, prefix: str, shard_tokens: int) -> None:
        self.out, self.prefix, self.size = out, prefix, shard_tokens
        self.pending: list[np.ndarray] = []
        self.count = 0
        self.paths: list[Path] = []

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.count += len(ids)
        while self.count >= self.size:
            self._write(self.size)

    def _write(self, n: int) -> None:
        flat = np.concatenate(self.pending) if self.pending else np.empty(0, dtype=np.uint32)
        self.paths.append(write_shard(self.out / f"{self.prefix}_{len(self.paths):06d}.bin", flat[:n]))
        self.pending, self.count = [flat[n:]], len(flat) - n

    def close(self) -> list[Path]:
        if self.count:
            self._write(self.count)
        return self.paths


def _batches(files: list[Path], max_bytes: int) -> Iterable[list[Path]]:
    batch, size = [], 0
    for f in files:
        batch.append(f)
        size += f.stat().st_size
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_files(files: list[Path], tokenizer: Any, out_dir: str | Path, *, val_fraction: float = 0.0,
                   eos_token: str = "", shard_tokens: int = 100_000_000,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, list[Path]]:
    """Tokenise ``files`` (one document each) into train/val shards under ``out_dir``; returns their paths.

    ``progress(bytes_done, bytes_total)`` is called after each batch of files.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val fraction {val_fraction} must lie in [0, 1)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    end = [token_id(tokenizer, eos_token)] if eos_token else []
    writers = {"train": _ShardWriter(out, "train", shard_tokens), "val": _ShardWriter(out, "val", shard_tokens)}
    total, done = sum(f.stat().st_size for f in files), 0
    for batch in _batches(files, 8 << 20):
        texts = [f.read_bytes().decode("utf-8", errors="replace") for f in batch]
        for enc in tokenizer.encode_batch(texts):
            ids = enc.ids
            cut = len(ids) - int(len(ids) * val_fraction)
            writers["train"].add(np.array(ids[:cut] + end, dtype=np.uint32))
            if val_fraction:
                writers["val"].add(np.array(ids[cut:] + end, dtype=np.uint32))
        done += sum(f.stat().st_size for f in batch)
        if progress is not None:
            progress(done, total)
    return {name: w.close() for name, w in writers.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help="text files or glob patterns (quote ** patterns), one document each")
    parser.add_argument("--tokenizer", required=True, type=Path, help="a local tokenizer.json")
    parser.add_argument("--out", required=True, type=Path, help="directory for train_*.bin and val_*.bin")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="last fraction of each document that goes to validation shards (default 0: none)")
    parser.add_argument("--eos-token", default="", help="token appended after each document (default: none)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="ids per shard (default 1e8)")


def _show(done: int, total: int, start: float) -> None:
    rate = done / max(time.perf_counter() - start, 1e-9) / 1e6
    print(f"\rtokenize {progress_bar(done, total)} {done / 1e6:,.1f}/{total / 1e6:,.1f} MB ({rate:.1f} MB/s)",
          end="", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    files = sorted({Path(m) for pattern in args.files for m in glob.glob(pattern, recursive=True)
                    if Path(m).is_file()})
    if not files:
        print(f"dualflow tokenize: no file matches {args.files}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        shards = tokenize_files(files, tokenizer, args.out, val_fraction=args.val_fraction,
                                eos_token=args.eos_token, shard_tokens=args.shard_tokens,
                                progress=lambda d, t: _show(d, t, start))
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"\ndualflow tokenize: {exc}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    lines = ["[data]", 'source = "binary"', f'paths = ["{args.out}/train_*.bin"]']
    if shards["val"]:
        lines.append(f'val_paths = ["{args.out}/val_*.bin"]')
    print(f"{len(files)} file(s) -> {len(shards['train'])} train and {len(shards['val'])} validation shard(s) in "
          f"{args.out} (vocabulary {tokenizer.get_vocab_size()}); to train on them:\n" + "\n".join(lines)
          + f"\n# and [model] vocab_size >= {tokenizer.get_vocab_size()}")
    return 0
