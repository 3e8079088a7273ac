"""Deferred results of communication: :class:`Pending` inside the library, :class:`CommWork` for users."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")
U = TypeVar("U")
_UNSET = object()


class Pending(Generic[T]):
    """A value that exists after :meth:`wait`: torch ``Work`` objects to finish, then a function producing it.

    On CUDA every step is stream-ordered, so ``wait`` only enqueues work; with gloo the collectives run
    on gloo's threads and ``wait`` blocks until they are done.
    """

    def __init__(self, works: Sequence[Any] = (), produce: Callable[[], T] | None = None, value: Any = None) -> None:
        self._works = [w for w in works if w is not None]
        self._produce = produce
        self._value: Any = _UNSET if produce is not None else value

    def wait(self) -> T:
        if self._value is _UNSET:
            for w in self._works:
                w.wait()
            self._value = self._produce()  # type: ignore[misc]
        return self._value

    def then(self, fn: Callable[[T], U]) -> Pending[U]:
        """A pending value computed by ``fn`` from this one's."""
        return Pending(produce=lambda: fn(self.wait()))


class CommWork:
    """Returned by ``dispatch``/``combine`` with ``async_op=True``: call :meth:`wait` before using the outputs.

    On CUDA the communication ran on the buffer's own stream; ``wait`` makes the caller's current stream
    wait for it (the host does not block). On the CPU (gloo), ``wait`` blocks until the data is there.
    """

    def __init__(self, pending: Pending | None = None, event: torch.cuda.Event | None = None,
                 outputs: Sequence[torch.Tensor] = (), device: torch.device | None = None) -> None:
        self._pending = pending
        self._event = event
        self._device = device
        self._outputs = list(outputs)
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        if self._pending is not None:
            self._pending.wait()
        if self._event is not None:
            stream = torch.cuda.current_stream(self._device)
            stream.wait_event(self._event)
            for t in self._outputs:  # allocated on the communication stream, now used on this one
                t.record_stream(stream)
        self._done = True

    def is_completed(self) -> bool:
        """Whether :meth:`wait` has run (on CUDA the GPU may still be working; the caller's stream is ordered)."""
        return self._done
