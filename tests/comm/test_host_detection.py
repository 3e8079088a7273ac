"""Buffer's ranks-per-node detection from the ranks' host names, exchanged as byte tensors on gloo."""

from __future__ import annotations

import socket

import pytest

from dualflow.comm import Buffer
from tests.dist import run_workers


def _detected(rank, world, numbering):
    # Host names of several lengths, the longest beyond DNS's limit (it is cut to the exchanged width).
    node = rank // 2 if numbering == "node by node" else rank % 2
    name = ["gpu-a", "gpu-node-" + "x" * 300][node]
    socket.gethostname = lambda: name  # this worker process only
    return Buffer(None, hidden=128, backend="torch").ranks_per_node


@pytest.mark.parametrize("numbering,expected", [("node by node", 2), ("interleaved", 4)])
def test_ranks_per_node_from_host_names(numbering, expected):
    # Interleaved numbering cannot use the hierarchy: one flat all-to-all over the 4 ranks.
    assert run_workers(_detected, 4, numbering, timeout=120) == [expected] * 4
