"""The ``torch`` backend: dispatch/combine on ``all_to_all_single`` with split sizes (gloo and NCCL).

Rows travel as packed bytes (payload, FP8 scales, top-k ids, weights side by side in one uint8 row), so
one all-to-all moves everything and gloo, which cannot send FP8, never sees FP8. A small all-to-all of
counts comes first so that every receiver can size its buffers.

Flat mode (all ranks on one node): one hop, every rank sends straight to every other.

Hierarchical mode (``ranks_per_node < group size``), as the DeepSeek-V3 report describes for
cross-node traffic: a token crosses the network once per destination *node*, to the rank with the same
local index there (its proxy, the "rail" peer), which forwards it inside its node to every rank that
hosts one of its experts. Combine runs the hops backwards; each proxy adds the contributions of its
node in FP32 (ascending rank) and sends one FP32 partial sum per token back over the network, where the
source adds the partials in ascending node order. Both hops are ``all_to_all_single`` calls on the
same group with zero-size splits for the peers a hop does not talk to, so no subgroup is created and
the mode works on any group, including an expert-parallel subgroup.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from dualflow.comm.layout import DispatchLayout, expert_owner, send_order, to_local_experts
from dualflow.comm.payload import RowPacker, as_byte_rows, from_byte_rows
from dualflow.comm.work import Pending


@dataclasses.dataclass(frozen=True, eq=False)
class Hop:
    """One all-to-all: rows ``send_idx`` of the hop's ``num_rows`` input rows, grouped by destination rank."""

    num_rows: int
    send_idx: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]


@dataclasses.dataclass(frozen=True, eq=False)
class TorchRoute:
    """Routing of one dispatch, reused by combine and by cached dispatches.

    ``order[i]`` is the last hop's received row that becomes row ``i`` of the (source rank, source token)
    order; None when the last hop already delivers that order (flat mode).
    """

    hops: tuple[Hop, ...]
    order: torch.Tensor | None
    recv_counts: list[int]

    @property
    def num_recv(self) -> int:
        return sum(self.recv_counts)


