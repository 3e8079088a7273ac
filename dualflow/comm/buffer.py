"""``Buffer``: MoE dispatch/combine for one expert-parallel group, modelled on DeepEP's normal mode.

    buffer = Buffer(group, hidden=7168)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(x, topk_idx, topk_w, num_experts=256)
    y = experts(recv_x, recv_idx, counts)                # rows of this rank's experts
    out, _, _ = buffer.combine(y, handle, topk_weights=recv_w)

Results are deterministic: received rows are ordered by (source rank, source token), combine adds in
FP32 in ascending rank order, and two identical calls give bitwise-identical results.
"""

from __future__ import annotations

import dataclasses
import itertools
import socket
from typing import Any

import torch
import torch.distributed as dist

from dualflow.comm import autograd, kernels, shared_gpu
from dualflow.comm.layout import DispatchLayout, ExpertMajorLayout, align_up, expert_major_layout, get_dispatch_layout
from dualflow.comm.payload import KIND_CODES, Payload, as_byte_rows, check_payload, from_byte_rows
from dualflow.comm.torch_a2a import TorchBackend
from dualflow.comm.validate import CheckFailed, Problem, agree, require
from dualflow.comm.work import CommWork
from dualflow.utils import nvtx
from dualflow.utils.logging import get_logger

BACKENDS = ("auto", "torch", "kernels")
# How dispatch/combine check their arguments across ranks (Buffer's ``checks``).
CHECKS = ("collective", "first", "local")
_log = get_logger("dualflow.comm")
_HOST_BYTES = 256  # a host name is at most 253 bytes


@dataclasses.dataclass(frozen=True, eq=False)
class DispatchHandle:
    """Routing of one dispatch: pass it to ``combine`` and to cached dispatches (``handle=``).

    ``recv_topk_idx`` [N, k] holds local expert ids (-1 where the expert is on another rank). With
    ``expert_major`` the received rows are grouped per local expert: ``expert_offsets[e]`` is the first
    row of expert ``e``, segments are padded to ``expert_alignment`` (see :class:`ExpertMajorLayout`).
    """

    owner: object
    seq: int
    num_tokens: int
    num_experts: int
    expert_alignment: int
    expert_major: bool
    topk_idx: torch.Tensor
    recv_topk_idx: torch.Tensor
    expert_counts: list[int]
    expert_layout: ExpertMajorLayout | None
    route: Any

    @property
    def num_recv_tokens(self) -> int:
        """Received tokens (rows in the (source rank, source token) order)."""
        return self.recv_topk_idx.shape[0]

    @property
    def num_rows(self) -> int:
        """Rows of ``recv_x`` and of combine's input: expert-major rows (padding included) or received tokens."""
        return self.expert_layout.num_rows if self.expert_layout is not None else self.num_recv_tokens

    @property
    def num_recv_tokens_per_expert(self) -> list[int]:
        """(Token, slot) pairs per local expert, each aligned up to ``expert_alignment``."""
        return [align_up(c, self.expert_alignment) for c in self.expert_counts]

    @property
    def expert_offsets(self) -> list[int]:
        """Start row of each local expert's segment in the expert-major layout, plus the total at the end."""
        return list(itertools.accumulate(self.num_recv_tokens_per_expert, initial=0))


