"""Buffer's ranks-per-node detection from the ranks' host names, exchanged as byte tensors on gloo."""

from __future__ import annotations

import socket

from dualflow.comm import Buffer
from tests.dist import run_workers


def _detected(rank, world):
    # Two "nodes" with host names of different lengths, one beyond DNS's limit (cut to the exchanged width),
    # numbered node by node, then interleaved.
    names = ["gpu-a", "gpu-node-" + "x" * 300]
    found = []
    for node in (rank // 2, rank % 2):
        socket.gethostname = lambda node=node: names[node]  # this worker process only
        found.append(Buffer(None, hidden=128, backend="torch").ranks_per_node)
    return found


def test_ranks_per_node_from_host_names():
    # Interleaved numbering cannot use the hierarchy: one flat all-to-all over the 4 ranks.
    assert run_workers(_detected, 4, timeout=120) == [[2, 4]] * 4
