"""Host side of ranks sharing one GPU (no GPU needed): the opt-in, the MPS fit rule, the CUDA IPC
bookkeeping, and set-up failures that every rank raises together (real gloo processes)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from dualflow import _cuda
from dualflow.comm import Buffer, peers, shared_gpu
from dualflow.comm import kernels as K
from dualflow.comm.payload import as_byte_rows, from_byte_rows
from dualflow.comm.shared_gpu import DeviceSharing
from tests.dist import run_workers

# -- the opt-in ---------------------------------------------------------------------------------------


def test_flag_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(shared_gpu.ENV, "1")
    assert shared_gpu.requested(None) is True
    assert shared_gpu.requested(False) is False
    monkeypatch.setenv(shared_gpu.ENV, "0")
    assert shared_gpu.requested(None) is False
    assert shared_gpu.requested(True) is True
    monkeypatch.delenv(shared_gpu.ENV)
    assert shared_gpu.requested(None) is False


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_environment_spellings_of_on(monkeypatch, value):
    monkeypatch.setenv(shared_gpu.ENV, value)
    assert shared_gpu.requested(None) is True


def test_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv(shared_gpu.ENV, "maybe")
    with pytest.raises(ValueError, match=r"DUALFLOW_COMM_SHARED_GPU='maybe': expected 1 .* or 0"):
        shared_gpu.requested(None)
    with pytest.raises(ValueError, match="shared_gpu must be True, False or None"):
        shared_gpu.requested(1)


# -- when the ranks' kernels fit ----------------------------------------------------------------------

H200 = 132


def _mps(n, limit=H200):
    return [DeviceSharing(sms=H200, mps=True, client_sms=limit)] * n


def _sliced(n):
    return [DeviceSharing(sms=H200, mps=False, client_sms=H200)] * n


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("num_sms", [2, 16, 20, 32, 64, 128])
def test_mps_needs_every_rank_resident_and_time_slicing_one(n, num_sms):
    # Independent statement of the rule in docs/comm_kernels.md: under MPS n x num_sms SMs, under time
    # slicing num_sms SMs (one rank's kernel at a time).
    assert (shared_gpu.problem(num_sms, _mps(n)) is None) == (n * num_sms <= H200)
    assert shared_gpu.problem(num_sms, _sliced(n)) is None


def test_refusal_says_what_fits():
    why = shared_gpu.problem(20, _mps(8))
    assert "8 x num_sms=20 = 160 SMs must be resident together" in why
    assert "the GPU has 132: pass num_sms <= 16" in why and "without MPS (time slicing)" in why
    why = shared_gpu.problem(34, _mps(4))
    assert "pass num_sms <= 32" in why


def test_client_limit_counts_for_the_whole_group():
    # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50: 66 SMs per client, which may all be the same 66.
    assert shared_gpu.problem(32, _mps(2, limit=66)) is None
    why = shared_gpu.problem(20, _mps(4, limit=66))
    assert "each client may use 66: pass num_sms <= 16" in why
    why = shared_gpu.problem(2, _mps(8, limit=10))
    assert "use at most 5 ranks with num_sms=2" in why


def test_sms_of_the_device_bound_one_kernel():
    assert "num_sms=134 exceeds the 132 SMs" in shared_gpu.problem(134, _sliced(2))


def test_mixed_mps_and_time_slicing_is_refused():
    mixed = [_mps(1)[0], _sliced(1)[0], _mps(1)[0]]
    assert "ranks [0, 2] are MPS clients and the others are not" in shared_gpu.problem(2, mixed)


# -- CUDA IPC bookkeeping -------------------------------------------------------------------------------


def _handle(r):
    return bytes([r + 1]) * peers.IPC_HANDLE_BYTES


class _Opener:
    """Stands in for cudaIpcOpenMemHandle: a fixed address per handle, failing on the ones listed."""

    def __init__(self, failing=()):
        self.opened, self.closed, self.failing = [], [], set(failing)

    def open(self, handle):
        if handle in self.failing:
            raise _cuda.CudaLibraryError("dualflow_comm_ipc_open failed: invalid resource handle")
        ptr = 0x10000 * handle[0]
        self.opened.append(ptr)
        return ptr

    def close(self, ptr):
        self.closed.append(ptr)


@pytest.mark.parametrize("n,rank", [(1, 0), (2, 0), (2, 1), (8, 5)])
def test_own_buffer_by_pointer_and_the_others_opened_in_rank_order(n, rank):
    handles = [_handle(r) for r in range(n)]
    opener = _Opener()
    ptrs, opened = peers.map_handles(handles, rank, 0xABC00, handles[rank], opener.open, opener.close)
    assert ptrs == [0xABC00 if r == rank else 0x10000 * (r + 1) for r in range(n)]
    assert opened == opener.opened == [p for r, p in enumerate(ptrs) if r != rank]  # N-1, never its own
    assert opener.closed == []


def test_a_failed_open_closes_what_was_opened():
    handles = [_handle(r) for r in range(4)]
    opener = _Opener(failing=[handles[3]])
    with pytest.raises(_cuda.CudaLibraryError, match="invalid resource handle"):
        peers.map_handles(handles, 1, 0xABC00, handles[1], opener.open, opener.close)
    assert opener.opened == [0x10000, 0x30000] and opener.closed == opener.opened


@pytest.mark.parametrize("change,message", [
    (lambda h: h.__setitem__(2, h[2][:-1]), "handle of rank 2 has 63 bytes, expected 64"),
    (lambda h: h.__setitem__(2, bytes(64)), "rank 2 exported no buffer"),
    (lambda h: h.__setitem__(0, _handle(9)), "not the one this rank exported"),
    (lambda h: h.__setitem__(3, h[2]), "two ranks exported the same CUDA IPC handle"),
])
def test_inconsistent_handles_are_refused_before_opening(change, message):
    handles = [_handle(r) for r in range(4)]
    own = handles[0]
    change(handles)
    opener = _Opener()
    with pytest.raises(ValueError, match=message):
        peers.map_handles(handles, 0, 0xABC00, own, opener.open, opener.close)
    assert opener.opened == []


# -- failures every rank raises together (real gloo processes) -------------------------------------------


def _agree_case(rank, world, case):
    values = {"hidden": 128, "KernelConfig.fp8": case == "mismatch" and rank == 1}
    problem = "out of memory" if case == "problem" and rank == world - 1 else None
    try:
        peers.agree(None, "set-up", problem, values, error=RuntimeError if case == "problem" else ValueError)
        outcome = None
    except (ValueError, RuntimeError) as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    t = torch.ones(1)
    dist.all_reduce(t)  # the group is still usable afterwards
    return outcome, t.item()


@pytest.mark.parametrize("world", [3])
def test_agreement_fails_on_every_rank_with_one_message(world):
    ok = run_workers(_agree_case, world, "ok")
    assert ok == [(None, world)] * world
    mismatch = run_workers(_agree_case, world, "mismatch")
    want = [False, True] + [False] * (world - 2)
    assert {m for m, _ in mismatch} == {f"ValueError: set-up: ranks of the group disagree on KernelConfig.fp8: {want} "
                                        "(by rank); every rank must pass the same KernelConfig.fp8"}
    problem = run_workers(_agree_case, world, "problem")
    assert {m for m, _ in problem} == {f"RuntimeError: set-up failed on 1 of {world} ranks, so on every rank: "
                                       f"rank {world - 1}: out of memory"}


def _backend_setup(rank, world, case):
    """KernelBackend on gloo ranks without a GPU: its agreement comes before the first CUDA call."""
    big = 1 << 40
    config = K.KernelConfig(max_buffer_bytes=big)
    max_tokens = 64
    if case == "fp8":
        config = K.KernelConfig(fp8=rank == 1, max_buffer_bytes=big)
    elif case == "tokens":
        max_tokens = 64 + 32 * (rank == 1)
    elif case == "too big":
        config = K.KernelConfig(max_buffer_bytes=4096 if rank == 1 else big)
    try:
        K.KernelBackend(None, torch.device("cpu"), 128, max_tokens, 4, config)
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.mark.parametrize("case,message", [
    ("fp8", "ValueError: kernels backend set-up: ranks of the group disagree on KernelConfig.fp8: [False, True]"),
    ("tokens", "ValueError: kernels backend set-up: ranks of the group disagree on max_tokens_per_rank: [64, 96]"),
    ("too big", "ValueError: kernels backend set-up failed on 1 of 2 ranks, so on every rank: rank 1: the kernels "
                "backend needs"),
])
def test_mismatched_kernel_configuration_fails_on_every_rank_before_allocating(lib, case, message):
    outcomes = run_workers(_backend_setup, 2, case, timeout=60)
    assert outcomes[0] == outcomes[1] and outcomes[0].startswith(message), outcomes


def _allocate(rank, world, nbytes):
    try:
        K._PeerBuffers(None, nbytes[rank], torch.device("cpu"), torch.device("cpu"), ipc_only=True)
    except RuntimeError as exc:
        return str(exc)
    return None


def test_a_failed_allocation_raises_on_every_rank_not_a_hang(lib):
    if torch.cuda.is_available():
        pytest.skip("allocates for real where a GPU is visible; the gpu tier covers that path")
    # Rank 1 asks for 0 bytes (refused before any CUDA call), rank 0 for 4 KiB (no device here).
    outcomes = run_workers(_allocate, 2, [4096, 0], timeout=60)
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0].startswith("allocating the kernels' buffers failed on 2 of 2 ranks, so on every rank: "
                                  "rank 0: allocating 4096 bytes: dualflow_comm_ipc_alloc failed"), outcomes
    assert "rank 1: allocating 0 bytes: dualflow_comm_ipc_alloc failed (status 1): " \
           "dualflow_comm_ipc_alloc: bad arguments" in outcomes[0]


def _buffer_case(rank, world, flags):
    try:
        Buffer(None, 128, shared_gpu=flags[rank])
    except ValueError as exc:
        return str(exc)
    return None


def test_shared_gpu_without_cuda_fails_on_every_rank():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    both = run_workers(_buffer_case, 2, [True, True], timeout=60)
    assert all("shared_gpu: this process sees no CUDA device" in m for m in both), both
    mixed = run_workers(_buffer_case, 2, [True, False], timeout=60)
    assert "sees no CUDA device" in mixed[0] and "other ranks of the group rejected their arguments" in mixed[1]


def _env_case(rank, world, value):
    os.environ[shared_gpu.ENV] = value
    try:
        buffer = Buffer(None, 128)
    except ValueError as exc:
        return str(exc)
    return buffer.device.type, buffer.shared_gpu


def test_environment_opt_in_is_checked_on_every_rank():
    bad = run_workers(_env_case, 2, "perhaps", timeout=60)
    assert "DUALFLOW_COMM_SHARED_GPU='perhaps'" in bad[0] and "rejected their arguments" in bad[1]
    assert run_workers(_env_case, 2, "0", timeout=60) == [("cpu", False)] * 2


def test_device_sharing_query_fails_cleanly_without_a_device(lib):
    with pytest.raises(_cuda.CudaLibraryError, match="out is NULL"):
        K._call("dualflow_comm_device_sharing", 0, 0)
    if not torch.cuda.is_available():
        with pytest.raises(_cuda.CudaLibraryError, match="dualflow_comm_device_sharing failed"):
            K.device_sharing(torch.device("cuda", 0))


# -- found by the shared-GPU tier's routings (top-1, a rank receiving nothing), fixed in dualflow.comm.payload --


def test_byte_rows_of_a_column_with_any_last_stride():
    column = torch.where(torch.zeros(0, 1, dtype=torch.bool), torch.zeros(0, 1), 0.0)  # strides (1, 0)
    assert column.stride() == (1, 0) and as_byte_rows(column).shape == (0, 4)
    x = torch.arange(12.0).view(4, 3)
    assert torch.equal(from_byte_rows(as_byte_rows(x[:, 1:2]), torch.float32), x[:, 1:2])
    assert as_byte_rows(x).data_ptr() == x.data_ptr()  # no copy when already contiguous


def _top1_to_rank0(rank, world):
    buffer = Buffer(None, 8, backend="torch")
    g = torch.Generator().manual_seed(rank)
    x, w = torch.randn(5 + rank, 8, generator=g), torch.rand(5 + rank, 1, generator=g)
    idx = torch.zeros(5 + rank, 1, dtype=torch.int64)  # top-1, expert 0: the other ranks receive nothing
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, idx, w, 2 * world)
    out, out_w, _ = buffer.combine(recv_x, handle, recv_w)
    return recv_x.shape[0], torch.equal(out, x * w), torch.equal(out_w, w)


def test_weighted_top1_combine_with_ranks_receiving_nothing():
    assert run_workers(_top1_to_rank0, 3, timeout=60) == [(18, True, True), (0, True, True), (0, True, True)]