class Buffer:
    """Dispatch/combine of MoE tokens across the ranks of ``group`` (any group, subgroups included).

    - ``hidden``: row width of every payload (FP8 payloads need a multiple of 128).
    - ``max_tokens_per_rank``: upper bound on tokens per call; sizes the kernel backend's buffers, and
      is enforced (None = unbounded, torch backend only).
    - ``num_sms``: SMs the ``kernels`` backend may use (even, >= 2); others ignore it but report it.
    - ``backend``: ``"torch"`` (``all_to_all_single``, gloo or NCCL), ``"kernels"`` (SM-pinned NVLink
      kernels, one node) or ``"auto"`` (kernels when built and every peer is NVLink-connected, else torch).
    - ``ranks_per_node``: ranks of the group per node, group ranks numbered node by node. None detects
      it from host names. Fewer than the group size selects the torch backend's hierarchical mode.
    - ``kernel_config``: options of the kernels backend (:class:`~dualflow.comm.kernels.KernelConfig`).
    - ``checks``: how dispatch and combine check their arguments across ranks.

      - ``"collective"`` (default): every call first exchanges a small header with every rank, so bad
        or mismatched arguments raise ``ValueError`` on all ranks together and nothing moves. The
        exchange is one tiny all-to-all whose result the host reads: on a GPU it waits for the work
        already queued, once per call.
      - ``"first"``: only the first dispatch and the first combine of the buffer exchange the header
        (that catches mismatched configurations: hidden, experts, top-k, payload kind, weights); later
        calls check locally. A local failure then raises on its own rank only, and the other ranks wait
        in their next collective until the process group's timeout.
      - ``"local"``: no exchange at all; local checks only, with the same consequence.

      Every rank must pass the same value (checked when the buffer is made).
    - ``shared_gpu``: the ranks of ``group`` (gloo) are processes sharing this process's current CUDA
      device, where NCCL cannot run: tensors live on that device, host exchanges go over gloo, ``auto``
      picks the kernels (CUDA IPC between the processes) and ``torch`` moves rows through gloo. None
      reads ``$DUALFLOW_COMM_SHARED_GPU`` (unset: off). See docs/comm_kernels.md, "Ranks sharing one GPU".

    Constructing a buffer is collective over ``group``; so are ``dispatch``, ``combine`` and ``close``.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        hidden: int,
        max_tokens_per_rank: int | None = None,
        num_sms: int = 20,
        backend: str = "auto",
        ranks_per_node: int | None = None,
        kernel_config: kernels.KernelConfig | None = None,
        checks: str = "collective",
        shared_gpu: bool | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("Buffer needs torch.distributed to be initialised (dist.init_process_group)")
        self.group = group
        self.num_ranks = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = self._exchange_device = _group_device(group)  # host exchanges: where the group runs
        self.shared_gpu = False
        self.hidden = hidden
        self.max_tokens_per_rank = max_tokens_per_rank
        self.num_sms = num_sms
        self._token = object()  # identifies handles made by this buffer
        self._seq = itertools.count()
        self._stream = None
        self.checks = checks
        self._agreed: set[str] = set()  # operations whose header was exchanged (checks="first")
        failure = None
        try:
            require(isinstance(hidden, int) and hidden > 0, Problem.ARGUMENT,
                    f"hidden must be a positive int, got {hidden!r}")
            require(isinstance(num_sms, int) and num_sms >= 2 and num_sms % 2 == 0, Problem.ARGUMENT,
                    f"num_sms must be an even int >= 2 (SMs are paired into channels), got {num_sms!r}")
            require(backend in BACKENDS, Problem.ARGUMENT, f"backend must be one of {BACKENDS}, got {backend!r}")
            require(checks in CHECKS, Problem.ARGUMENT, f"checks must be one of {CHECKS}, got {checks!r}")
            require(max_tokens_per_rank is None or (isinstance(max_tokens_per_rank, int) and max_tokens_per_rank > 0),
                    Problem.ARGUMENT,
                    f"max_tokens_per_rank must be None or a positive int, got {max_tokens_per_rank!r}")
            require(ranks_per_node is None or (isinstance(ranks_per_node, int) and ranks_per_node > 0
                                               and self.num_ranks % ranks_per_node == 0), Problem.ARGUMENT,
                    f"ranks_per_node must divide the group size {self.num_ranks}, got {ranks_per_node!r}")
            self._share_gpu(shared_gpu)
        except CheckFailed as exc:
            failure = exc
        agree(group, self._exchange_device, "Buffer()", {
            "hidden": hidden if failure is None else -1, "num_sms": num_sms if failure is None else -1,
            "backend": BACKENDS.index(backend) if backend in BACKENDS else -1,
            "ranks_per_node": ranks_per_node or -1,
            "device": 2 if self.shared_gpu else 1 if self.device.type == "cuda" else 0,
            "checks": CHECKS.index(checks) if checks in CHECKS else -1,
        }, failure)
        self.ranks_per_node = ranks_per_node or self._detect_ranks_per_node()
        self._backend = self._make_backend(backend, kernel_config or kernels.KernelConfig())

    def _share_gpu(self, flag: bool | None) -> None:
        """Shared-GPU mode: tensors on the current CUDA device, host exchanges on the (gloo) group's CPU."""
        try:
            wanted = shared_gpu.requested(flag)
        except ValueError as exc:
            raise CheckFailed(Problem.ARGUMENT, str(exc)) from None
        if not wanted:
            return
        group_backend = str(dist.get_backend(self.group)).lower()
        require(group_backend == "gloo", Problem.ARGUMENT,
                f"shared_gpu needs a gloo process group (ranks sharing one GPU cannot use NCCL), this group's "
                f"backend is {group_backend!r}")
        require(torch.cuda.is_available(), Problem.ARGUMENT,
                "shared_gpu: this process sees no CUDA device; make the GPU visible to every rank, or unset "
                f"{shared_gpu.ENV}")
        self.device, self.shared_gpu = torch.device("cuda", torch.cuda.current_device()), True

    @property
    def backend(self) -> str:
        """Name of the backend in use: ``"torch"`` or ``"kernels"``."""
        return self._backend.name

    def describe(self) -> str:
        return f"{self._backend.describe()} on {self.num_ranks} ranks, num_sms={self.num_sms}"

    def synchronize(self) -> None:
        """Wait for this buffer's communication; raise if a kernel reported a timeout (kernels backend)."""
        self._backend.synchronize()

    def close(self) -> None:
        """Release the buffer's memory now (collective; the kernels backend frees its mapped buffers once
        every rank's kernels are done). The buffer cannot be used afterwards."""
        close = getattr(self._backend, "close", None)
        if close is not None:
            close()

    def _agree(self, operation: str, values: dict[str, int], failure: CheckFailed | None) -> None:
        """The cross-rank check of one call, as ``checks`` says (see the class docstring)."""
        if self.checks == "collective" or (self.checks == "first" and operation not in self._agreed):
            agree(self.group, self._exchange_device, operation, values, failure)
            self._agreed.add(operation)
        elif failure is not None:
            raise ValueError(f"{operation} on rank {self.rank}: {failure}; nothing was sent (checks={self.checks!r}: "
                             "the other ranks were not told and wait in their next collective)") from None

    # -- layout -------------------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        """Per-rank and per-expert counts and the token-to-rank map of ``topk_idx`` [T, k] (local, no communication)."""
        try:
            self._check_routing(topk_idx, num_experts)
        except CheckFailed as exc:
            raise ValueError(f"get_dispatch_layout: {exc}") from None
        return get_dispatch_layout(topk_idx, num_experts, self.num_ranks)

    # -- dispatch -----------------------------------------------------------------------------------

    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        num_experts: int,
        layout: DispatchLayout | None = None,
        handle: DispatchHandle | None = None,
        expert_alignment: int = 1,
        async_op: bool = False,
        expert_major: bool = False,
    ) -> tuple[Any, torch.Tensor, torch.Tensor | None, list[int], DispatchHandle, CommWork | None]:
        """Send each token once to every rank hosting one of its experts.

        Returns ``recv_x`` (a tensor, or an (fp8, scales) tuple for FP8 payloads), ``recv_topk_idx``
        [N, k] (local ids, -1 elsewhere), ``recv_topk_weights`` (0 where the expert is elsewhere; None
        without weights), ``num_recv_tokens_per_expert`` (ints aligned up to ``expert_alignment``), the
        handle, and a :class:`CommWork` when ``async_op`` (else None). With ``handle`` the routing of an
        earlier dispatch is reused (``topk_idx`` may then be None; if given, it must be the same routing).
        """
        with nvtx.range("dualflow.comm.dispatch"):
            failure, payload = None, None
            try:
                payload = self._check_dispatch(x, topk_idx, topk_weights, num_experts, layout, handle,
                                               expert_alignment, expert_major)
            except CheckFailed as exc:
                failure = exc
            x_grad = payload is not None and not payload.is_fp8 and payload.data.requires_grad
            w_grad = isinstance(topk_weights, torch.Tensor) and topk_weights.requires_grad
            grad = torch.is_grad_enabled() and (x_grad or w_grad)
            self._agree("dispatch", {
                "hidden": self.hidden, "num_experts": num_experts if isinstance(num_experts, int) else -1,
                "topk": _topk_width(topk_idx, handle),
                "payload": KIND_CODES.get(payload.data.dtype, -1) if payload else -1,
                "weights": int(topk_weights is not None), "expert_alignment": expert_alignment
                if isinstance(expert_alignment, int) else -1, "expert_major": int(bool(expert_major)),
                "handle": handle.seq if isinstance(handle, DispatchHandle) else -1,
                "grad": int(grad) | x_grad << 1 | w_grad << 2,
            }, failure)
            call = dict(scales=payload.scales, topk_idx=topk_idx, num_experts=num_experts, layout=layout,
                        handle=handle, expert_alignment=expert_alignment, expert_major=expert_major, async_op=async_op)
            if grad:
                return autograd.DispatchFn.apply(self, call, payload.data, topk_weights)
            return self._dispatch_raw(x=payload.data, topk_weights=topk_weights, **call)

    def _dispatch_raw(self, x, scales, topk_idx, topk_weights, num_experts, layout, handle, expert_alignment,
                      expert_major, async_op):
        """Dispatch without checks or autograd; ``expert_major`` picks the layout of ``recv_x``."""
        payload = Payload(x, scales)
        inputs = [*payload.tensors, *(t for t in (topk_idx, topk_weights) if t is not None)]

        def body():
            nonlocal handle
            fields = payload.byte_rows() + ([as_byte_rows(topk_weights)] if topk_weights is not None else [])
            fresh = handle is None
            if fresh:
                lay = layout or get_dispatch_layout(topk_idx, num_experts, self.num_ranks)
                route, expert_counts, pending = self._backend.dispatch(fields, topk_idx, lay, num_experts, None)
                n, k = route.num_recv, topk_idx.shape[1]
                em = None
                if expert_major:
                    offsets = list(itertools.accumulate((align_up(c, expert_alignment) for c in expert_counts),
                                                        initial=0))
                    em = ExpertMajorLayout(offsets, expert_counts, topk_idx.new_empty(offsets[-1]),
                                           topk_idx.new_empty(n, k))
                handle = DispatchHandle(self._token, next(self._seq), topk_idx.shape[0], num_experts,
                                        expert_alignment, expert_major, topk_idx.clone(),
                                        topk_idx.new_empty(n, k), expert_counts, em, route)
            else:
                _, _, pending = self._backend.dispatch(fields, None, None, num_experts, handle.route)
            em = handle.expert_layout if expert_major else None
            rows = em.num_rows if em is not None else handle.num_recv_tokens
            out = payload.empty_like_rows(rows)
            recv_w = None
            if topk_weights is not None:
                recv_w = topk_weights.new_empty(handle.num_recv_tokens, topk_weights.shape[1])

            def finish(result) -> None:
                recv_fields, recv_topk = result
                if fresh:
                    handle.recv_topk_idx.copy_(recv_topk)
                    if handle.expert_layout is not None:
                        built = expert_major_layout(handle.recv_topk_idx, handle.expert_counts, expert_alignment)
                        handle.expert_layout.rows.copy_(built.rows)
                        handle.expert_layout.position.copy_(built.position)
                for dst, src in zip(out.tensors, recv_fields):
                    dst_bytes = dst.view(torch.uint8)
                    if em is None:
                        dst_bytes.copy_(src)
                    else:  # expert-major: copy each (row, slot) pair to its segment, zero the padding
                        dst_bytes.zero_()
                        filled = (em.rows >= 0).nonzero()[:, 0]
                        dst_bytes[filled] = src.index_select(0, em.rows[filled])
                if recv_w is not None:
                    w = from_byte_rows(recv_fields[len(out.tensors)], torch.float32)
                    recv_w.copy_(torch.where(handle.recv_topk_idx >= 0, w, 0.0))

            results = (out.output(), handle.recv_topk_idx, recv_w)
            return results, pending.then(finish), [*out.tensors, handle.recv_topk_idx]

        (recv_x, recv_idx, recv_w), work = self._run(async_op, body, inputs)
        return recv_x, recv_idx, recv_w, handle.num_recv_tokens_per_expert, handle, work

    # -- combine ------------------------------------------------------------------------------------

    def combine(
        self,
        y: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None = None,
        async_op: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, CommWork | None]:
        """Return every received row to its source rank and add them up per token.

        ``y`` has the layout of the dispatch's ``recv_x`` (expert-major rows when it was expert-major),
        BF16 or FP32. With ``topk_weights`` [N, k] (normally the dispatch's ``recv_topk_weights``) rows are
        weighted (see :mod:`dualflow.comm.autograd`) and ``combined_topk_weights`` [T, k] brings each
        slot's weight back from the rank hosting its expert. Output: ``combined_x`` [T, H] in y's dtype,
        the FP32 sum of the contributions in ascending rank order; tokens sent nowhere get zeros.
        """
        with nvtx.range("dualflow.comm.combine"):
            failure = None
            try:
                self._check_combine(y, handle, topk_weights)
            except CheckFailed as exc:
                failure = exc
            y_grad = isinstance(y, torch.Tensor) and y.requires_grad
            w_grad = isinstance(topk_weights, torch.Tensor) and topk_weights.requires_grad
            grad = torch.is_grad_enabled() and (y_grad or w_grad)
            self._agree("combine", {
                "hidden": self.hidden, "payload": KIND_CODES.get(y.dtype, -1) if isinstance(y, torch.Tensor) else -1,
                "weights": int(topk_weights is not None),
                "handle": handle.seq if isinstance(handle, DispatchHandle) else -1,
                "grad": int(grad) | y_grad << 1 | w_grad << 2,
            }, failure)
            if grad:
                return autograd.CombineFn.apply(self, handle, async_op, y, topk_weights)
            return self._combine_raw(y, handle, topk_weights, topk_weights, async_op)

    def _combine_raw(self, y, handle, scale_weights, route_weights, async_op):
        """Combine without checks or autograd: rows weighted by ``scale_weights``, ``route_weights`` sent back."""
        num_tokens = handle.num_tokens
        inputs = [t for t in (y, scale_weights, route_weights) if t is not None]

        def body():
            rows = autograd.contributions(y, handle, scale_weights)
            weights = None
            if route_weights is not None:
                weights = torch.where(handle.recv_topk_idx >= 0, route_weights.float(), 0.0)
            out = y.new_empty(num_tokens, y.shape[1])
            out_w = None if weights is None else weights.new_empty(num_tokens, weights.shape[1])
            pending = self._backend.combine(rows, weights, handle.route)

            def finish(result) -> None:
                out.copy_(result[0])
                if out_w is not None:
                    out_w.copy_(result[1])

            return (out, out_w), pending.then(finish), [out] + ([out_w] if out_w is not None else [])

        (out, out_w), work = self._run(async_op, body, inputs)
        return out, out_w, work

    # -- execution ----------------------------------------------------------------------------------

    def _run(self, async_op: bool, body, inputs: list[torch.Tensor]):
        """Run ``body() -> (results, pending, outputs)``; synchronously, or as a :class:`CommWork`.

        On CUDA an asynchronous call runs on this buffer's stream, which first waits for the caller's; the
        caller's stream waits for it only in ``CommWork.wait``.
        """
        if not async_op:
            results, pending, _ = body()
            pending.wait()
            return results, None
        if self.device.type != "cuda":
            results, pending, _ = body()
            return results, CommWork(pending)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            results, pending, outputs = body()
            pending.wait()  # stream-ordered on CUDA: enqueues, does not block
            event = torch.cuda.Event()
            event.record(self._stream)
        for t in inputs:  # read on the communication stream: keep them alive until it is done
            t.record_stream(self._stream)
        return results, CommWork(event=event, outputs=outputs, device=self.device)

    # -- checks (local; their failure is shared with every rank by validate.agree) -------------------

    def _check_routing(self, topk_idx: Any, num_experts: Any) -> None:
        require(isinstance(num_experts, int) and num_experts > 0, Problem.NUM_EXPERTS,
                f"num_experts must be a positive int, got {num_experts!r}")
        require(num_experts % self.num_ranks == 0, Problem.NUM_EXPERTS,
                f"num_experts={num_experts} is not divisible by the group size {self.num_ranks}; every rank must "
                "host the same number of experts")
        require(isinstance(topk_idx, torch.Tensor) and topk_idx.dtype == torch.int64 and topk_idx.dim() == 2
                and topk_idx.shape[1] >= 1, Problem.TOPK_IDX,
                "topk_idx must be an int64 [num_tokens, k] tensor with k >= 1, got "
                + _describe(topk_idx))
        require(topk_idx.device == self.device, Problem.TOPK_IDX,
                f"topk_idx is on {topk_idx.device}, this buffer communicates on {self.device}")
        if topk_idx.numel():
            lo, hi = torch.stack(torch.aminmax(topk_idx)).tolist()  # one device sync for both bounds
            require(lo >= -1 and hi < num_experts, Problem.EXPERT_RANGE,
                    f"expert index outside [-1, num_experts={num_experts}): topk_idx has values in [{lo}, {hi}]")

    def _check_dispatch(self, x, topk_idx, topk_weights, num_experts, layout, handle, expert_alignment,
                        expert_major) -> Payload:
        payload, reason = check_payload(x, self.hidden)
        require(payload is not None, Problem.PAYLOAD, reason)
        for t in payload.tensors:
            require(t.device == self.device, Problem.PAYLOAD,
                    f"x is on {t.device}, this buffer communicates on {self.device}")
        num_tokens = payload.data.shape[0]
        require(self.max_tokens_per_rank is None or num_tokens <= self.max_tokens_per_rank, Problem.PAYLOAD,
                f"{num_tokens} tokens exceed max_tokens_per_rank={self.max_tokens_per_rank} of this buffer")
        k = topk_idx.shape[-1] if isinstance(topk_idx, torch.Tensor) and topk_idx.dim() == 2 else 1
        why = self._backend.problem(num_tokens, self.hidden * payload.data.element_size(), k)
        require(why is None, Problem.PAYLOAD, why or "")
        require(isinstance(expert_alignment, int) and expert_alignment >= 1, Problem.ARGUMENT,
                f"expert_alignment must be an int >= 1, got {expert_alignment!r}")
        if handle is not None:
            self._check_handle(handle, num_tokens)
            require(num_experts == handle.num_experts and expert_alignment == handle.expert_alignment
                    and bool(expert_major) == handle.expert_major, Problem.HANDLE,
                    f"the handle was made with num_experts={handle.num_experts}, expert_alignment="
                    f"{handle.expert_alignment}, expert_major={handle.expert_major}; this call passes "
                    f"{num_experts}, {expert_alignment}, {bool(expert_major)}")
            if topk_idx is not None:
                require(isinstance(topk_idx, torch.Tensor) and topk_idx.shape == handle.topk_idx.shape
                        and torch.equal(topk_idx, handle.topk_idx), Problem.HANDLE,
                        "the handle comes from another routing: topk_idx differs from the one it was made with "
                        "(pass topk_idx=None to reuse the handle's routing, or dispatch without the handle)")
            k = handle.topk_idx.shape[1]
        else:
            self._check_routing(topk_idx, num_experts)
            k = topk_idx.shape[1]
            require(topk_idx.shape[0] == num_tokens, Problem.TOPK_IDX,
                    f"topk_idx has {topk_idx.shape[0]} rows but x has {num_tokens} tokens")
            if layout is not None:
                want = ([self.num_ranks], [num_experts], [num_tokens, self.num_ranks])
                got = [list(t.shape) if isinstance(t, torch.Tensor) else None for t in
                       (getattr(layout, f.name, None) for f in dataclasses.fields(DispatchLayout))]
                require(isinstance(layout, DispatchLayout) and got == list(want), Problem.LAYOUT,
                        f"layout must come from get_dispatch_layout(topk_idx, num_experts) on this topk_idx: "
                        f"expected shapes {list(want)}, got {got}")
        if topk_weights is not None:
            require(isinstance(topk_weights, torch.Tensor) and topk_weights.dtype == torch.float32
                    and list(topk_weights.shape) == [num_tokens, k], Problem.TOPK_WEIGHTS,
                    f"topk_weights must be float32 [num_tokens={num_tokens}, k={k}] like topk_idx, got "
                    + _describe(topk_weights))
            require(topk_weights.device == self.device, Problem.TOPK_WEIGHTS,
                    f"topk_weights is on {topk_weights.device}, this buffer communicates on {self.device}")
        return payload

    def _check_handle(self, handle: Any, num_tokens: int | None) -> None:
        require(isinstance(handle, DispatchHandle), Problem.HANDLE,
                f"handle must be the DispatchHandle returned by dispatch, got {type(handle).__name__}")
        require(handle.owner is self._token, Problem.HANDLE,
                "the handle was made by another Buffer; use the handle returned by this buffer's dispatch")
        require(num_tokens is None or num_tokens == handle.num_tokens, Problem.HANDLE,
                f"the handle comes from another routing: it routes {handle.num_tokens} tokens, x has {num_tokens}")

    def _check_combine(self, y: Any, handle: Any, topk_weights: Any) -> None:
        self._check_handle(handle, None)
        require(isinstance(y, torch.Tensor) and y.dtype in (torch.bfloat16, torch.float32), Problem.PAYLOAD,
                "combine input y must be a bfloat16 or float32 tensor, got "
                + _describe(y))
        want = [handle.num_rows, self.hidden]
        require(list(y.shape) == want, Problem.PAYLOAD,
                f"combine input y must be [{handle.num_rows}, hidden={self.hidden}] (the layout of this handle's "
                f"recv_x{', expert-major rows' if handle.expert_major else ''}), got {list(y.shape)}")
        require(y.device == self.device, Problem.PAYLOAD,
                f"y is on {y.device}, this buffer communicates on {self.device}")
        why = self._backend.problem(handle.num_tokens, y.shape[1] * y.element_size(), handle.topk_idx.shape[1])
        require(why is None, Problem.PAYLOAD, why or "")
        if topk_weights is not None:
            want_w = list(handle.recv_topk_idx.shape)
            require(isinstance(topk_weights, torch.Tensor) and topk_weights.dtype == torch.float32
                    and list(topk_weights.shape) == want_w and topk_weights.device == self.device, Problem.TOPK_WEIGHTS,
                    f"combine topk_weights must be float32 {want_w} on {self.device} (like recv_topk_weights), got "
                    + _describe(topk_weights, device=True))

    # -- construction -------------------------------------------------------------------------------

    def _detect_ranks_per_node(self) -> int:
        """Ranks per node from host names; the group's ranks must be numbered node by node."""
        # host names as fixed-size byte tensors, not pickled objects (docs/launcher.md, Trust)
        name = socket.gethostname().encode()[:_HOST_BYTES].ljust(_HOST_BYTES, b"\0")
        mine = torch.tensor(list(name), dtype=torch.uint8, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.num_ranks)]
        dist.all_gather(gathered, mine, group=self.group)
        hosts = [bytes(t.cpu().tolist()).rstrip(b"\0").decode("utf-8", "replace") for t in gathered]
        sizes = [len(list(g)) for _, g in itertools.groupby(hosts)]
        if len(sizes) == len(set(hosts)) and len(set(sizes)) == 1:
            return sizes[0]
        _log.warning("ranks of the group are not numbered node by node with equal counts (%s); using one flat "
                     "all-to-all (pass ranks_per_node to choose the hierarchy)", hosts)
        return self.num_ranks

    def _make_backend(self, backend: str, config: kernels.KernelConfig):
        """The backend asked for; ``auto`` asks every rank whether the kernels can run (collective)."""
        if backend == "torch" or (backend == "auto" and self.device.type != "cuda"):
            return TorchBackend(self.group, self.ranks_per_node)
        usable, why = kernels.kernels_usable(self.group, self.device, self.num_sms, self.shared_gpu,
                                             self._exchange_device)
        if not usable:
            if backend == "kernels":
                raise ValueError(f"backend='kernels' cannot run here: {why}. Use backend='torch' (or 'auto')")
            if self.shared_gpu:
                _log.warning("shared_gpu: the kernels cannot run (%s); using the torch backend over gloo", why)
            return TorchBackend(self.group, self.ranks_per_node)
        return kernels.KernelBackend(self.group, self.device, self.hidden, self.max_tokens_per_rank or 4096,
                                     self.num_sms, config, self.shared_gpu, self._exchange_device)


def _describe(value: Any, device: bool = False) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {list(value.shape)}" + (f" on {value.device}" if device else "")
    return type(value).__name__


def _topk_width(topk_idx: Any, handle: Any) -> int:
    if isinstance(handle, DispatchHandle):
        return handle.topk_idx.shape[1]
    return topk_idx.shape[1] if isinstance(topk_idx, torch.Tensor) and topk_idx.dim() == 2 else -1


def _group_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where the group's collectives run: CUDA for NCCL groups, else the CPU."""
    name = str(dist.get_backend(group)).lower()
    if "nccl" in name:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
