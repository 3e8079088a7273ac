"""Token streams and the loader: determinism, data-parallel sharding, resumption, sources (bytes, a
tokenizer.json, token files of either width in one or many shards), and the tokenize command."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualflow.train.data import BatchLoader, DataConfig, load_streams, stdlib_files, validation_batches
from dualflow.train.token_files import MAGIC, TokenStream, read_tokens, write_shard


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
                                 dict(source="binary", paths=("a",), dtype="int8"),
                                 dict(source="text", paths=("a",), val_paths=("b",)),
                                 dict(source="binary", paths=("a",), tokenizer="t.json"),
                                 dict(source="text", paths=("a",), eos_token="</s>")])
def test_invalid_config(bad):
    with pytest.raises(ValueError, match="data"):
        DataConfig(**bad)


# ---------------------------------------------------------------------------------- token files
def test_token_files_of_both_widths_with_and_without_header(tmp_path):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 1 << 16, 3000).astype(np.uint32)
    wide = rng.integers(0, 1 << 20, 2000).astype(np.uint32)
    assert int(wide.max()) >= 1 << 16  # needs 32 bits
    write_shard(tmp_path / "a.bin", small)
    write_shard(tmp_path / "b.bin", wide)
    assert read_tokens(tmp_path / "a.bin").dtype == np.uint16 and read_tokens(tmp_path / "b.bin").dtype == np.uint32
    # raw files (no header): the configured width
    wide.astype("<u4").tofile(tmp_path / "raw32.bin")
    assert np.array_equal(read_tokens(tmp_path / "raw32.bin", "uint32"), wide)
    assert not np.array_equal(read_tokens(tmp_path / "raw32.bin", "uint16")[:len(wide)], wide)
    (tmp_path / "odd.bin").write_bytes(b"\1\2\3\4\5\6")
    with pytest.raises(ValueError, match="uint32"):
        read_tokens(tmp_path / "odd.bin", "uint32")
    s = load_streams(DataConfig(source="binary", paths=(str(tmp_path / "[ab].bin"),), val_fraction=0.1))
    assert s.vocab_bound == 1 << 32 and isinstance(s.train, TokenStream)
    # each file gives its last tenth to validation
    assert np.array_equal(s.train[0:len(s.train)], np.concatenate([small[:2700], wide[:1800]]))
    assert np.array_equal(s.val[0:len(s.val)], np.concatenate([small[2700:], wide[1800:]]))
    x, _ = BatchLoader(s.train, 16, 8, seed=0, vocab_size=1 << 20).next()
    assert int(x.max()) > 1 << 16


def test_a_header_lookalike_without_a_matching_size_is_read_raw(tmp_path):
    # a raw file whose first ids happen to spell the magic number: the header's count does not match
    ids = np.zeros(600, dtype="<u2")
    ids[:2] = np.array([MAGIC], dtype="<i4").view("<u2")
    ids[2] = 1
    ids.tofile(tmp_path / "raw.bin")
    assert np.array_equal(read_tokens(tmp_path / "raw.bin"), ids)


def test_token_stream_slices_across_shards_like_one_array():
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 100, n) for n in (5, 0, 1, 17, 3)]
    whole = np.concatenate(parts)
    stream = TokenStream(parts)
    assert len(stream) == len(whole)
    for _ in range(300):
        a, b = sorted(rng.integers(0, len(whole) + 1, 2))
        assert np.array_equal(stream[a:b], whole[a:b]), (a, b)
    assert np.array_equal(stream[20:], whole[20:]) and np.array_equal(stream[:], whole)
    one, many = BatchLoader(whole, 4, 2, seed=3), BatchLoader(stream, 4, 2, seed=3)
    for _ in range(12):
        assert all(torch.equal(u, v) for u, v in zip(one.next(), many.next()))
    with pytest.raises(TypeError, match="contiguous"):
        stream[::2]


def test_separate_validation_files_nanogpt_layout(tmp_path):
    train, val = np.arange(5000, dtype="<u2"), np.arange(7000, 7600, dtype="<u2")
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    s = load_streams(DataConfig(source="binary", paths=(str(tmp_path / "train.bin"),),
                                val_paths=(str(tmp_path / "val.bin"),)))
    assert isinstance(s.train, np.memmap) and np.array_equal(s.train, train) and np.array_equal(s.val, val)


# ---------------------------------------------------------------------------------- tokenizer
def _tokenizer_file(tmp_path, texts):
    """A byte-level BPE tokenizer.json trained here on ``texts`` (vocabulary 300, one special token)."""
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizer tests need tokenizers (pip install "
                                                          "'dualflow[hf]'; make test installs it)")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path, tok


def _documents(tmp_path):
    files = sorted(stdlib_files())[:6]
    texts = [f.read_text(errors="replace")[:3000] for f in files]
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(t)
    return texts


def test_text_through_a_tokenizer_json(tmp_path):
    texts = _documents(tmp_path)
    path, tok = _tokenizer_file(tmp_path, texts)
    eos = tok.token_to_id("<eos>")
    s = load_streams(DataConfig(source="text", paths=(str(tmp_path / "doc*.txt"),), tokenizer=str(path),
                                eos_token="<eos>", val_fraction=0.2, max_bytes=10**7))
    assert s.vocab_bound == tok.get_vocab_size() == 300
    train, val = list(s.train), list(s.val)
    assert train.count(eos) == val.count(eos) == len(texts)
    # each document's ids, cut at its last fifth, come back in order and decode to the document
    for text in texts:
        ids = tok.encode(text).ids
        cut = len(ids) - int(len(ids) * 0.2)
        t_end, v_end = train.index(eos), val.index(eos)
        assert train[:t_end] == ids[:cut] and val[:v_end] == ids[cut:]
        assert tok.decode(train[:t_end] + val[:v_end]) == text
        train, val = train[t_end + 1:], val[v_end + 1:]
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        load_streams(DataConfig(source="text", paths=(str(tmp_path / "doc*.txt"),), tokenizer=str(path),
                                eos_token="<|endoftext|>"))
    with pytest.raises(FileNotFoundError, match="tokenizer file"):
        load_streams(DataConfig(source="text", paths=(str(tmp_path / "doc*.txt"),), tokenizer="missing.json"))


def test_tokenize_command_writes_shards_the_loader_reads(tmp_path, capsys):
    from dualflow.cli import main

    texts = _documents(tmp_path)
    path, tok = _tokenizer_file(tmp_path, texts)
    out = tmp_path / "tok"
    assert main(["tokenize", str(tmp_path / "doc*.txt"), "--tokenizer", str(path), "--out", str(out),
                 "--val-fraction", "0.1", "--eos-token", "<eos>", "--shard-tokens", "700"]) == 0
    captured = capsys.readouterr()
    assert "####################" in captured.err  # the progress bar reached the end
    assert f'paths = ["{out}/train_*.bin"]' in captured.out and "val_paths" in captured.out
    shards = sorted(out.glob("train_*.bin"))
    assert len(shards) > 2 and all(len(read_tokens(p)) == 700 for p in shards[:-1])
    s = load_streams(DataConfig(source="binary", paths=(str(out / "train_*.bin"),),
                                val_paths=(str(out / "val_*.bin"),)))
    eos = [tok.token_to_id("<eos>")]
    expected_train, expected_val = [], []
    for name in sorted(p.name for p in tmp_path.glob("doc*.txt")):  # the command's file order
        ids = tok.encode((tmp_path / name).read_text()).ids
        cut = len(ids) - int(len(ids) * 0.1)
        expected_train += ids[:cut] + eos
        expected_val += ids[cut:] + eos
    assert s.train[0:len(s.train)].tolist() == expected_train
    assert s.val[0:len(s.val)].tolist() == expected_val
    assert main(["tokenize", str(tmp_path / "nothing*.txt"), "--tokenizer", str(path), "--out", str(out)]) == 2
