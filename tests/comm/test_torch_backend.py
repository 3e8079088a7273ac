"""The torch backend on real gloo process groups: every output against the independent reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dualflow.comm import Buffer
from tests.comm.cases import KINDS, SCENARIOS, assert_bitwise, check_buffer, fields_of, make_payload, make_routing
from tests.dist import progress, run_workers


def _flat(rank, world, scenarios, kinds):
    return check_buffer(Buffer(None, hidden=128, backend="torch"), scenarios, kinds)


@pytest.mark.parametrize("world", [2, 4])
def test_flat_matches_reference(world):
    received = run_workers(_flat, world, SCENARIOS, KINDS, timeout=180)
    assert sum(received) > 0


def test_eight_ranks_match_reference():
    received = run_workers(_flat, 8, ("random", "idle_rank"), ("bf16", "fp8"), timeout=240)
    assert sum(received) > 0


def _hierarchical(rank, world, ranks_per_node):
    buffer = Buffer(None, hidden=128, backend="torch", ranks_per_node=ranks_per_node)
    assert buffer.ranks_per_node == ranks_per_node and "hierarchical" in buffer.describe()
    # Combine adds FP32 partial sums per node, so it is checked within rounding, not bitwise.
    check_buffer(buffer, ("random", "imbalance"), ("bf16", "fp8"), seed=3, exact_combine=False)
    # Each token crosses to a remote node once per node, to its proxy (same local index), and nowhere else.
    num_experts, L = 2 * world, ranks_per_node
    idx, w = make_routing(rank, world, "random", num_experts, 4, seed=5)
    handle = buffer.dispatch(torch.zeros(idx.shape[0], 128), idx, w, num_experts)[4]
    hop1, hop2 = handle.route.hops
    node_of = (idx // (num_experts // world)) // L
    for node in range(world // L):
        tokens = int(((node_of == node) & (idx >= 0)).any(1).sum())
        for peer in range(node * L, node * L + L):
            assert hop1.send_counts[peer] == (tokens if peer % L == rank % L else 0), (rank, peer)
    assert all(c == 0 for p, c in enumerate(hop2.send_counts) if p // L != rank // L)  # hop 2 stays in the node
    return True


@pytest.mark.parametrize("world,ranks_per_node", [(4, 2), (6, 2)])
def test_hierarchical_matches_reference(world, ranks_per_node):
    assert all(run_workers(_hierarchical, world, ranks_per_node, timeout=240))


def _subgroups(rank, world):
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group = groups[rank % 2]
    return check_buffer(Buffer(group, hidden=128, backend="torch"), ("random",), ("bf16", "fp8"), seed=rank % 2)


def test_subgroup_buffers_work_side_by_side():
    assert sum(run_workers(_subgroups, 4, timeout=180)) > 0


def _async(rank, world):
    buffer = Buffer(None, hidden=128)
    assert buffer.backend == "torch"  # auto on gloo
    num_experts = 2 * world
    idx, w = make_routing(rank, world, "random", num_experts, 3, seed=11)
    for kind, expert_major in (("bf16", False), ("fp8", True)):
        progress(kind)
        x = make_payload(idx.shape[0], 128, kind, rank, finite=kind != "fp8")
        sync = buffer.dispatch(x, idx, w, num_experts, expert_major=expert_major, expert_alignment=8)
        got = buffer.dispatch(x, idx, w, num_experts, expert_major=expert_major, expert_alignment=8, async_op=True)
        assert got[3] == sync[3]  # counts are known when the call returns
        got[5].wait()
        for a, b in zip([*fields_of(got[0]), got[1], got[2]], [*fields_of(sync[0]), sync[1], sync[2]]):
            assert_bitwise(a, b, f"async dispatch {kind}")
        y = torch.randn(sync[4].num_rows, 128).bfloat16()
        want = buffer.combine(y, sync[4], sync[2])
        out = buffer.combine(y, got[4], got[2], async_op=True)
        out[2].wait()
        assert_bitwise(out[0], want[0], "async combine")
        assert_bitwise(out[1], want[1], "async combine weights")
    return True


def test_async_ops_match_sync_ops():
    assert all(run_workers(_async, 3, timeout=120))
