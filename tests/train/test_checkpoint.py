"""Checkpoints: round trip, atomic publication, pruning, refusal of foreign pickles, sharded on gloo."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from dualflow.train.checkpoint import CheckpointManager, UnsafeCheckpointError
from tests.dist import progress, run_workers


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"model.w": torch.randn(4, 5, generator=g), "optim.w.exp_avg": torch.randn(4, 5, generator=g).bfloat16(),
            "step": torch.tensor(seed, dtype=torch.int64), "rng.cpu": torch.get_rng_state()}


def _zeros_like(state):
    return {k: torch.zeros_like(v) for k, v in state.items()}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
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


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
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


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
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
    return {k: v.tolist() for k, v in target.items()}, [p.name for p in mgr.list()]


def test_sharded_save_and_load_on_gloo(tmp_path):
    results = run_workers(_sharded_worker, 4, str(tmp_path), timeout=120)
    for rank, (loaded, names) in enumerate(results):
        assert names == ["step-00000002"]
        assert loaded["shared"] == [2.0] * 3
        assert loaded[f"expert.{rank}"] == [[2.0 + rank * 0.5] * 2] * 2
        assert loaded[f"pair.{rank // 2}"] == [2.0 + rank // 2] * 4
