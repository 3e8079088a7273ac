"""The ``kernels`` backend: SM-pinned NVLink dispatch/combine kernels of libdualflow_cuda (csrc/comm).

One buffer per rank, mapped by every peer of the node through PyTorch's symmetric memory (CUDA IPC
handles exchanged over the process group where symmetric memory is unavailable). NVLink multicast is
never used: ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and ``NCCL_NVLS_ENABLE=0`` are enforced before any
mapping is made. Every dispatch and combine runs on exactly ``num_sms`` thread blocks (``num_sms / 2``
channels of a sender and a receiver block). docs/comm_kernels.md describes the protocol.

Ranks may also be processes sharing one GPU (``shared``, see :mod:`dualflow.comm.shared_gpu`): the group
is gloo, the buffers are always mapped by CUDA IPC, and the same kernels run.

Kernel launches of one buffer are ordered across streams (each waits for the previous one), because
they share the rings' running counters.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import socket
import warnings
import weakref

import torch
import torch.distributed as dist

from dualflow import _cuda
from dualflow.comm import peers, shared_gpu
from dualflow.comm.layout import DispatchLayout
from dualflow.comm.work import Pending
from dualflow.utils.logging import get_logger

MAX_RANKS = 8
MAX_TOPK = 32
MAX_LOCAL_EXPERTS = 512
MAX_FIELDS = 4
ERROR_WORDS = 8
PHASES = {1: "notify (waiting for the peer's counts)", 2: "dispatch send (waiting for free slots in the peer's ring)",
          3: "dispatch receive (waiting for rows from the peer)", 4: "combine send (waiting for free slots)",
          5: "combine receive (waiting for rows from the peer)"}
_NO_MULTICAST = {"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0"}
_log = get_logger("dualflow.comm")


class CommTimeoutError(RuntimeError):
    """A kernel waited longer than its bound for a peer; the message names the rank, channel and peer."""


class Sizing(ctypes.Structure):
    """Mirror of ``dualflow_comm_sizing`` (csrc/comm/comm_api.h); a test checks the sizes agree."""

    _fields_ = [(name, ctypes.c_int32) for name in ("num_ranks", "num_channels", "num_slots", "topk")] + [
        (name, ctypes.c_int64) for name in ("hidden", "max_tokens", "row_bytes", "slot_bytes", "flags_offset",
                                            "counts_offset", "tails_offset", "heads_offset", "progress_offset",
                                            "error_offset", "rings_offset", "total_bytes")]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Options of the ``kernels`` backend.

    - ``fp8``: size the rings for FP8 dispatch payloads and BF16 rows otherwise (half the memory);
      False allows BF16 and FP32 rows.
    - ``timeout_s``: bound of every wait of a kernel for a peer; past it the kernel stops and the host
      raises :class:`CommTimeoutError`.
    - ``max_topk``: most experts per token the rings have room for (at most 32).
    - ``max_buffer_bytes``: refuse configurations needing more memory per rank (None: the free memory).
    """

    fp8: bool = False
    max_topk: int = 8
    timeout_s: float = 60.0
    max_buffer_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"KernelConfig.timeout_s must be > 0, got {self.timeout_s}")
        if not 1 <= self.max_topk <= MAX_TOPK:
            raise ValueError(f"KernelConfig.max_topk must be in [1, {MAX_TOPK}], got {self.max_topk}")


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = _cuda.load()
    c, i64, ptr = ctypes, ctypes.c_int64, ctypes.c_size_t
    sz, ptrs = c.POINTER(Sizing), c.POINTER(c.c_size_t)
    lib.dualflow_comm_sizing_bytes.argtypes = [c.POINTER(i64)]
    lib.dualflow_comm_buffer_size.argtypes = [i64, i64, c.c_int, c.c_int, c.c_int, c.c_int, i64, sz]
    lib.dualflow_comm_channel_range.argtypes = [i64, c.c_int, c.c_int, c.POINTER(i64), c.POINTER(i64)]
    lib.dualflow_comm_layout_host.argtypes = [ptr, i64, c.c_int, i64, c.c_int, c.c_int, ptr, ptr, ptr, ptr, ptr]
    lib.dualflow_comm_recv_prefix_host.argtypes = [ptr, c.c_int, c.c_int, ptr]
    lib.dualflow_comm_alloc_mapped.argtypes = [c.c_size_t, ptrs, ptrs]
    lib.dualflow_comm_free_mapped.argtypes = [ptr]
    lib.dualflow_comm_ipc_alloc.argtypes = [c.c_size_t, ptrs, ptr]
    lib.dualflow_comm_ipc_open.argtypes = [ptr, ptrs]
    lib.dualflow_comm_ipc_close.argtypes = [ptr]
    lib.dualflow_comm_free.argtypes = [ptr]
    lib.dualflow_comm_device_sharing.argtypes = [c.c_int, ptr]
    lib.dualflow_comm_notify.argtypes = [sz, ptrs, c.c_int, ptr, ptr, i64, c.c_int, i64, c.c_uint64, ptr, ptr,
                                         c.c_uint64, ptr, ptr]
    lib.dualflow_comm_dispatch.argtypes = [sz, ptrs, c.c_int, i64, ptr, ptr, c.c_int, ptrs, ptrs, c.POINTER(i64),
                                           ptr, c.c_int, i64, ptr, ptr, ptr, c.c_uint64, ptr, ptr]
    lib.dualflow_comm_combine.argtypes = [sz, ptrs, c.c_int, i64, ptr, ptr, ptr, i64, c.c_int, ptr, c.c_int, ptr,
                                          ptr, c.c_uint64, ptr, ptr]
    return lib


