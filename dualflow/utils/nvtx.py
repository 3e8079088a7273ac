"""NVTX ranges for profilers (Nsight Systems, torch.profiler), off by default.

Switch them on with ``DUALFLOW_NVTX=1`` in the environment or :func:`set_enabled`. When off, a range
costs one boolean test; when the ``nvtx`` package is missing, ranges stay no-ops (a single warning is
logged if they were asked for) and nothing ever raises at import time.

    with nvtx.range("dispatch"):
        ...

    @nvtx.annotate("fp8_gemm")
    def fp8_gemm(...): ...
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

_F = TypeVar("_F", bound=Callable)
_DOMAIN = "dualflow"
_log = logging.getLogger(__name__)


class _State:
    # The switch is the only state here: a profiling toggle must be settable from anywhere in the
    # process, exactly like torch.autograd.profiler's.
    enabled = os.environ.get("DUALFLOW_NVTX", "0").lower() in ("1", "true", "on", "yes")
    backend = None  # the nvtx module once imported, False when unavailable


def _backend():
    if _State.backend is None:
        try:
            import nvtx as _nvtx

            _State.backend = _nvtx
        except Exception as exc:  # a broken install must not break training
            _log.warning("NVTX ranges requested but the nvtx package is unusable (%s); ranges are off", exc)
            _State.backend = False
    return _State.backend


def enabled() -> bool:
    """Whether ranges are emitted."""
    return _State.enabled and bool(_backend())


def set_enabled(flag: bool) -> None:
    """Turn NVTX ranges on or off for this process."""
    _State.enabled = bool(flag)


@contextlib.contextmanager
def _push_pop(name: str, color: str | None) -> Iterator[None]:
    mod = _backend()
    mod.push_range(message=name, color=color, domain=_DOMAIN)
    try:
        yield
    finally:
        mod.pop_range(domain=_DOMAIN)


def range(name: str, color: str | None = None) -> contextlib.AbstractContextManager:
    """Context manager marking ``name`` on the profiler timeline (a null context when off)."""
    if not _State.enabled or not _backend():
        return contextlib.nullcontext()
    return _push_pop(name, color)


def annotate(name: str | None = None, color: str | None = None) -> Callable[[_F], _F]:
    """Decorator form of :func:`range`; the range is named after the function unless ``name`` is given."""

    def wrap(fn: _F) -> _F:
        label = name or fn.__qualname__

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if not _State.enabled:
                return fn(*args, **kwargs)
            with range(label, color):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap
