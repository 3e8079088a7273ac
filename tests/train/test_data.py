"""Token streams and the loader: determinism, data-parallel sharding, resumption, sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualflow.train.data import BatchLoader, DataConfig, load_streams, stdlib_files, validation_batches


def test_stdlib_stream_is_real_python_and_deterministic():
    cfg = DataConfig(max_bytes=200_000, val_fraction=0.1)
    a, b = load_streams(cfg), load_streams(cfg)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert len(a.train) + len(a.val) == 200_000 + (a.train == 0).sum() + (a.val == 0).sum()
    text = bytes(a.train[:200_000]).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text
    assert 0.08 < len(a.val) / (len(a.train) + len(a.val)) < 0.12
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in stdlib_files())


def test_text_files_split_each_document(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"A" * 100)
    (tmp_path / "b.txt").write_bytes(b"B" * 50)
    s = load_streams(DataConfig(source="text", paths=(str(tmp_path / "*.txt"),), val_fraction=0.2))
    assert bytes(s.train) == b"A" * 80 + b"\0" + b"B" * 40 + b"\0"
    assert bytes(s.val) == b"A" * 20 + b"\0" + b"B" * 10 + b"\0"
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_streams(DataConfig(source="text", paths=(str(tmp_path / "missing*"),)))


def test_binary_uint16_is_memory_mapped(tmp_path):
    ids = np.arange(0, 60000, 7, dtype="<u2")
    path = tmp_path / "tok.bin"
    ids.tofile(path)
    s = load_streams(DataConfig(source="binary", paths=(str(path),), val_fraction=0.25))
    assert isinstance(s.train, np.memmap) and s.vocab_bound == 1 << 16
    assert np.array_equal(np.concatenate([s.train, s.val]), ids)
    loader = BatchLoader(s.train, 8, 4, seed=0, vocab_size=1 << 16)
    x, _ = loader.next()
    assert x.dtype == torch.int64 and int(x.max()) > 255
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        BatchLoader(s.train, 8, 4, seed=0, vocab_size=256).next()
    (tmp_path / "odd.bin").write_bytes(b"\1\2\3")
    with pytest.raises(ValueError, match="uint16"):
        load_streams(DataConfig(source="binary", paths=(str(tmp_path / "odd.bin"),)))


def _stream(n=1000):
    return np.random.default_rng(0).integers(0, 256, n).astype(np.uint8)


def test_labels_are_inputs_shifted_by_one():
    tokens = _stream()
    x, y = BatchLoader(tokens, 16, 4, seed=3).next()
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
        window = torch.cat([row_x, row_y[-1:]]).numpy().astype(np.uint8)
        hits = [s for s in range(0, len(tokens) - 16, 16) if np.array_equal(tokens[s:s + 17], window)]
        assert hits, "each row is a window of the stream at a multiple of seq_len"


def test_data_parallel_shards_are_slices_of_the_single_rank_batch():
    tokens = _stream()
    single = BatchLoader(tokens, 10, 6, seed=7)
    shards = [BatchLoader(tokens, 10, 6, dp_rank=r, dp_size=3, seed=7) for r in range(3)]
    for _ in range(25):  # several epochs: 99 windows, 6 per step
        x, y = single.next()
        parts = [s.next() for s in shards]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    with pytest.raises(ValueError, match="multiple of the data-parallel size"):
        BatchLoader(tokens, 10, 5, dp_rank=0, dp_size=3)


def test_each_epoch_visits_every_window_once_in_a_new_order():
    tokens = np.arange(101, dtype=np.int64) % 256
    loader = BatchLoader(tokens, 10, 1, seed=1)
    epochs = [[int(loader.next()[0][0, 0]) for _ in range(10)] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(0, 100, 10))
    assert epochs[0] != epochs[1]


def test_resume_from_state_continues_identically():
    tokens = _stream()
    a = BatchLoader(tokens, 12, 4, dp_rank=1, dp_size=2, seed=5)
    for _ in range(7):
        a.next()
    b = BatchLoader(tokens, 12, 4, dp_rank=1, dp_size=2, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(30):
        assert all(torch.equal(u, v) for u, v in zip(a.next(), b.next()))
    c = BatchLoader(tokens, 12, 4, dp_rank=1, dp_size=2, seed=6)
    c.load_state_dict(a.state_dict())
    assert not torch.equal(a.next()[0], c.next()[0])  # the seed matters


def test_validation_set_is_fixed_and_sharded():
    tokens = _stream(2000)
    whole = validation_batches(tokens, 16, 4, 3)
    assert len(whole) == 3 and whole[0][0].shape == (4, 16)
    parts = [validation_batches(tokens, 16, 4, 3, dp_rank=r, dp_size=2) for r in range(2)]
    for b in range(3):
        assert torch.equal(whole[b][0], torch.cat([parts[0][b][0], parts[1][b][0]]))
    assert all(torch.equal(u[0], v[0]) for u, v in zip(whole, validation_batches(tokens, 16, 4, 3)))
    with pytest.raises(ValueError, match="val_batches"):
        validation_batches(tokens, 16, 100, 3)


@pytest.mark.parametrize("bad", [dict(source="web"), dict(source="text"), dict(val_fraction=1.0),
                                 dict(source="binary", paths=("a", "b"))])
def test_invalid_config(bad):
    with pytest.raises(ValueError, match="data"):
        DataConfig(**bad)
