"""Atomic file replacement: the helper, and config.toml written through it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from dualflow.launcher.config import load_config, save_config
from dualflow.utils import files
from dualflow.utils.files import atomic_write_text


def test_written_whole_flushed_before_the_rename_with_the_usual_permissions(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(files.os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    old_mask = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "new" / "dir" / "f.txt", "first ünïcode line\n")
    finally:
        os.umask(old_mask)
    assert path.read_text(encoding="utf-8") == "first ünïcode line\n"
    assert events[:2] == ["fsync", "replace"]  # the data is on disk before the name points at it
    assert path.stat().st_mode & 0o777 == 0o640  # 0o666 through the umask, as open() would give
    atomic_write_text(path, "second")
    assert path.read_text() == "second" and os.listdir(path.parent) == ["f.txt"]


def test_a_failure_before_the_rename_leaves_the_old_file_and_no_debris(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old contents\n")

    def replace_fails(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", replace_fails)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new contents that never land\n")
    assert path.read_text() == "old contents\n" and os.listdir(tmp_path) == ["f.txt"]


@dataclass(frozen=True)
class _Inner:
    lr: float = 3e-4


@dataclass(frozen=True)
class _Job:
    steps: int = 10
    name: str = "a"
    inner: _Inner = field(default_factory=_Inner)


def test_config_toml_is_replaced_atomically(tmp_path, monkeypatch):
    path = save_config(_Job(steps=7, name="first"), tmp_path / "run" / "config.toml")
    before = path.read_bytes()
    assert load_config(_Job, path) == _Job(steps=7, name="first")
    monkeypatch.setattr(files.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        save_config(_Job(steps=9, name="second" * 100), path)
    assert path.read_bytes() == before and os.listdir(path.parent) == ["config.toml"]
    monkeypatch.undo()
    save_config(_Job(steps=9, inner=_Inner(lr=1e-3)), path)
    assert load_config(_Job, path) == _Job(steps=9, inner=_Inner(lr=1e-3))
