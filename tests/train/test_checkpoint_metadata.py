"""A checkpoint's .metadata cannot run code: exact allow-list, read once, refused end to end by `--resume`.

Each gadget below is first shown to do its harm under plain ``pickle.loads`` (it writes a marker file),
so that its refusal is a refusal of something real.
"""

from __future__ import annotations

import io
import pickle
import shlex
import struct

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from dualflow.train.checkpoint import CheckpointManager, UnsafeCheckpointError, read_metadata
from dualflow.train.checkpoint_metadata import ALLOWED, DTYPES

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
FILESYSTEM = "torch.distributed.checkpoint.filesystem"  # an allowed module: _StorageInfo lives there


def _str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + b"\x93"  # STACK_GLOBAL: protocol 4 resolves a dotted name


def _call(module: str, name: str, *args: str) -> bytes:
    """A protocol-4 pickle of ``module.name(*args)``."""
    return b"\x80\x04" + _global(module, name) + b"(" + b"".join(_str(a) for a in args) + b"tR."  # MARK..TUPLE REDUCE


def _dotted_method(marker) -> bytes:
    # pathlib.Path.write_text(Path(marker), "x") with both globals reached through the allowed module
    return (b"\x80\x04" + _global(FILESYSTEM, "Path.write_text") + b"(" + _global(FILESYSTEM, "Path") + b"("
            + _str(str(marker)) + b"tR" + _str("x") + b"tR.")


def _cases(marker) -> dict[str, bytes]:
    m = str(marker)
    return {
        "dotted name to os.system": _call(FILESYSTEM, "os.system", f"touch {shlex.quote(m)}"),
        "dotted name to a method": _dotted_method(marker),
        "module attribute that is a function": _call("torch.serialization", "save", "payload", m),
        "class outside the list": _call("logging", "FileHandler", m),
    }


@pytest.mark.parametrize("case", ["dotted name to os.system", "dotted name to a method",
                                  "module attribute that is a function", "class outside the list"])
def test_gadgets_are_refused_and_never_run(tmp_path, case):
    marker = tmp_path / "marker"
    payload = _cases(marker)[case]
    pickle.loads(payload)  # the gadget is real: plain pickle runs it
    assert marker.exists(), case
    marker.unlink()
    mgr = CheckpointManager(tmp_path / "ck")
    mgr.save(1, {"a": torch.ones(2)})
    meta = mgr.latest() / ".metadata"
    original = meta.read_bytes()
    meta.write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load it"):
        read_metadata(mgr.latest())
    with pytest.raises(UnsafeCheckpointError, match="refusing to load it"):
        mgr.load(mgr.latest(), {"a": torch.zeros(2)})
    assert not marker.exists()
    meta.write_bytes(original)  # the genuine metadata still loads
    target = {"a": torch.zeros(2)}
    mgr.load(mgr.latest(), target)
    assert torch.equal(target["a"], torch.ones(2))


@pytest.mark.parametrize("module,name", [("torch", "load"), ("torch", "nn"), ("torch", "strided"),
                                         (f"{FILESYSTEM}", "FileSystemReader"),
                                         ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
                                         ("torch.distributed.checkpoint.metadata", "Metadata.__init__"),
                                         ("builtins", "getattr"), ("pathlib", "Path")])
def test_names_outside_the_list_are_refused(tmp_path, module, name):
    (tmp_path / ".metadata").write_bytes(b"\x80\x04" + _global(module, name) + b".")
    with pytest.raises(UnsafeCheckpointError, match=rf"references {module}\.{name},"):
        read_metadata(tmp_path)


class _Recorder(pickle.Unpickler):
    """Plain unpickling (of a file this test wrote itself) that records every global it resolves."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.seen: set[tuple[str, str]] = set()

    def find_class(self, module, name):
        self.seen.add((module, name))
        return super().find_class(module, name)


def test_allow_list_is_exactly_what_this_torch_writes(tmp_path):
    # Every storable dtype, several ranks of tensor, an empty one and a non-contiguous view: the metadata
    # of real checkpoints references exactly the allow-list (PosixPath under one of its two module names).
    g = torch.Generator().manual_seed(0)
    state = {f"t.{name}": (torch.randn(3, 5, generator=g) * 4).to(getattr(torch, name)) for name in DTYPES}
    state.update({"scalar": torch.tensor(7, dtype=torch.int64), "empty": torch.empty(0, 3),
                  "view": torch.randn(6, 4, generator=g).t(), "rng": torch.get_rng_state()})
    dcp.save(state, storage_writer=FileSystemWriter(tmp_path))
    recorder = _Recorder((tmp_path / ".metadata").read_bytes())
    recorder.load()
    paths = {("pathlib", "PosixPath"), ("pathlib._local", "PosixPath")}
    assert recorder.seen - ALLOWED == set()
    assert ALLOWED - recorder.seen == paths - recorder.seen and len(paths & recorder.seen) == 1
    meta = read_metadata(tmp_path)  # and the restricted reader reads it back whole
    assert {k: tuple(v.size) for k, v in meta.state_dict_metadata.items()} == {k: tuple(v.shape)
                                                                              for k, v in state.items()}
    assert {k: v.properties.dtype for k, v in meta.state_dict_metadata.items()} == {k: v.dtype
                                                                                   for k, v in state.items()}


def test_metadata_is_read_once_and_dcp_never_unpickles_it(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    state = {"w": torch.randn(4, 3), "b": torch.randn(3).bfloat16(), "n": torch.tensor(5)}
    mgr.save(1, state)
    reads = []
    real_loads, real_load = pickle.loads, pickle.load
    monkeypatch.setattr(pickle, "load", lambda *a, **k: reads.append("pickle.load") or real_load(*a, **k))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: reads.append("pickle.loads") or real_loads(*a, **k))
    opened = []
    real_read_bytes = type(tmp_path).read_bytes
    monkeypatch.setattr(type(tmp_path), "read_bytes",
                        lambda self: opened.append(self.name) or real_read_bytes(self))
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    mgr.load(mgr.latest(), target)
    assert reads == [] and opened.count(".metadata") == 1
    assert all(torch.equal(target[k], v) for k, v in state.items())
    with pytest.raises(TypeError, match=r"complex64"):  # a dtype outside the list is never written
        mgr.save(2, {"z": torch.zeros(2, dtype=torch.complex64)})
    assert [p.name for p in mgr.list()] == ["step-00000001"]


def test_resume_of_a_tampered_run_refuses_cleanly(tmp_path, capsys, monkeypatch):
    # `dualflow train --resume` (the path a torchelastic restart takes too) on a run whose newest
    # checkpoint's .metadata was replaced by the dotted-name gadget.
    from dualflow.cli import main
    from dualflow.launcher.config import save_config
    from tests.train.helpers import tiny

    monkeypatch.chdir(tmp_path)
    path = save_config(tiny(tmp_path / "run", train=dict(steps=2)), tmp_path / "job.toml")
    assert main(["train", str(path)]) == 0
    latest = CheckpointManager(tmp_path / "run" / "checkpoints").latest()
    assert latest.name == "step-00000002"
    marker = tmp_path / "marker"
    (latest / ".metadata").write_bytes(_call(FILESYSTEM, "os.system", f"touch {shlex.quote(str(marker))}"))
    capsys.readouterr()
    assert main(["train", str(path), "--train.steps=3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{FILESYSTEM}.os.system" in err and "refusing to load it" in err, err
    assert not marker.exists()
    assert "Traceback" not in err
