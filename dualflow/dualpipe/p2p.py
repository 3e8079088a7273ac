"""Point-to-point transport of one pipeline: self-describing messages, non-blocking, stall-aware.

- Every tensor travels as its bytes (a flat uint8 view), so any dtype crosses any backend: gloo cannot
  send FP8 or bool, and NCCL needs no per-dtype support.
- Shapes, dtypes and ``requires_grad`` of an activation message travel in a small header sent before the
  first message of each activation stream (one producing stage) in every step; the receiver decodes it
  once and posts the stream's later receives with the cached layout (the runtime checks, on the sender,
  that they match it). Gradient messages need no header: they are gradients of tensors the receiver
  produced.
- Receives are posted early and waited on just before use; sends never block compute. On CUDA the
  operations are issued from the transport's own stream.
- Every host-side wait has a deadline; when it passes, :class:`PipelineStallError` reports what this
  rank was doing and which messages were still pending.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dualflow.dualpipe.comms import Message

_DTYPES: tuple[torch.dtype, ...] = tuple(d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128,
    *(getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                        "float8_e8m0fnu", "uint16", "uint32", "uint64")),
) if d is not None)
HEADER_INTS = 256


class PipelineStallError(RuntimeError):
    """A pipeline step made no progress within its timeout (a peer died, or the ranks disagree)."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        return cls(tuple(t.shape), t.dtype, t.requires_grad)

    def __str__(self) -> str:
        return f"{self.shape} {str(self.dtype).removeprefix('torch.')}{' requiring grad' if self.requires_grad else ''}"


def encode_header(specs: Sequence[TensorSpec]) -> list[int]:
    ints = [len(specs)]
    for s in specs:
        if s.dtype not in _DTYPES:
            raise TypeError(f"a pipeline stage output has dtype {s.dtype}, which the transport cannot describe; "
                            f"supported: {', '.join(str(d) for d in _DTYPES)}")
        ints += [_DTYPES.index(s.dtype), int(s.requires_grad), len(s.shape), *s.shape]
    if len(ints) > HEADER_INTS:
        raise ValueError(f"a stage's outputs need a {len(ints)}-integer description; the header holds {HEADER_INTS} "
                         "(return fewer tensors or fewer dimensions)")
    return ints + [0] * (HEADER_INTS - len(ints))


