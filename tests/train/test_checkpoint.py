"""Checkpoints: round trip, atomic publication, pruning, crash points, space and write failures, gloo.

The metadata's safety has its own file, test_checkpoint_metadata.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from dualflow.train import checkpoint as checkpoint_module
from dualflow.train.checkpoint import FREE_BYTES_ENV, CheckpointManager, CheckpointSaveError, UnsafeCheckpointError
from tests.dist import progress, run_workers

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"model.w": torch.randn(4, 5, generator=g), "optim.w.exp_avg": torch.randn(4, 5, generator=g).bfloat16(),
            "step": torch.tensor(seed, dtype=torch.int64), "rng.cpu": torch.get_rng_state()}


def _zeros_like(state):
    return {k: torch.zeros_like(v) for k, v in state.items()}


def test_round_trip_keep_last_and_ignore_partial(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        mgr.save(step, _state(step))
    assert [p.name for p in mgr.list()] == ["step-00000020", "step-00000030"]
    # A save that died half way leaves a temporary directory: it is never taken for a checkpoint.
    partial = tmp_path / ".tmp-step-00000040"
    shutil.copytree(mgr.latest(), partial)
    (partial / ".metadata").unlink()
    assert mgr.latest() == mgr.path(30)
    target = _zeros_like(_state(0))
    mgr.load(mgr.latest(), target)
    for k, v in _state(30).items():
        assert torch.equal(target[k], v), k
    assert target["optim.w.exp_avg"].dtype == torch.bfloat16
    mgr.save(50, _state(50))
    assert not partial.exists()  # cleaned once a newer save is in place
    with pytest.raises(TypeError, match="only tensors"):
        mgr.save(60, {"step": 60})


def test_missing_key_is_an_error(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"a": torch.ones(2)})
    with pytest.raises(ValueError, match="'b' is not in the checkpoint"):
        mgr.load(mgr.latest(), {"a": torch.zeros(2), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"'a' has shape \(2,\) in the checkpoint, \(3,\) here"):
        mgr.load(mgr.latest(), {"a": torch.zeros(3)})


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_foreign_objects_in_metadata_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mgr = CheckpointManager(tmp_path / "ck")
    mgr.save(1, {"a": torch.ones(2)})
    meta = mgr.latest() / ".metadata"
    original = meta.read_bytes()
    meta.write_bytes(pickle.dumps({"evil": _Payload()}))
    with pytest.raises(UnsafeCheckpointError, match=r"(os|posix)\.system"):
        mgr.load(mgr.latest(), {"a": torch.zeros(2)})
    assert not (tmp_path / "PWNED").exists()
    meta.write_bytes(original)  # the genuine metadata loads
    target = {"a": torch.zeros(2)}
    mgr.load(mgr.latest(), target)
    assert torch.equal(target["a"], torch.ones(2))


def _sharded_worker(rank, world, root):
    # Keys: one replicated across ranks, one per rank (an expert shard), one per rank-pair.
    def state(value):
        return {"shared": torch.full((3,), float(value)), f"expert.{rank}": torch.full((2, 2), value + rank * 0.5),
                f"pair.{rank // 2}": torch.full((4,), value + rank // 2)}

    mgr = CheckpointManager(root, keep=1)
    progress("save 1")
    mgr.save(1, state(1.0))
    progress("save 2")
    path = mgr.save(2, state(2.0))
    target = {k: torch.zeros_like(v) for k, v in state(0.0).items()}
    progress("load")
    mgr.load(path, target)
    progress("load with a key that only rank 1 lacks")  # every rank refuses, none enters the load
    try:
        mgr.load(path, {**target, **({"extra": torch.zeros(1)} if rank == 1 else {})})
        refused = "loaded"
    except ValueError as exc:
        refused = str(exc)
    return {k: v.tolist() for k, v in target.items()}, [p.name for p in mgr.list()], refused


def test_sharded_save_and_load_on_gloo(tmp_path):
    results = run_workers(_sharded_worker, 4, str(tmp_path), timeout=120)
    for rank, (loaded, names, refused) in enumerate(results):
        assert names == ["step-00000002"]
        assert ("'extra' is not in the checkpoint" if rank == 1 else "another rank found it") in refused, refused
        assert loaded["shared"] == [2.0] * 3
        assert loaded[f"expert.{rank}"] == [[2.0 + rank * 0.5] * 2] * 2
        assert loaded[f"pair.{rank // 2}"] == [2.0 + rank // 2] * 4


def _assert_holds(mgr, path, expected):
    target = _zeros_like(expected)
    mgr.load(path, target)
    for k, v in expected.items():
        assert torch.equal(target[k], v), k


# ----------------------------------------------------------------------------------------- crash points
@pytest.mark.parametrize("done", [0, 1, 2, 3])
def test_replacing_a_checkpoint_leaves_one_for_its_step_at_every_crash_point(tmp_path, done):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(5, _state(1))
    tmp, final = tmp_path / ".tmp-step-00000005", mgr.path(5)
    dcp.save(_state(2), storage_writer=FileSystemWriter(tmp))  # a second save of step 5, fully written...
    ops = mgr._publish_ops(tmp, final)
    assert len(ops) == 3  # old one aside, new one in, old one deleted
    for op in ops[:done]:  # ... then a crash after `done` of the steps that put it in place
        op()
    expected = _state(1) if done < 2 else _state(2)
    for m in (mgr, CheckpointManager(tmp_path)):  # this process, and a restarted one (the resume path)
        assert [m.step_of(p) for p in m.list()] == [5]
        _assert_holds(m, m.latest(), expected)
    mgr.save(6, _state(3))  # the next save finishes what the crash interrupted
    assert sorted(os.listdir(tmp_path)) == ["step-00000005", "step-00000006"]
    _assert_holds(mgr, final, expected)
    mgr.save(5, _state(4))  # an uninterrupted replacement
    assert sorted(os.listdir(tmp_path)) == ["step-00000005", "step-00000006"]
    _assert_holds(mgr, final, _state(4))


class _Crash(BaseException):
    """Stands for the process dying: nothing after it runs, no handler catches it."""


def test_a_deletion_cut_short_never_looks_like_a_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep=2)
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))

    def rmtree_then_die(path, ignore_errors=False):  # the data go first, .metadata survives
        for f in Path(path).glob("*.distcp"):
            f.unlink()
        raise _Crash

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", rmtree_then_die)
    with pytest.raises(_Crash):
        mgr.delete(mgr.path(2))
    monkeypatch.undo()
    assert [p.name for p in mgr.list()] == ["step-00000001"]
    _assert_holds(mgr, mgr.latest(), _state(1))
    mgr.save(3, _state(3))
    assert sorted(os.listdir(tmp_path)) == ["step-00000001", "step-00000003"]


def test_a_failed_rename_puts_the_earlier_checkpoint_back(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, _state(1))
    real = Path.rename

    def rename(self, target):
        if self.name.startswith(".tmp-"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(CheckpointSaveError, match=r"written to .*\.tmp-step-00000005 but could not be moved"):
        mgr.save(5, _state(2))
    monkeypatch.undo()
    assert not (tmp_path / ".old-step-00000005").exists()
    _assert_holds(mgr, mgr.latest(), _state(1))


# ----------------------------------------------------------------------------------------- out of disk
def _big_state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(256, 512, generator=g), "m": torch.randn(256, 512, generator=g).bfloat16(),
            "step": torch.tensor(seed)}


def _needed(message: str) -> int:
    return int(re.search(r"needs about ([\d,]+) bytes", message).group(1).replace(",", ""))


def test_too_little_space_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _big_state(1))
    written = sum(f.stat().st_size for f in mgr.path(1).iterdir())
    with pytest.raises(CheckpointSaveError) as info:
        CheckpointManager(tmp_path, free_bytes=written).save(2, _big_state(2))
    msg = str(info.value)
    assert str(tmp_path) in msg and f"{written:,} bytes" in msg and "latest: step-00000001" in msg, msg
    assert info.value.errno == errno.ENOSPC
    need = _needed(msg)
    # The estimate covers what a save of the same tensors really wrote, with a bounded margin.
    assert written <= need <= written + 2**21
    assert sorted(os.listdir(tmp_path)) == ["step-00000001"]
    _assert_holds(mgr, mgr.latest(), _big_state(1))
    monkeypatch.setenv(FREE_BYTES_ENV, str(need - 1))  # the same limit from the environment
    with pytest.raises(CheckpointSaveError, match=f"{need - 1:,} bytes"):
        CheckpointManager(tmp_path).save(2, _big_state(2))
    monkeypatch.setenv(FREE_BYTES_ENV, str(need))  # exactly enough
    CheckpointManager(tmp_path).save(2, _big_state(2))
    _assert_holds(mgr, mgr.latest(), _big_state(2))
    monkeypatch.setenv(FREE_BYTES_ENV, "12GB")
    with pytest.raises(ValueError, match=f"{FREE_BYTES_ENV}='12GB': expected a whole number of bytes"):
        CheckpointManager(tmp_path)


class _FullAfter:
    """A stream that takes ``left[0]`` more bytes, then fails like a full disk (ENOSPC) part-way."""

    def __init__(self, stream, left):
        self.stream, self.left = stream, left

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self.left[0]:
            self.stream.write(memoryview(data).cast("B")[: self.left[0]])
            self.left[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left[0] -= n
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _writer_on_a_disk_of(budget):
    left = [budget]  # shared by every file of the save

    class Disk(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path, mode):
            with super().create_stream(path, mode) as stream:
                yield _FullAfter(stream, left) if "w" in mode else stream

    class Writer(FileSystemWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.fs = Disk()

    return Writer


@pytest.mark.parametrize("where", ["data", "metadata"])
def test_disk_full_during_the_write_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, where):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _big_state(1))
    data = sum(f.stat().st_size for f in mgr.path(1).glob("*.distcp"))
    budget = data // 3 if where == "data" else data + 16  # the same tensors' data fit, their .metadata not
    monkeypatch.setattr(checkpoint_module, "FileSystemWriter", _writer_on_a_disk_of(budget))
    with pytest.raises(CheckpointSaveError) as info:
        mgr.save(2, _big_state(2))
    msg = str(info.value)
    assert f"could not be written to {tmp_path / '.tmp-step-00000002'}" in msg and "bytes free there now" in msg
    if where == "metadata":  # the OS error itself reaches us
        assert info.value.errno == errno.ENOSPC and "The filesystem is full" in msg, msg
    else:  # torch.save swallows it and reports a position mismatch instead (the error users met)
        assert "unexpected pos" in msg and "most often a full filesystem" in msg, msg
    assert sorted(os.listdir(tmp_path)) == ["step-00000001"]
    _assert_holds(mgr, mgr.latest(), _big_state(1))
    monkeypatch.undo()
    mgr.save(2, _big_state(2))
    _assert_holds(mgr, mgr.latest(), _big_state(2))


def _agreement_worker(rank, world, root):
    import resource
    import signal

    import torch.distributed as dist

    def state(value):  # one replicated key, one per rank: 400 kB each
        return {"shared": torch.full((100_000,), value), f"expert.{rank}": torch.full((100_000,), value + rank)}

    def attempt(name, fn):
        try:
            fn()
            out[name] = "saved"
        except (CheckpointSaveError, TypeError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
        dist.barrier()  # every rank has cleaned up before anyone looks
        out[name + " left"] = sorted(os.listdir(root))

    out = {}
    mgr = CheckpointManager(root)
    mgr.save(1, state(1.0))
    progress("no space anywhere")
    attempt("sizes", lambda: CheckpointManager(root, free_bytes=1).save(2, state(2.0)))
    progress("no space on rank 1")
    attempt("rank 1 full", lambda: CheckpointManager(root, free_bytes=1000 if rank else None).save(2, state(2.0)))
    progress("rank 1 holds a non-tensor")
    attempt("bad state", lambda: mgr.save(2, {**state(2.0), **({"note": "text"} if rank else {})}))
    progress("rank 1 over its file size limit")
    # A real kernel error part-way through rank 1's shard (EFBIG): its file may not exceed 200 kB.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        attempt("write error", lambda: mgr.save(2, state(2.0)))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    target = {k: torch.zeros_like(v) for k, v in state(0.0).items()}
    mgr.load(mgr.latest(), target)
    out["loaded"] = {k: v.unique().tolist() for k, v in target.items()}
    progress("a save that fits")
    attempt("next", lambda: mgr.save(3, state(3.0)))
    return out


def test_ranks_agree_on_space_and_failures_before_and_during_the_write(tmp_path):
    results = run_workers(_agreement_worker, 2, str(tmp_path), timeout=180)
    for rank, out in enumerate(results):
        for name in ("sizes", "rank 1 full", "bad state", "write error"):
            assert out[name + " left"] == ["step-00000001"], (rank, name, out)  # nothing of step 2 remains
        # the replicated key is counted once, every rank's own keys are counted
        need = _needed(out["sizes"]) - 2 * checkpoint_module._RANK_MARGIN
        assert 3 * 400_000 <= need < 4 * 400_000, out["sizes"]
        assert "1,000 bytes" in out["rank 1 full"] and "as rank 1 sees it" in out["rank 1 full"], out
        assert str(tmp_path / ".tmp-step-00000002") in out["write error"], out
        assert "rank 1:" in out["write error"] and "CheckpointSaveError" in out["write error"], out
        assert out["loaded"] == {"shared": [1.0], f"expert.{rank}": [1.0 + rank]}
        assert out["next"] == "saved" and out["next left"] == ["step-00000001", "step-00000003"]
    assert results[1]["bad state"].startswith("TypeError:") and "'note'" in results[1]["bad state"]
    assert "rank(s) [1] could not take part" in results[0]["bad state"], results[0]


def _nccl_worker(rank, world, root):
    # On NCCL the manager's agreements run on CUDA tensors; the state lives on the GPU.
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)

    def state(value):
        return {"shared": torch.full((1000,), value, device=dev),
                f"expert.{rank}": torch.full((10,), value + rank, device=dev, dtype=torch.bfloat16)}

    mgr = CheckpointManager(root)
    mgr.save(1, state(1.0))
    try:
        CheckpointManager(root, free_bytes=1 if rank else None).save(2, state(2.0))
        refused = "saved"
    except CheckpointSaveError as exc:
        refused = str(exc)
    target = {k: torch.zeros_like(v) for k, v in state(0.0).items()}
    try:
        mgr.load(mgr.latest(), {**target, **({"extra": torch.zeros(1, device=dev)} if rank else {})})
        mismatch = "loaded"
    except ValueError as exc:
        mismatch = str(exc)
    mgr.load(mgr.latest(), target)
    return refused, mismatch, {k: v.float().unique().tolist() for k, v in target.items()}, os.listdir(root)


@pytest.mark.multigpu
def test_agreements_and_load_over_nccl(tmp_path):
    results = run_workers(_nccl_worker, 2, str(tmp_path), backend="nccl", timeout=300)
    for rank, (refused, mismatch, loaded, left) in enumerate(results):
        assert "1 bytes" in refused and "as rank 1 sees it" in refused, refused
        assert ("'extra' is not in the checkpoint" if rank else "another rank found it") in mismatch, mismatch
        assert loaded == {"shared": [1.0], f"expert.{rank}": [1.0 + rank]}
        assert left == ["step-00000001"]
