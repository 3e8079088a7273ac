"""One intra-op thread in the test process: the tiny models of these tests run slower with more (thread
start-up and spinning cost more than their kernels, worse on a loaded machine). Workers of run_workers
already use one."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
