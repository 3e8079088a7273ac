import contextlib

import pytest

from dualflow.utils import nvtx


class _Recorder:
    def __init__(self):
        self.events = []

    def push_range(self, message, color=None, domain=None):
        self.events.append(("push", message, domain))

    def pop_range(self, domain=None):
        self.events.append(("pop", domain))


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(nvtx._State, "backend", rec)
    monkeypatch.setattr(nvtx._State, "enabled", False)
    return rec


def test_off_by_default_is_a_null_context(recorder):
    assert isinstance(nvtx.range("x"), contextlib.nullcontext)

    @nvtx.annotate()
    def f(a):
        return a + 1

    assert f(1) == 2
    assert recorder.events == []


def test_ranges_nest_and_pop_on_exceptions(recorder):
    nvtx.set_enabled(True)

    @nvtx.annotate("outer")
    def outer():
        with nvtx.range("inner"):
            raise ValueError("boom")

    with pytest.raises(ValueError):
        outer()
    assert recorder.events == [("push", "outer", "dualflow"), ("push", "inner", "dualflow"),
                               ("pop", "dualflow"), ("pop", "dualflow")]


def test_real_nvtx_package_works_without_gpu(monkeypatch):
    monkeypatch.setattr(nvtx._State, "backend", None)
    monkeypatch.setattr(nvtx._State, "enabled", True)
    with nvtx.range("real"):
        pass
    assert nvtx.enabled()


def test_missing_package_degrades_to_no_ops(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_nvtx(name, *a, **k):
        if name == "nvtx":
            raise ImportError("no nvtx here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_nvtx)
    monkeypatch.setattr(nvtx._State, "backend", None)
    monkeypatch.setattr(nvtx._State, "enabled", True)
    assert isinstance(nvtx.range("x"), contextlib.nullcontext)
    assert not nvtx.enabled()