class TorchBackend:
    """Dispatch/combine over ``torch.distributed`` on ``group``; hierarchical when ``ranks_per_node`` < size."""

    name = "torch"

    def __init__(self, group: dist.ProcessGroup | None, ranks_per_node: int) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranks_per_node = ranks_per_node
        self.num_nodes = self.size // ranks_per_node

    @property
    def hierarchical(self) -> bool:
        return self.num_nodes > 1

    def problem(self, num_tokens: int, row_bytes: int, topk: int) -> str | None:
        """Why a call cannot go through this backend: never (sizes are unbounded)."""
        return None

    def synchronize(self) -> None:
        """Nothing to wait for beyond the collectives themselves."""

    def describe(self) -> str:
        if self.hierarchical:
            return f"torch (hierarchical: {self.num_nodes} nodes x {self.ranks_per_node} ranks)"
        return "torch"

    # -- dispatch -----------------------------------------------------------------------------------

    def dispatch(
        self,
        fields: list[torch.Tensor],
        topk_idx: torch.Tensor | None,
        layout: DispatchLayout | None,
        num_experts: int,
        route: TorchRoute | None,
    ) -> tuple[TorchRoute, list[int] | None, Pending]:
        """Send byte ``fields`` [T, b] along a new route (``route`` None) or a cached one.

        A new route needs ``topk_idx`` (global ids, sent along) and ``layout``. Returns the route, the
        per-local-expert (token, slot) counts of a new route (None for a cached one), and a pending
        ``(received fields [N, b], received topk_idx in local ids or None)`` in (source rank, source token)
        order.
        """
        expert_counts = None
        if route is None:
            route, expert_counts = self._plan(layout, num_experts)
            fields = [*fields, as_byte_rows(topk_idx)]
        packer = RowPacker([f.shape[1] for f in fields])
        first = route.hops[0]
        out, work = self._exchange(packer.pack(fields, first.send_idx), first)
        fresh = expert_counts is not None

        def finish() -> tuple[list[torch.Tensor], torch.Tensor | None]:
            rows = out
            for hop in route.hops[1:]:
                if fresh:  # forwarding targets follow from the ids that arrived with the rows
                    self._forward_targets(packer.unpack(rows)[-1], num_experts, hop)
                rows, w = self._exchange(rows.index_select(0, hop.send_idx), hop)
                if w is not None:
                    w.wait()
            if route.order is not None:
                rows = rows.index_select(0, route.order)
            parts = packer.unpack(rows)
            if fresh:
                local = num_experts // self.size
                return parts[:-1], to_local_experts(from_byte_rows(parts[-1], torch.int64), self.rank, local)
            return parts, None

        return route, expert_counts, Pending([work], finish)

    def _plan(self, layout: DispatchLayout, num_experts: int) -> tuple[TorchRoute, list[int]]:
        """Exchange counts and build the hops of a new route."""
        is_in = layout.is_token_in_rank
        num_tokens = is_in.shape[0]
        local_experts = num_experts // self.size
        per_rank = is_in.sum(0, dtype=torch.int64)
        columns = [per_rank[:, None], layout.num_tokens_per_expert.view(self.size, local_experts)]
        node_in = None
        if self.hierarchical:
            L, me = self.ranks_per_node, self.rank % self.ranks_per_node
            node_in = is_in.view(num_tokens, self.num_nodes, L).any(-1)
            mine = torch.zeros(self.size, 1 + L, dtype=torch.int64, device=is_in.device)
            # Only my proxies (same local index on every node) get the hop-1 count and the per-rank split.
            mine[me::L, 0] = node_in.sum(0)
            mine[me::L, 1:] = per_rank.view(self.num_nodes, L)
            columns.append(mine)
        sent, meta = self._exchange_counts(torch.cat(columns, dim=1))
        recv_counts = [m[0] for m in meta]
        expert_counts = [sum(m[1 + e] for m in meta) for e in range(local_experts)]
        if not self.hierarchical:
            hop = Hop(num_tokens, send_order(is_in), [m[0] for m in sent], recv_counts)
            return TorchRoute((hop,), None, recv_counts), expert_counts
        L, node = self.ranks_per_node, self.rank // self.ranks_per_node
        base = 1 + local_experts
        hop1_send = [0] * self.size
        hop1_send[self.rank % L::L] = [m[base] for m in sent[self.rank % L::L]]
        hop1_recv = [m[base] for m in meta]
        hop2_send, hop2_recv = [0] * self.size, [0] * self.size
        for d in range(L):
            hop2_send[node * L + d] = sum(m[base + 1 + d] for m in meta)
            hop2_recv[node * L + d] = sum(recv_counts[a * L + d] for a in range(self.num_nodes))
        hop1 = Hop(num_tokens, send_order(node_in), hop1_send, hop1_recv)
        hop2 = Hop(sum(hop1_recv), torch.empty(sum(hop2_send), dtype=torch.int64, device=is_in.device),
                   hop2_send, hop2_recv)
        return TorchRoute((hop1, hop2), self._source_order(recv_counts, is_in.device), recv_counts), expert_counts

    def _forward_targets(self, topk_bytes: torch.Tensor, num_experts: int, hop: Hop) -> None:
        """Fill ``hop.send_idx``: which received rows a proxy forwards to which rank of its node."""
        owner = expert_owner(from_byte_rows(topk_bytes, torch.int64), num_experts, self.size)
        first = self.rank // self.ranks_per_node * self.ranks_per_node
        here = (owner >= first) & (owner < first + self.ranks_per_node)  # experts on other nodes have their own proxy
        is_in = torch.zeros(owner.shape[0], self.ranks_per_node + 1, dtype=torch.bool, device=owner.device)
        is_in.scatter_(1, torch.where(here, owner - first, self.ranks_per_node), True)
        idx = send_order(is_in[:, : self.ranks_per_node])
        if idx.numel() != hop.send_idx.numel():
            raise RuntimeError(f"hierarchical dispatch: rank {self.rank} forwards {idx.numel()} rows but the "
                               f"counts exchanged beforehand announced {hop.send_idx.numel()}")
        hop.send_idx.copy_(idx)

    def _source_order(self, recv_counts: list[int], device: torch.device) -> torch.Tensor:
        """Permutation from the last hop's order (proxy, source node, token) to (source rank, token)."""
        counts = torch.tensor(recv_counts, dtype=torch.int64, device=device)
        by_proxy = counts.view(self.num_nodes, self.ranks_per_node).t().reshape(-1)  # (proxy, node) order
        proxy_start = (torch.cumsum(by_proxy, 0) - by_proxy).view(self.ranks_per_node, self.num_nodes).t().reshape(-1)
        final_start = torch.cumsum(counts, 0) - counts
        shift = torch.repeat_interleave(proxy_start - final_start, counts, output_size=sum(recv_counts))
        return shift + torch.arange(shift.numel(), device=device)

    # -- combine ------------------------------------------------------------------------------------

    def combine(self, rows: torch.Tensor, weights: torch.Tensor | None, route: TorchRoute) -> Pending:
        """Send ``rows`` [N, W] (and ``weights`` [N, k] float32) back along ``route`` and add them up.

        Pending ``(out [T, W] in rows.dtype, out_weights [T, k] or None)``: per token, the FP32 sum of its
        returning rows in ascending rank order (per hop), starting from +0.0.
        """
        if route.order is not None:
            rows = _scatter_rows(rows, route.order)
            weights = None if weights is None else _scatter_rows(weights, route.order)
        hops = list(reversed(route.hops))
        pending = self._combine_hop(rows, weights, hops[0])
        for hop in hops[1:]:
            pending = pending.then(lambda r, hop=hop: self._combine_hop(*r, hop).wait())
        return pending.then(lambda r: (r[0].to(rows.dtype), r[1]))

    def _combine_hop(self, values: torch.Tensor, weights: torch.Tensor | None, hop: Hop) -> Pending:
        fields = [as_byte_rows(values)] + ([] if weights is None else [as_byte_rows(weights)])
        packer = RowPacker([f.shape[1] for f in fields])
        back = _empty_rows(sum(hop.send_counts), packer.row_bytes, values.device)
        work = self._a2a(back, packer.pack(fields), hop.send_counts, hop.recv_counts)

        def reduce() -> tuple[torch.Tensor, torch.Tensor | None]:
            parts = packer.unpack(back)
            out = _sum_by_destination(from_byte_rows(parts[0], values.dtype), hop)
            out_w = None if weights is None else _sum_by_destination(from_byte_rows(parts[1], torch.float32), hop)
            return out, out_w

        return Pending([work], reduce)

    # -- collectives --------------------------------------------------------------------------------

    def _exchange_counts(self, counts: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
        """All-to-all of one int64 row per destination: (rows this rank sent, rows each source sent to it)."""
        out = torch.empty_like(counts)
        dist.all_to_all_single(out, counts.contiguous(), group=self.group)
        sent, received = torch.stack([counts, out]).tolist()  # one device sync for both
        return sent, received

    def _exchange(self, packed: torch.Tensor, hop: Hop):
        out = _empty_rows(sum(hop.recv_counts), packed.shape[1], packed.device)
        return out, self._a2a(out, packed, hop.recv_counts, hop.send_counts)

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]):
        # gloo runs collectives on its own threads: return the Work so that callers can overlap. On CUDA the
        # call is stream-ordered (the current stream waits for NCCL), so the host never blocks here.
        on_cpu = out.device.type == "cpu"
        work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=on_cpu)
        return work if on_cpu else None


def _empty_rows(n: int, row_bytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(n, row_bytes, dtype=torch.uint8, device=device)


def _scatter_rows(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rows_final = rows_hop[order]``."""
    out = torch.empty_like(rows)
    out[order] = rows
    return out


def _sum_by_destination(back: torch.Tensor, hop: Hop) -> torch.Tensor:
    """FP32 sum of returning rows onto the hop's input rows, destination (= returning rank) ascending."""
    acc = torch.zeros(hop.num_rows, back.shape[1], dtype=torch.float32, device=back.device)
    start = 0
    for count in hop.send_counts:
        if count:
            idx = hop.send_idx[start:start + count]  # unique within one destination: no accumulation races
            acc[idx] += back[start:start + count].float()
        start += count
    return acc
