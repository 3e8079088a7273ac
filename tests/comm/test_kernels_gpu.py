"""The kernels backend on GPUs (NCCL process groups): the torch backend's reference checks, bitwise
equality with the torch backend, every num_sms, async and autograd, and bounded waits."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dualflow.comm import Buffer
from dualflow.comm.kernels import CommTimeoutError, KernelConfig, kernels_usable
from tests.comm.cases import assert_bitwise, check_buffer, fields_of, gather
from tests.comm.reference import expected_receive
from tests.dist import progress, run_workers

NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
WORLD = min(NUM_GPUS, 8)
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
SMS = [2, 4, 8, 20, 24, 32]


def _kernels_buffer(hidden, num_sms=20, max_tokens=64, **config):
    buffer = Buffer(None, hidden, max_tokens_per_rank=max_tokens, num_sms=num_sms, backend="kernels",
                    kernel_config=KernelConfig(**config))
    assert buffer.backend == "kernels", buffer.describe()
    return buffer


def _reference_checks(rank, world, num_sms):
    torch.cuda.set_device(rank)
    return check_buffer(_kernels_buffer(128, num_sms))


def _routing(rank, world, tokens, num_experts, k):
    g = torch.Generator().manual_seed(100 + rank)
    idx = torch.rand(tokens, num_experts, generator=g).topk(k, dim=1).indices
    idx[torch.rand(tokens, k, generator=g) < 0.1] = -1
    idx[: tokens // 10] = -1  # tokens routed nowhere
    return idx, torch.rand(tokens, k, generator=g), g


def _versus_torch(rank, world, num_sms):
    """Every output of the kernels backend equals the torch backend's, bit for bit."""
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    hidden, num_experts, k, tokens = 2048, 8 * world, 8, 300 + 37 * rank
    kern = _kernels_buffer(hidden, num_sms, max_tokens=512)
    ref = Buffer(None, hidden, backend="torch")
    idx, w, g = _routing(rank, world, tokens, num_experts, k)
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    scales = torch.rand(tokens, hidden // 128, generator=g) + 0.5
    payloads = {"bf16": x, "fp8": (x.float().to(torch.float8_e4m3fn), scales)}
    idx_d, w_d = idx.to(dev), w.to(dev)
    for kind, payload in payloads.items():
        payload = tuple(t.to(dev) for t in payload) if isinstance(payload, tuple) else payload.to(dev)
        for em in (False, True):
            progress(f"{kind} expert_major={em}")
            a = kern.dispatch(payload, idx_d, w_d, num_experts, expert_major=em, expert_alignment=128)
            b = ref.dispatch(payload, idx_d, w_d, num_experts, expert_major=em, expert_alignment=128)
            for i, (u, v) in enumerate(zip([*fields_of(a[0]), a[1], a[2]], [*fields_of(b[0]), b[1], b[2]])):
                assert_bitwise(u, v, f"{kind} em={em} dispatch output {i}")
            assert a[3] == b[3] and a[4].expert_offsets == b[4].expert_offsets
            cached = kern.dispatch(payload, None, None, num_experts, handle=a[4], expert_major=em,
                                   expert_alignment=128)
            for u, v in zip(fields_of(cached[0]), fields_of(a[0])):
                assert_bitwise(u, v, f"{kind} em={em} cached dispatch")
            y = torch.randn(a[4].num_rows, hidden, generator=g).to(dev, torch.bfloat16)
            for weights in (None, a[2]):
                u, v = kern.combine(y, a[4], weights), ref.combine(y, b[4], weights)
                assert_bitwise(u[0], v[0], f"{kind} em={em} combine weighted={weights is not None}")
                if weights is not None:
                    assert_bitwise(u[1], v[1], f"{kind} em={em} combined weights")
                again = kern.combine(y, a[4], weights)
                assert_bitwise(again[0], u[0], "repeated combine")

    progress("source indices")
    handle = kern.dispatch(x.to(dev), idx_d, None, num_experts)[4]
    everyone = gather(idx)
    exp = expected_receive([[torch.zeros(len(i), 1)] for i in everyone], everyone, None, num_experts, rank)
    assert handle.route.recv_src_idx.cpu().tolist() == [t for _, t in exp.rows]

    progress("async")
    sync = kern.dispatch(x.to(dev), idx_d, w_d, num_experts)
    got = kern.dispatch(x.to(dev), idx_d, w_d, num_experts, async_op=True)
    got[5].wait()
    for u, v in zip(got[:3], sync[:3]):
        assert_bitwise(u, v, "async dispatch")
    out = kern.combine(sync[0], got[4], got[2], async_op=True)
    out[2].wait()
    assert_bitwise(out[0], kern.combine(sync[0], sync[4], sync[2])[0], "async combine")

    progress("autograd")
    grads = []
    for buffer in (kern, ref):
        xl = x.to(dev).requires_grad_()
        wl = w_d.clone().requires_grad_()
        recv_x, _, recv_w, _, h, _ = buffer.dispatch(xl, idx_d, wl, num_experts, expert_major=True,
                                                     expert_alignment=128)
        out = buffer.combine(recv_x * 3, h, recv_w)[0]
        (out.float() * torch.linspace(-1, 1, hidden, device=dev)).sum().backward()
        grads.append((xl.grad, wl.grad))
    assert_bitwise(grads[0][0], grads[1][0], "grad x")
    assert_bitwise(grads[0][1], grads[1][1], "grad weights")
    return True


def _timeouts(rank, world):
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    num_experts = 4 * world
    idx = torch.arange(64, device=dev)[:, None] % num_experts  # every rank sends rows to every rank
    layout = Buffer(None, 128, backend="torch").get_dispatch_layout(idx, num_experts)
    x = torch.ones(64, 128, dtype=torch.bfloat16, device=dev)
    messages = []
    # 1. Only rank 0 enters notify: it must give up waiting for rank 1's counts.
    buffer = _kernels_buffer(128, num_sms=4, timeout_s=1.0)
    if rank == 0:
        with pytest.raises(CommTimeoutError) as err:
            buffer._backend.dispatch([x.view(torch.uint8)], idx, layout, num_experts, None)
        messages.append(str(err.value))
        with pytest.raises(CommTimeoutError):  # the buffer stays unusable
            buffer._backend.check()
    dist.barrier()
    # 2. Both notify, only rank 0 runs the dispatch kernel: its receivers give up on rank 1's rows.
    buffer = _kernels_buffer(128, num_sms=4, timeout_s=1.0)
    route, _ = buffer._backend.notify(idx, layout, num_experts)
    if rank == 0:
        buffer._backend.send([x.view(torch.uint8)], idx, num_experts, route)
        with pytest.raises(CommTimeoutError) as err:
            buffer.synchronize()
        messages.append(str(err.value))
    dist.barrier()
    return messages


def _auto(rank, world):
    torch.cuda.set_device(rank)
    usable, why = kernels_usable(None, torch.device("cuda", rank))
    return Buffer(None, 128).backend, usable, why


@pytest.mark.multigpu
@pytest.mark.parametrize("num_sms", SMS)
def test_kernels_match_reference(num_sms):
    assert sum(run_workers(_reference_checks, WORLD, num_sms, backend="nccl", env=ENV, timeout=300)) > 0


@pytest.mark.multigpu
@pytest.mark.parametrize("num_sms", SMS)
def test_kernels_equal_torch_backend_bitwise(num_sms):
    assert all(run_workers(_versus_torch, WORLD, num_sms, backend="nccl", env=ENV, timeout=300))


@pytest.mark.gpu
def test_single_gpu_kernels_equal_torch_backend():
    assert run_workers(_versus_torch, 1, 20, backend="nccl", env=ENV, timeout=300) == [True]
    assert run_workers(_reference_checks, 1, 2, backend="nccl", env=ENV, timeout=300)[0] > 0


@pytest.mark.multigpu
def test_waits_are_bounded_and_name_rank_and_channel():
    messages = run_workers(_timeouts, 2, backend="nccl", env=ENV, timeout=120)[0]
    assert "rank 0 notify: notify (waiting for the peer's counts) from rank 1 timed out after 1 s" in messages[0]
    assert "rank 0 channel" in messages[1] and "dispatch receive" in messages[1] and "from rank 1" in messages[1]


@pytest.mark.multigpu
def test_auto_picks_kernels_on_an_nvlink_node():
    for backend, usable, why in run_workers(_auto, WORLD, backend="nccl", env=ENV, timeout=120):
        assert backend == ("kernels" if usable else "torch"), why
        assert usable, f"no NVLink between the GPUs of this node? {why}"