def _call(name: str, *args) -> None:
    _lib()
    _cuda.call(name, *args)


def _array(ctype, values) -> ctypes.Array:
    return (ctype * max(len(values), 1))(*values)


def buffer_size(hidden: int, max_tokens: int, topk: int, num_ranks: int, num_sms: int, fp8: bool,
                max_bytes: int = 0) -> Sizing:
    """Geometry and bytes per rank of the kernels' buffer; ``ValueError`` saying why when it cannot fit."""
    out = Sizing()
    try:
        _call("dualflow_comm_buffer_size", hidden, max_tokens, topk, num_ranks, num_sms, int(fp8), max_bytes,
              ctypes.byref(out))
    except _cuda.CudaLibraryError as exc:
        raise ValueError(str(exc).split(": ", 1)[-1]) from None
    return out


def channel_range(num_tokens: int, num_channels: int, channel: int) -> tuple[int, int]:
    """Tokens ``[begin, end)`` of one channel, as the kernels partition them."""
    begin, end = ctypes.c_int64(), ctypes.c_int64()
    _call("dualflow_comm_channel_range", num_tokens, num_channels, channel, ctypes.byref(begin), ctypes.byref(end))
    return begin.value, end.value


def layout_host(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_channels: int) -> dict[str, torch.Tensor]:
    """The notify/dispatch kernels' routing arithmetic, run by the library on the CPU (see comm_api.h)."""
    idx = topk_idx.detach().to("cpu", torch.int64).contiguous()
    t, k = idx.shape
    out = {"num_tokens_per_rank": torch.empty(num_ranks, dtype=torch.int32),
           "num_tokens_per_expert": torch.empty(num_experts, dtype=torch.int32),
           "is_token_in_rank": torch.empty(t, num_ranks, dtype=torch.uint8),
           "channel_counts": torch.empty(num_ranks, num_channels, dtype=torch.int32),
           "send_pos": torch.empty(t, num_ranks, dtype=torch.int32)}
    _call("dualflow_comm_layout_host", idx.data_ptr(), t, k, num_experts, num_ranks, num_channels,
          *(v.data_ptr() for v in out.values()))
    return out


def recv_prefix_host(counts: torch.Tensor) -> torch.Tensor:
    """Receive prefix matrix [R*C + 1] from the counts [R_src, C] each source sends this rank."""
    counts = counts.to("cpu", torch.int32).contiguous()
    prefix = torch.empty(counts.numel() + 1, dtype=torch.int32)
    _call("dualflow_comm_recv_prefix_host", counts.data_ptr(), counts.shape[0], counts.shape[1], prefix.data_ptr())
    return prefix