def decode_header(ints: Sequence[int]) -> tuple[TensorSpec, ...]:
    n, i, out = ints[0], 1, []
    for _ in range(n):
        dtype, rg, ndim = _DTYPES[ints[i]], bool(ints[i + 1]), ints[i + 2]
        out.append(TensorSpec(tuple(ints[i + 3:i + 3 + ndim]), dtype, rg))
        i += 3 + ndim
    return tuple(out)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as a flat uint8 tensor (a view when ``t`` is contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@dataclass
class _Recv:
    message: Message
    specs: tuple[TensorSpec, ...]
    works: list
    buffers: list[torch.Tensor]


class Transport:
    """Sends and receives of one pipeline rank over ``group``; ``peers[p]`` is pipeline rank p's global rank."""

    def __init__(self, group: dist.ProcessGroup, peers: Sequence[int], device: torch.device, timeout: float,
                 describe: Callable[[], str]) -> None:
        self.group = group
        self.peers = list(peers)
        self.device = device
        self.timeout = timeout
        self.describe = describe  # what this rank is doing, for stall reports
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.sends: list[tuple[object, torch.Tensor, Message]] = []
        self.recvs: dict[tuple, _Recv] = {}
        self.deadline = float("inf")
        self.in_flight = False  # an operation was issued since the last finish() that completed cleanly

    # ---- host-side waiting with a deadline -----------------------------------------------------
    def progress(self) -> None:
        """Call at the start of a step and after useful work: the stall deadline counts from the last progress."""
        self.deadline = time.monotonic() + self.timeout

    def _host_wait(self, work, what: str) -> None:
        if self.stream is None:
            remaining = self.deadline - time.monotonic()
            try:
                if remaining <= 0 or not work.wait(timedelta(seconds=remaining)):
                    raise PipelineStallError(self.stall_report(what))
            except RuntimeError as exc:  # gloo raises on timeout and when a peer is gone
                if isinstance(exc, PipelineStallError):
                    raise
                cause = None if "Timed out" in str(exc) else f"{type(exc).__name__}: {exc}"
                raise PipelineStallError(self.stall_report(what, cause)) from None
            return
        delay = 1e-5
        while not work.is_completed():
            if time.monotonic() > self.deadline:
                raise PipelineStallError(self.stall_report(what))
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)
        work.wait()

    def stall_report(self, what: str, cause: str | None = None) -> str:
        def listing(items: list[str]) -> str:
            more = f" and {len(items) - 6} more" if len(items) > 6 else ""
            return ", ".join(items[:6]) + more if items else "none"

        recvs = [f"{r.message.kind}{r.message.stage}.{r.message.microbatch} from rank {r.message.src}"
                 for r in self.recvs.values()]
        sends = list(dict.fromkeys(f"{m.kind}{m.stage}.{m.microbatch} to rank {m.dst}" for _, _, m in self.sends))
        head = f"no progress for {self.timeout:g} s" if cause is None else f"communication failed ({cause.strip()})"
        return (f"{head}: {self.describe()}; waiting for {what}; "
                f"receives posted and not yet used: {listing(recvs)}; sends not yet confirmed: {listing(sends)}")

    # ---- sends -------------------------------------------------------------------------------------
    def _issue(self, op, t: torch.Tensor, peer: int):
        self.in_flight = True
        if self.stream is None:
            return op(t, self.peers[peer], group=self.group)
        with torch.cuda.stream(self.stream):
            return op(t, self.peers[peer], group=self.group)

    def send(self, message: Message, tensors: Sequence[torch.Tensor], header: bool) -> None:
        """Send ``tensors`` (with their description first when ``header``); returns without waiting."""
        payload = []
        if header:
            ints = encode_header([TensorSpec.of(t) for t in tensors])
            payload.append(as_bytes(torch.tensor(ints, dtype=torch.int64, device=self.device)))
        payload += [as_bytes(t) for t in tensors if t.numel()]
        if self.stream is not None:  # after the producing kernels and the copies above
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        for buf in payload:
            self.sends.append((self._issue(dist.isend, buf, message.dst), buf, message))
        self._reap()

    def _reap(self, keep: int = 16) -> None:
        """Release the buffers of old sends. On CUDA only completed ones; gloo reports a send complete only
        once waited for, so the oldest are waited for (they were posted for long ago: the receiver posts in
        the same global order, so this cannot wait on anything this rank still has to do)."""
        if len(self.sends) <= 2 * keep:
            return
        if self.stream is not None:
            for work, _, _ in self.sends:
                if work.is_completed():
                    work.wait()
            self.sends = [s for s in self.sends if not s[0].is_completed()]
            return
        old, self.sends = self.sends[:-keep], self.sends[-keep:]
        for work, _, m in old:
            self._host_wait(work, f"the send of {m.kind}{m.stage}.{m.microbatch} to rank {m.dst} to complete")

    def pending(self) -> bool:
        """Whether an operation issued since the last clean :meth:`finish` may still be in flight."""
        return self.in_flight

    def finish(self) -> None:
        """Wait until every send of the step has completed."""
        for work, _, m in self.sends:
            self._host_wait(work, f"the send of {m.kind}{m.stage}.{m.microbatch} to rank {m.dst} to complete")
        self.sends.clear()
        if self.recvs:
            left = ", ".join(f"{m.kind}{m.stage}.{m.microbatch}" for m in (r.message for r in self.recvs.values()))
            self.recvs.clear()
            raise RuntimeError(f"pipeline step ended with received but unused messages: {left}")
        self.in_flight = False

    # ---- receives ----------------------------------------------------------------------------------
    def post(self, message: Message, specs: tuple[TensorSpec, ...] | None) -> tuple[TensorSpec, ...]:
        """Post the receive of ``message``; with ``specs`` None its header is received first (waiting for it).

        Returns the message's tensor specs.
        """
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if specs is None:
            head = torch.empty(HEADER_INTS, dtype=torch.int64, device=self.device)
            self._host_wait(self._issue(dist.irecv, as_bytes(head), message.src),
                            f"the description of {message.kind}{message.stage}.{message.microbatch} "
                            f"from rank {message.src}")
            specs = decode_header(head.tolist())
        buffers, works = [], []
        for spec in specs:
            buf = self._empty(spec)
            buffers.append(buf)
            if spec.nbytes:
                works.append(self._issue(dist.irecv, buf.view(-1).view(torch.uint8), message.src))
        self.recvs[message[:3]] = _Recv(message, specs, works, buffers)
        return specs

    def _empty(self, spec: TensorSpec) -> torch.Tensor:
        """A tensor of ``spec``'s shape and dtype to receive into (its bytes are the receive buffer)."""
        if self.stream is None:
            return torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
        with torch.cuda.stream(self.stream):
            return torch.empty(spec.shape, dtype=spec.dtype, device=self.device)

    def take(self, message: Message) -> list[torch.Tensor]:
        """The tensors of a posted message, once they have arrived (on CUDA: once compute may use them)."""
        r = self.recvs.pop(message[:3])
        for work in r.works:
            if self.stream is None:
                self._host_wait(work, f"{message.kind}{message.stage}.{message.microbatch} from rank {message.src}")
            else:
                work.wait()  # the compute stream waits for the transfer; the host does not
        if self.stream is not None:
            for buf in r.buffers:
                buf.record_stream(torch.cuda.current_stream(self.device))
        return r.buffers
