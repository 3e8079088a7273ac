"""Host side of the comm kernels through the C ABI (no GPU): sizing, channel partition, routing
arithmetic and prefix matrices (checked against the torch backend's counts), argument validation."""

from __future__ import annotations

import ctypes
import itertools
import os

import pytest
import torch
import torch.distributed as dist

from dualflow import _cuda
from dualflow.comm import Buffer, get_dispatch_layout
from dualflow.comm import kernels as K
from tests.comm.cases import make_routing
from tests.dist import run_workers


def test_sizing_struct_matches_the_library(lib):
    size = ctypes.c_int64()
    K._call("dualflow_comm_sizing_bytes", ctypes.byref(size))
    assert size.value == ctypes.sizeof(K.Sizing)


def _expected_size(hidden, max_tokens, topk, ranks, num_sms, fp8):
    """The sizing of docs/comm_kernels.md, recomputed independently."""
    pad = lambda n: -(-n // 16) * 16  # noqa: E731
    region = lambda n: -(-n // 256) * 256  # noqa: E731
    channels = num_sms // 2
    per_channel = -(-max_tokens // channels)
    slots = min(128, max(32, -(-per_channel // 32) * 32))
    slot = pad(hidden * (2 if fp8 else 4)) + pad(4 * topk) + pad(8 * topk) + 16
    control = (region(8 * ranks) + region(4 * 2 * ranks * (channels + K.MAX_LOCAL_EXPERTS))
               + 2 * region(8 * ranks * channels) + region(16 * ranks * channels) + region(8))
    return channels, slots, slot, control + ranks * channels * slots * slot


@pytest.mark.parametrize("args", [(7168, 4096, 8, 8, 20, True), (7168, 4096, 8, 8, 24, False),
                                  (128, 10, 1, 2, 2, False), (4096, 700, 6, 4, 32, True), (8, 1, 32, 1, 128, False)])
def test_buffer_size_follows_the_documented_layout(lib, args):
    s = K.buffer_size(*args)
    channels, slots, slot, total = _expected_size(*args)
    assert (s.num_channels, s.num_slots, s.slot_bytes, s.total_bytes) == (channels, slots, slot, total)
    assert s.rings_offset % 256 == 0 and s.slot_bytes % 16 == 0
    offsets = [s.flags_offset, s.counts_offset, s.tails_offset, s.heads_offset, s.progress_offset, s.error_offset,
               s.rings_offset]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)


def test_deepep_setting_size(lib):
    s = K.buffer_size(7168, 4096, 8, 8, 20, True)
    assert s.num_slots == 128 and s.slot_bytes == 14336 + 32 + 64 + 16
    assert s.total_bytes < 200 * 2**20  # about 148 MiB per rank


@pytest.mark.parametrize("args,message", [
    ((7168, 4096, 8, 8, 21, True), "num_sms must be even"),
    ((7168, 4096, 8, 8, 0, True), "num_sms must be even"),
    ((7168, 4096, 8, 8, 130, True), "in [2, 128]"),
    ((7168, 4096, 8, 9, 20, True), "1 to 8 ranks"),
    ((7168, 4096, 33, 8, 20, True), "top-k must be in [1, 32]"),
    ((100, 4096, 8, 8, 20, False), "multiple of 8"),
    ((136, 4096, 8, 8, 20, True), "multiple of 128"),
    ((7168, 0, 8, 8, 20, True), "max_tokens"),
])
def test_buffer_size_rejects_invalid_configurations(lib, args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        K.buffer_size(*args)


def test_buffer_size_says_when_it_does_not_fit(lib):
    need = K.buffer_size(7168, 4096, 8, 8, 20, False).total_bytes
    with pytest.raises(ValueError, match=f"needs {need} bytes per rank.*more than the {need - 1} allowed"):
        K.buffer_size(7168, 4096, 8, 8, 20, False, max_bytes=need - 1)
    assert K.buffer_size(7168, 4096, 8, 8, 20, False, max_bytes=need).total_bytes == need


@pytest.mark.parametrize("tokens", [0, 1, 7, 64, 4097])
@pytest.mark.parametrize("channels", [1, 3, 10, 64])
def test_channel_ranges_partition_tokens(lib, tokens, channels):
    ranges = [K.channel_range(tokens, channels, c) for c in range(channels)]
    assert ranges[0][0] == 0 and ranges[-1][1] == tokens
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # contiguous, in order
    sizes = [e - b for b, e in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # balanced, larger first


def test_channel_range_rejects_bad_channel(lib):
    with pytest.raises(_cuda.CudaLibraryError, match="0 <= channel < num_channels"):
        K.channel_range(10, 4, 4)


@pytest.mark.parametrize("tokens,experts,ranks,k,channels", [(0, 8, 2, 2, 2), (1, 4, 4, 1, 10), (97, 32, 8, 8, 10),
                                                             (300, 12, 3, 4, 7)])
def test_layout_host_matches_torch_layout_and_loops(lib, tokens, experts, ranks, k, channels):
    g = torch.Generator().manual_seed(tokens)
    idx = torch.randint(-1, experts, (tokens, k), generator=g)
    host = K.layout_host(idx, experts, ranks, channels)
    ref = get_dispatch_layout(idx, experts, ranks)
    assert torch.equal(host["num_tokens_per_rank"].long(), ref.num_tokens_per_rank)
    assert torch.equal(host["num_tokens_per_expert"].long(), ref.num_tokens_per_expert)
    assert torch.equal(host["is_token_in_rank"].bool(), ref.is_token_in_rank)
    counts = torch.zeros(ranks, channels, dtype=torch.int32)
    for c in range(channels):
        b, e = K.channel_range(tokens, channels, c)
        for r in range(ranks):
            rows = [t for t in range(b, e) if ref.is_token_in_rank[t, r]]
            counts[r, c] = len(rows)
            for i, t in enumerate(rows):
                assert host["send_pos"][t, r] == i
    assert torch.equal(host["channel_counts"], counts)
    assert bool((host["send_pos"][~ref.is_token_in_rank] == -1).all())


def test_layout_host_rejects_bad_expert_ids(lib):
    with pytest.raises(_cuda.CudaLibraryError, match=r"expert index 8 of token 0 outside \[-1, 8\)"):
        K.layout_host(torch.tensor([[8, 1]]), 8, 2, 2)


def _prefix_vs_torch(rank, world, channels):
    """Prefix matrices from the library's host arithmetic against a real torch-backend dispatch."""
    num_experts = 2 * world
    idx, w = make_routing(rank, world, "random", num_experts, 3, seed=21)
    host = K.layout_host(idx, num_experts, world, channels)
    mine = host["channel_counts"]  # [dest, C]: what this rank sends each destination per channel
    got = torch.empty_like(mine)
    dist.all_to_all_single(got, mine)  # row s: what source s sends this rank per channel
    prefix = K.recv_prefix_host(got)
    buffer = Buffer(None, 8, backend="torch")
    x = torch.arange(idx.shape[0], dtype=torch.float32)[:, None].repeat(1, 8) + 1000 * rank
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, idx, w, num_experts)
    recv = handle.route.recv_counts
    assert prefix[-1].item() == sum(recv) == recv_x.shape[0]
    for s in range(world):
        assert prefix[(s + 1) * channels] - prefix[s * channels] == recv[s], (s, prefix.tolist(), recv)
    # Row prefix[s*C + c] + i holds a token of source s from channel c: the kernels' placement reproduces
    # the torch backend's (source rank, source token) order.
    tokens = [None] * world
    dist.all_gather_object(tokens, idx.shape[0])
    for s in range(world):
        for c in range(channels):
            lo, hi = K.channel_range(tokens[s], channels, c)
            for row in range(prefix[s * channels + c], prefix[s * channels + c + 1]):
                src, tok = divmod(int(recv_x[row, 0]), 1000)
                assert src == s and lo <= tok < hi, (row, src, tok, s, c)
    return True


@pytest.mark.parametrize("world,channels", [(2, 3), (4, 10)])
def test_recv_prefix_matches_torch_backend_counts(lib, world, channels):
    assert all(run_workers(_prefix_vs_torch, world, channels, timeout=120))


# -- argument validation of the kernel entry points: checked on the host before anything is launched --

FAKE = 1 << 20  # 256-byte aligned, never dereferenced: every call below fails before touching the GPU


def _sizing():
    return K.buffer_size(256, 64, 4, 2, 4, False)


def _peers(n=2):
    return K._array(ctypes.c_size_t, [FAKE * (r + 1) for r in range(n)])


def _notify(s, rank=0, tokens=8, topk=4, experts=8, epoch=1, error=FAKE, peers=None):
    K._call("dualflow_comm_notify", ctypes.byref(s), peers or _peers(), rank, FAKE, FAKE, tokens, topk, experts, epoch,
            FAKE, FAKE, 10**9, error, 0)


def _dispatch(s, bytes_=(512,), topk_idx=FAKE, topk=4, tokens=8):
    n = len(bytes_)
    K._call("dualflow_comm_dispatch", ctypes.byref(s), _peers(), 0, tokens, FAKE, FAKE, n,
            K._array(ctypes.c_size_t, [FAKE] * n), K._array(ctypes.c_size_t, [FAKE] * n),
            K._array(ctypes.c_int64, list(bytes_)), topk_idx, topk, 4, FAKE, FAKE, FAKE, 10**9, FAKE, 0)


def _combine(s, width=256, elem=2, weights=FAKE, topk=4):
    K._call("dualflow_comm_combine", ctypes.byref(s), _peers(), 0, 8, FAKE, FAKE, FAKE, width, elem, weights, topk,
            FAKE, FAKE, 10**9, FAKE, 0)


@pytest.mark.parametrize("call,message", [
    (lambda s: _notify(s, rank=2), r"rank 2 outside \[0, 2\)"),
    (lambda s: _notify(s, tokens=65), "65 tokens, the buffer was sized for at most 64"),
    (lambda s: _notify(s, experts=7), "num_experts=7 must be a multiple of 2 ranks"),
    (lambda s: _notify(s, experts=2 * 513), "at most 512 per rank"),
    (lambda s: _notify(s, epoch=0), "epoch starts at 1"),
    (lambda s: _notify(s, error=0), "error record"),
    (lambda s: _notify(s, peers=K._array(ctypes.c_size_t, [FAKE, FAKE + 8])), "not 256-byte aligned"),
    (lambda s: _dispatch(s, bytes_=(510,)), "expected a multiple of 4"),
    (lambda s: _dispatch(s, bytes_=(1024, 64)), r"a message of \d+ bytes does not fit the \d+-byte ring slots"),
    (lambda s: _dispatch(s, bytes_=(4,) * 5), r"num_fields must be in \[0, 4\]"),
    (lambda s: _dispatch(s, topk=33), r"topk must be in \[0, 32\]"),
    (lambda s: _dispatch(s, topk_idx=0), "topk_idx when topk > 0"),
    (lambda s: _combine(s, elem=3), "elem_bytes must be 2"),
    (lambda s: _combine(s, width=4), "not a multiple of 16 bytes"),
    (lambda s: _combine(s, width=512, elem=4), "does not fit"),
    (lambda s: _combine(s, topk=33), r"topk must be in \[0, 32\]"),
])
def test_kernel_entry_points_validate_arguments(lib, call, message):
    with pytest.raises(_cuda.CudaLibraryError, match=message):
        call(_sizing())


def test_kernel_config_is_validated():
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        K.KernelConfig(timeout_s=0)
    with pytest.raises(ValueError, match=r"max_topk must be in \[1, 32\]"):
        K.KernelConfig(max_topk=40)


def test_multicast_is_forbidden(monkeypatch):
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "0")
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    K.forbid_multicast()
    assert os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and os.environ["NCCL_NVLS_ENABLE"] == "0"


def _kernels_on_gloo(rank, world):
    try:
        Buffer(None, 128, backend="kernels")
    except ValueError as exc:
        return str(exc)
    return None


def test_kernels_backend_refused_on_every_rank_without_cuda():
    for msg in run_workers(_kernels_on_gloo, 2, timeout=60):
        assert msg is not None and "cannot run here" in msg and "not a CUDA (NCCL) process group" in msg