def device_sharing(device: torch.device) -> shared_gpu.DeviceSharing:
    """How this process shares ``device``: its SMs, whether this process is an MPS client, the SMs it may use."""
    if device.type != "cuda":
        raise ValueError(f"how a GPU is shared can only be asked of a CUDA device, got {device}")
    out = (ctypes.c_int32 * 3)()
    _call("dualflow_comm_device_sharing", device.index if device.index is not None else torch.cuda.current_device(),
          ctypes.addressof(out))
    return shared_gpu.DeviceSharing(sms=out[0], mps=bool(out[1]), client_sms=out[2])


def forbid_multicast() -> None:
    """Make sure nothing maps NVLink multicast objects (they can take a shared host's GPUs out of service)."""
    for name, value in _NO_MULTICAST.items():
        if os.environ.get(name, value) != value:
            _log.warning("%s=%s overridden to %s: dualflow never uses NVLink multicast", name, os.environ[name], value)
        os.environ[name] = value


@dataclasses.dataclass(frozen=True, eq=False)
class KernelRoute:
    """Routing of one kernels dispatch: the receive prefix matrix and the positions combine reads back."""

    recv_prefix: torch.Tensor  # i32 [R*C + 1]
    send_pos: torch.Tensor  # i32 [T, R], -1 where a token does not go
    is_token_in_rank: torch.Tensor  # u8 [T, R]
    recv_counts: list[int]
    recv_src_idx: torch.Tensor  # i32 [N]: source token of each received row

    @property
    def num_recv(self) -> int:
        return sum(self.recv_counts)

    @property
    def num_tokens(self) -> int:
        return self.send_pos.shape[0]


class _PeerBuffers:
    """This rank's buffer and every peer's, mapped into this process: symmetric memory or CUDA IPC.

    ``exchange_device`` holds the tensors of the set-up collectives (the CPU for gloo groups); ``ipc_only``
    skips symmetric memory (ranks sharing one GPU over gloo). Every step that can fail on one rank only
    ends with :func:`peers.agree`, so a failure raises on every rank instead of leaving peers waiting.
    """

    def __init__(self, group: dist.ProcessGroup | None, nbytes: int, device: torch.device,
                 exchange_device: torch.device, ipc_only: bool) -> None:
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.group, self.device = group, device
        self._owned: int | None = None
        self._opened: list[int] = []
        usable = torch.tensor([int(not ipc_only and _symmetric_memory_usable())], device=exchange_device)
        dist.all_reduce(usable, op=dist.ReduceOp.MIN, group=group)  # every rank takes the same path
        if usable.item():
            from torch.distributed import _symmetric_memory as symm

            name = (group or dist.group.WORLD).group_name
            if hasattr(symm, "enable_symm_mem_for_group"):  # needed by torch < 2.10, deprecated later
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    symm.enable_symm_mem_for_group(name)
            self._tensor = symm.empty(nbytes, dtype=torch.uint8, device=device)
            handle = symm.rendezvous(self._tensor, name)
            offset = self._tensor.data_ptr() - handle.buffer_ptrs[handle.rank]
            self.ptrs = [p + offset for p in handle.buffer_ptrs]
            self._handle = handle
            self._tensor.zero_()
            self.mechanism = "symmetric memory"
        else:
            self.ptrs = self._map_ipc(nbytes)
            self.mechanism = "CUDA IPC"
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # no peer writes into a buffer before it is zeroed
        self._finalizer = weakref.finalize(self, _PeerBuffers._release, device, list(self._opened), self._owned)

    def _map_ipc(self, nbytes: int) -> list[int]:
        """Allocate this rank's buffer, exchange IPC handles, open the peers' (collective; fails together)."""
        ptr, raw = ctypes.c_size_t(), (ctypes.c_uint8 * peers.IPC_HANDLE_BYTES)()
        problem = None
        try:
            _call("dualflow_comm_ipc_alloc", nbytes, ctypes.byref(ptr), ctypes.addressof(raw))
            self._owned = ptr.value
        except _cuda.CudaLibraryError as exc:
            problem = f"allocating {nbytes} bytes: {exc}"
        try:
            peers.agree(self.group, "allocating the kernels' buffers", problem, error=RuntimeError)
            handles: list = [None] * self.size
            dist.all_gather_object(handles, bytes(raw), group=self.group)
            problem, ptrs = None, []
            try:
                ptrs, self._opened = peers.map_handles(handles, self.rank, self._owned, bytes(raw), _ipc_open,
                                                       _ipc_close)
            except (ValueError, _cuda.CudaLibraryError) as exc:
                problem = f"mapping the peers' buffers: {exc}"
            peers.agree(self.group, "mapping the kernels' buffers by CUDA IPC", problem, error=RuntimeError)
        except BaseException:
            _PeerBuffers._release(self.device, self._opened, self._owned)  # nothing ran on them yet
            raise
        _call("dualflow_fill_u32", self._owned, nbytes // 4, 0, torch.cuda.current_stream(self.device).cuda_stream)
        return ptrs

    def close(self) -> None:
        """Unmap the peers' buffers, wait until every rank has, free this rank's (collective; call it only
        once no rank's kernel uses the buffers). Exported memory freed while another process still maps
        it is undefined behaviour in CUDA, hence the barrier between the two steps."""
        self._finalizer.detach()
        _PeerBuffers._release(self.device, self._opened, None)
        dist.barrier(group=self.group)
        _PeerBuffers._release(self.device, [], self._owned)

    @staticmethod
    def _release(device: torch.device, opened: list[int], owned: int | None) -> None:
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(device)  # this rank's kernels still in flight use the mappings
        with contextlib.suppress(Exception):
            for p in opened:
                _call("dualflow_comm_ipc_close", p)
            if owned:
                _call("dualflow_comm_free", owned)


def _ipc_open(handle: bytes) -> int:
    opened = ctypes.c_size_t()
    _call("dualflow_comm_ipc_open", ctypes.addressof((ctypes.c_uint8 * len(handle)).from_buffer_copy(handle)),
          ctypes.byref(opened))
    return opened.value


def _ipc_close(ptr: int) -> None:
    _call("dualflow_comm_ipc_close", ptr)


class _MappedWords:
    """Pinned host int32 words mapped into the device (errors and totals the kernels publish)."""

    def __init__(self, count: int) -> None:
        host, dev = ctypes.c_size_t(), ctypes.c_size_t()
        _call("dualflow_comm_alloc_mapped", 4 * count, ctypes.byref(host), ctypes.byref(dev))
        self.device_ptr = dev.value
        self.words = torch.frombuffer((ctypes.c_int32 * count).from_address(host.value), dtype=torch.int32)
        weakref.finalize(self, _call, "dualflow_comm_free_mapped", host.value)


class KernelBackend:
    """Dispatch/combine through the csrc/comm kernels, for one NVLink node (at most 8 ranks)."""

    name = "kernels"

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device, hidden: int, max_tokens: int,
                 num_sms: int, config: KernelConfig, shared: bool = False,
                 exchange_device: torch.device | None = None) -> None:
        """Collective over ``group``. ``shared``: the ranks are processes sharing ``device`` on a gloo group
        (``exchange_device`` is then the CPU); every rank must pass the same geometry and configuration."""
        forbid_multicast()
        self.group, self.device, self.config, self.shared = group, device, config, shared
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        exchange_device = exchange_device or device
        problem, self.sharing = None, None
        try:
            if shared:
                self.sharing = device_sharing(device)
            limit = config.max_buffer_bytes
            if limit is None:  # ranks sharing the GPU draw their buffers from the same free memory
                limit = torch.cuda.mem_get_info(device)[0] // (self.size if shared else 1)
            self.sizing = buffer_size(hidden, max_tokens, config.max_topk, self.size, num_sms, config.fp8, limit)
        except Exception as exc:  # whatever it is, the other ranks must hear of it before the next collective
            problem = str(exc) if isinstance(exc, (ValueError, _cuda.CudaLibraryError)) else repr(exc)
        # A rank with another geometry would read and write its peers' buffers at other offsets: refuse it on
        # every rank before anything is allocated.
        peers.agree(group, "kernels backend set-up", problem, {
            "hidden": hidden, "max_tokens_per_rank": max_tokens, "num_sms": num_sms, "shared_gpu": shared,
            "KernelConfig.fp8": config.fp8, "KernelConfig.max_topk": config.max_topk,
            "KernelConfig.timeout_s": config.timeout_s})
        self.num_sms = num_sms
        self.buffers = _PeerBuffers(group, self.sizing.total_bytes, device, exchange_device, ipc_only=shared)
        self._peers = _array(ctypes.c_size_t, self.buffers.ptrs)
        self._mapped = _MappedWords(ERROR_WORDS + 1 + MAX_RANKS + MAX_LOCAL_EXPERTS)
        self._error = self._mapped.words[:ERROR_WORDS]
        self._totals = self._mapped.words[ERROR_WORDS:]
        self._epoch = 0
        self._last: torch.cuda.Event | None = None
        self._failure: str | None = None
        self._closed = False
        self._timeout_ns = int(config.timeout_s * 1e9)

    def describe(self) -> str:
        where = f", {self.size} ranks sharing one GPU ({self.sharing.mode})" if self.sharing else ""
        return (f"kernels ({self.buffers.mechanism}{where}, {self.sizing.num_channels} channels x "
                f"{self.sizing.num_slots} slots of {self.sizing.slot_bytes} B, "
                f"{self.sizing.total_bytes / 2**20:.1f} MiB per rank)")

    def problem(self, num_tokens: int, row_bytes: int, topk: int) -> str | None:
        """Why a call cannot go through this buffer's rings (None when it can)."""
        s = self.sizing
        if num_tokens > s.max_tokens:
            return (f"{num_tokens} tokens exceed the {s.max_tokens} per rank this kernels buffer was sized for; "
                    "create the Buffer with a larger max_tokens_per_rank")
        if row_bytes > s.row_bytes:
            return (f"rows of {row_bytes} bytes do not fit this kernels buffer, sized for {s.row_bytes} "
                    f"(KernelConfig(fp8={self.config.fp8})); use KernelConfig(fp8=False) for FP32 payloads")
        if topk > s.topk:
            return f"top-{topk} routing exceeds KernelConfig.max_topk={s.topk} of this buffer"
        return None

    # -- launches -----------------------------------------------------------------------------------

    def _err_ptr(self) -> int:
        return self._mapped.device_ptr

    def _launch(self, name: str, *args) -> None:
        if self._closed:
            raise RuntimeError("this kernels buffer was closed; create a new Buffer")
        self.check()
        stream = torch.cuda.current_stream(self.device)
        if self._last is not None:
            stream.wait_event(self._last)  # launches of one buffer never overlap (shared ring counters)
        _call(name, ctypes.byref(self.sizing), self._peers, self.rank, *args, self._timeout_ns, self._err_ptr(),
              stream.cuda_stream)
        self._last = torch.cuda.Event()
        self._last.record(stream)

    def dispatch(self, fields: list[torch.Tensor], topk_idx: torch.Tensor | None, layout: DispatchLayout | None,
                 num_experts: int, route: KernelRoute | None) -> tuple[KernelRoute, list[int] | None, Pending]:
        """Same contract as :meth:`TorchBackend.dispatch`; received top-k ids are local ids already."""
        expert_counts = None
        if route is None:
            route, expert_counts = self.notify(topk_idx, layout, num_experts)
        outs, recv_topk = self.send(fields, topk_idx if expert_counts is not None else None, num_experts, route)
        return route, expert_counts, Pending(value=(outs, recv_topk))

    def notify(self, topk_idx: torch.Tensor, layout: DispatchLayout, num_experts: int) -> tuple[KernelRoute, list[int]]:
        """Count exchange of a new routing; blocks the host until the totals are known."""
        is_in = layout.is_token_in_rank.contiguous().view(torch.uint8)
        idx = topk_idx.contiguous()
        recv_prefix = torch.empty(self.size * self.sizing.num_channels + 1, dtype=torch.int32, device=self.device)
        self._epoch += 1
        self._launch("dualflow_comm_notify", is_in.data_ptr(), idx.data_ptr(), idx.shape[0], idx.shape[1],
                     num_experts, self._epoch, recv_prefix.data_ptr(), self._mapped.device_ptr + 4 * ERROR_WORDS)
        self.synchronize()  # the host sizes the outputs from the totals
        totals = self._totals[: 1 + self.size + num_experts // self.size].tolist()
        send_pos = torch.full((idx.shape[0], self.size), -1, dtype=torch.int32, device=self.device)
        recv_src = torch.empty(totals[0], dtype=torch.int32, device=self.device)
        return KernelRoute(recv_prefix, send_pos, is_in, totals[1:1 + self.size], recv_src), totals[1 + self.size:]

    def send(self, fields: list[torch.Tensor], topk_idx: torch.Tensor | None, num_experts: int,
             route: KernelRoute) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The dispatch kernel along ``route``; top-k ids are sent (and returned, local) when given."""
        fields = [_aligned(f) for f in fields]
        idx = None if topk_idx is None else topk_idx.contiguous()
        n = route.num_recv
        outs = [torch.empty(n, f.shape[1], dtype=torch.uint8, device=self.device) for f in fields]
        recv_topk = None if idx is None else torch.empty(n, idx.shape[1], dtype=torch.int64, device=self.device)
        # The route's first dispatch records the source tokens; later (cached) ones write a scratch copy.
        recv_src = route.recv_src_idx if idx is not None else torch.empty_like(route.recv_src_idx)
        self._launch("dualflow_comm_dispatch", route.num_tokens, route.is_token_in_rank.data_ptr(),
                     route.recv_prefix.data_ptr(), len(fields), _array(ctypes.c_size_t, [f.data_ptr() for f in fields]),
                     _array(ctypes.c_size_t, [o.data_ptr() for o in outs]),
                     _array(ctypes.c_int64, [f.shape[1] for f in fields]), 0 if idx is None else idx.data_ptr(),
                     0 if idx is None else idx.shape[1], num_experts // self.size,
                     0 if recv_topk is None else recv_topk.data_ptr(), recv_src.data_ptr(), route.send_pos.data_ptr())
        return outs, recv_topk

    def combine(self, rows: torch.Tensor, weights: torch.Tensor | None, route: KernelRoute) -> Pending:
        rows = _aligned(rows)
        weights = None if weights is None else weights.contiguous()
        out = torch.empty(route.num_tokens, rows.shape[1], dtype=rows.dtype, device=self.device)
        out_w = None if weights is None else torch.empty(route.num_tokens, weights.shape[1], dtype=torch.float32,
                                                         device=self.device)
        self._launch("dualflow_comm_combine", route.num_tokens, route.send_pos.data_ptr(), route.recv_prefix.data_ptr(),
                     rows.data_ptr(), rows.shape[1], rows.element_size(), 0 if weights is None else weights.data_ptr(),
                     0 if weights is None else weights.shape[1], out.data_ptr(),
                     0 if out_w is None else out_w.data_ptr())
        return Pending(value=(out, out_w))

    def close(self) -> None:
        """Unmap the peers' buffers and free this rank's (collective; the buffer cannot be used afterwards).

        A rank's kernel ends once it has what it waits for, while its peers may still be publishing how much
        of its rows they consumed into its buffer: freeing a buffer is safe only after every rank's kernels
        are done, hence the barrier (and a second one inside, between unmapping the peers' buffers and
        freeing this one). Without ``close`` the memory is released when the backend is garbage collected,
        which is safe only after such barriers too.
        """
        if self._closed:
            return
        if self._last is not None:
            self._last.synchronize()
        dist.barrier(group=self.group)
        self.buffers.close()
        self._closed = True

    # -- errors -------------------------------------------------------------------------------------

    def synchronize(self) -> None:
        """Wait for this buffer's kernels; raise :class:`CommTimeoutError` if one of them timed out."""
        if self._last is not None:
            self._last.synchronize()
        self.check()

    def check(self) -> None:
        """Raise if a kernel of this buffer reported a timeout (reads mapped memory; does not wait)."""
        if self._failure is None and int(self._error[0]) != 0:
            _, rank, channel, phase, peer, expected, seen, _ = self._error.tolist()
            where = "notify" if channel < 0 else f"channel {channel}"
            self._failure = (f"dualflow.comm kernels: rank {rank} {where}: {PHASES.get(phase, phase)} from rank "
                             f"{peer} timed out after {self.config.timeout_s:g} s (counter at {seen}, waiting for "
                             f"{expected}). Every rank of the group must make the same dispatch/combine calls; "
                             "this buffer is unusable now, create a new one")
        if self._failure is not None:
            raise CommTimeoutError(self._failure)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous with a 16-byte aligned start (the kernels move 16-byte vectors)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _symmetric_memory_usable() -> bool:
    try:
        from torch.distributed import _symmetric_memory as symm

        return hasattr(symm, "rendezvous") and hasattr(symm, "empty")
    except Exception:
        return False


def kernels_usable(group: dist.ProcessGroup | None, device: torch.device, num_sms: int | None = None,
                   shared: bool = False, exchange_device: torch.device | None = None) -> tuple[bool, str]:
    """Whether every rank of ``group`` can run the kernels (collective): (answer, reason when not).

    ``shared``: the ranks are processes sharing one GPU (gloo group, host exchanges on ``exchange_device``);
    they must all be on the same device and, under MPS, fit on it together (:func:`shared_gpu.problem`).
    ``num_sms``: checked against the SMs of the device (a kernel's blocks must all be resident).
    """
    local = _local_reason(group, device)
    sms, sharing = 0, None
    if not local:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if shared:
            try:
                sharing = device_sharing(device)
            except _cuda.CudaLibraryError as exc:
                local = f"cannot tell how the GPU is shared ({exc})"
    info = [None] * dist.get_world_size(group)
    mine = (socket.gethostname(), "" if local else _bus_id(device), local, sms, sharing)
    dist.all_gather_object(info, mine, group=group)
    hosts, buses, whys, counts, sharings = zip(*info)
    reasons = [f"rank {r}: {why}" for r, why in enumerate(whys) if why]
    if not reasons and len(set(hosts)) > 1:
        reasons.append("the group spans several nodes (the kernels are intranode; torch's hierarchical mode "
                       "carries cross-node traffic)")
    if not reasons and shared:
        if len(set(buses)) > 1:
            reasons.append(f"shared_gpu needs every rank on the same GPU, the ranks are on {list(buses)} (by rank)")
        else:
            why = shared_gpu.problem(num_sms or 2, list(sharings))
            if why:
                reasons.append(why)
    elif not reasons:
        if num_sms is not None and num_sms > min(counts):
            reasons.append(f"num_sms={num_sms} exceeds the {min(counts)} SMs of the GPUs (a kernel's blocks must "
                           "all be resident at once)")
        missing = _missing_nvlink(_bus_id(device), list(buses))
        if missing:
            reasons.append(f"rank {dist.get_rank(group)}: no NVLink to the GPU(s) at {missing}")
    verdict = torch.tensor([0 if reasons else 1], device=exchange_device or device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)
    if verdict.item():
        return True, ""
    return False, "; ".join(reasons) or "another rank has no NVLink to one of its peers"


def _local_reason(group: dist.ProcessGroup | None, device: torch.device) -> str:
    if device.type != "cuda":
        return (f"not a CUDA (NCCL) process group (ranks sharing one GPU over gloo: pass shared_gpu=True or set "
                f"{shared_gpu.ENV}=1)")
    if not _cuda.is_available():
        return "libdualflow_cuda is not built"
    try:
        _lib()
    except (AttributeError, _cuda.CudaLibraryError) as exc:
        return f"libdualflow_cuda has no comm kernels ({exc})"
    if dist.get_world_size(group) > MAX_RANKS:
        return f"{dist.get_world_size(group)} ranks, the kernels handle at most {MAX_RANKS}"
    return ""


def _bus_id(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    return f"{getattr(props, 'pci_domain_id', 0):08x}:{props.pci_bus_id:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"


def _missing_nvlink(mine: str, peers: list[str]) -> list[str]:
    """Bus ids among ``peers`` that NVML reports no NVLink peer-to-peer path to from ``mine``."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            me = pynvml.nvmlDeviceGetHandleByPciBusId(mine)
            missing = []
            for bus in peers:
                if bus == mine:
                    continue
                other = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
                status = pynvml.nvmlDeviceGetP2PStatus(me, other, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
                if status != pynvml.NVML_P2P_STATUS_OK:
                    missing.append(bus)
            return missing
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # no NVML: the safe answer is "no NVLink"
        return [f"(NVML unavailable: {exc})"]
