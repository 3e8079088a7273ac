"""Inputs and checks shared by the comm tests (torch backend on gloo, kernels backend on GPUs).

:func:`check_buffer` runs inside every rank: it builds adversarial inputs, gathers every rank's inputs
and outputs, and compares each output with tests/comm/reference.py.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from dualflow.comm import Buffer
from tests.comm.reference import expected_combine, expected_receive, expert_major_fields
from tests.dist import progress

KINDS = ("bf16", "fp32", "fp8")
SCENARIOS = ("random", "no_expert", "imbalance", "idle_rank")
ALIGN = 4


def make_routing(rank: int, world: int, scenario: str, num_experts: int, k: int, seed: int):
    """``(topk_idx [T, k], topk_weights [T, k])`` for this rank; T differs between ranks (0 for some)."""
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    num_tokens = int(torch.randint(0, 11, (1,), generator=g)) if rank % 3 else (0 if scenario == "idle_rank" else 6)
    idx = torch.randint(-1, num_experts, (num_tokens, k), generator=g)  # -1 entries and duplicate experts included
    if scenario == "no_expert":  # most tokens routed nowhere
        idx[torch.rand(num_tokens, generator=g) < 0.6] = -1
    elif scenario == "imbalance":  # every token to expert 0: rank 0 receives everything, the others nothing
        idx = torch.where(torch.rand(num_tokens, k, generator=g) < 0.8, 0, -1)
        idx[:, 0] = 0
    elif scenario == "idle_rank":  # the last rank hosts no chosen expert and receives nothing
        idx = torch.randint(-1, num_experts - num_experts // world, (num_tokens, k), generator=g)
    weights = torch.rand(num_tokens, k, generator=g) * 2 - 0.5
    return idx, weights


def make_payload(num_tokens: int, hidden: int, kind: str, seed: int, finite: bool):
    """A payload of ``kind``. Not ``finite``: arbitrary bit patterns (NaN, Inf, -0 included) to test copies."""
    g = torch.Generator().manual_seed(seed)
    if kind == "fp8" or not finite:
        bits = torch.randint(0, 256, (num_tokens, hidden * (1 if kind == "fp8" else 2 if kind == "bf16" else 4)),
                             generator=g, dtype=torch.int32).to(torch.uint8)
        data = bits.view({"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp32": torch.float32}[kind])
        if kind != "fp8":
            return data
        scales = torch.randint(0, 256, (num_tokens, hidden // 128 * 4), generator=g, dtype=torch.int32)
        return data, scales.to(torch.uint8).view(torch.float32)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    mag = torch.exp2(torch.randint(-12, 12, (num_tokens, 1), generator=g).float())  # wide dynamic range
    x = torch.randn(num_tokens, hidden, generator=g) * mag
    x[:, :2] = torch.tensor([0.0, -0.0])
    return x.to(dtype)


def fields_of(x) -> list[torch.Tensor]:
    return list(x) if isinstance(x, tuple) else [x]


def to(x, device):
    return tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)


def gather(obj, group=None) -> list:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def assert_bitwise(got, want, what: str) -> None:
    """Equal bytes. Holds on any machine: dispatch copies bytes, and combine's sums are elementwise FP32
    additions and products in the order the reference performs them (each one correctly rounded)."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{what}: {got.dtype} {list(got.shape)} != {want.dtype} {list(want.shape)}"
    if got.dtype.is_floating_point or got.dtype == torch.float8_e4m3fn:
        got, want = got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
    assert torch.equal(got, want), f"{what}: differs in {(got != want).sum().item()} elements"


def check_buffer(buffer: Buffer, scenarios=SCENARIOS, kinds=KINDS, seed: int = 0, exact_combine: bool = True,
                 num_experts_per_rank: int = 2, k: int = 3) -> int:
    """All dispatch/combine checks on ``buffer``; returns the number of rows this rank received."""
    group, me, world = buffer.group, buffer.rank, buffer.num_ranks
    device, hidden = buffer.device, buffer.hidden
    num_experts = num_experts_per_rank * world
    received = 0
    for case, (scenario, kind) in enumerate((s, kd) for s in scenarios for kd in kinds):
        progress(f"{scenario}/{kind}")
        s = seed * 100 + case
        idx, w = make_routing(me, world, scenario, num_experts, k, s)
        x = make_payload(idx.shape[0], hidden, kind, s * 31 + me, finite=False)
        x2 = make_payload(idx.shape[0], hidden, kind, s * 37 + me + 1, finite=False)
        # FP8 tensors do not pickle: gather bytes and view them back.
        dtypes = [f.dtype for f in fields_of(x)]
        everyone = gather(([f.view(torch.uint8) for f in fields_of(x)], [f.view(torch.uint8) for f in fields_of(x2)],
                           idx, w), group)
        xs = [[f.view(dt) for f, dt in zip(e[0], dtypes)] for e in everyone]
        x2s = [[f.view(dt) for f, dt in zip(e[1], dtypes)] for e in everyone]
        exp = expected_receive(xs, [e[2] for e in everyone], [e[3] for e in everyone], num_experts, me, ALIGN)
        exp2 = expected_receive(x2s, [e[2] for e in everyone], None, num_experts, me, ALIGN)
        idx_d, w_d, x_d = idx.to(device), w.to(device), to(x, device)

        # Plain dispatch, bitwise against the reference; repeated call bitwise identical.
        out = buffer.dispatch(x_d, idx_d, w_d, num_experts)
        recv_x, recv_idx, recv_w, counts, handle, work = out
        assert work is None
        for i, (got, want) in enumerate(zip(fields_of(recv_x), exp.fields)):
            assert_bitwise(got, want, f"{scenario}/{kind} recv_x field {i}")
        assert_bitwise(recv_idx, exp.topk_idx, f"{scenario}/{kind} recv_topk_idx")
        assert_bitwise(recv_w, exp.weights, f"{scenario}/{kind} recv_topk_weights")
        assert counts == exp.counts, (counts, exp.counts)
        again = buffer.dispatch(x_d, idx_d, w_d, num_experts, layout=buffer.get_dispatch_layout(idx_d, num_experts))
        for a, b in zip([*fields_of(again[0]), again[1], again[2]], [*fields_of(recv_x), recv_idx, recv_w]):
            assert_bitwise(a, b, f"{scenario}/{kind} repeated dispatch")
        received += len(exp.rows)

        # Cached dispatch of another payload along the same routing (with and without topk_idx).
        for ids in (None, idx_d):
            cached = buffer.dispatch(to(x2, device), ids, None, num_experts, handle=handle)
            for got, want in zip(fields_of(cached[0]), exp2.fields):
                assert_bitwise(got, want, f"{scenario}/{kind} cached dispatch")
            assert cached[2] is None and cached[3] == exp.counts

        # Expert-major layout: per-expert segments padded to ALIGN, offsets as the reference says.
        em = buffer.dispatch(x_d, idx_d, w_d, num_experts, expert_major=True, expert_alignment=ALIGN)
        em_x, _, em_w, em_counts, em_handle, _ = em
        for i, (got, want) in enumerate(zip(fields_of(em_x), expert_major_fields(exp))):
            assert_bitwise(got, want, f"{scenario}/{kind} expert-major field {i}")
        assert em_counts == [-(-c // ALIGN) * ALIGN for c in exp.counts]
        assert em_handle.expert_offsets == exp.offsets, (em_handle.expert_offsets, exp.offsets)
        assert em_handle.expert_layout.rows.cpu().tolist() == exp.em_rows

        # Combine: BF16 rows for FP8 payloads (as in training), the received rows themselves otherwise.
        finite = make_payload(idx.shape[0], hidden, "fp32" if kind == "fp32" else "bf16", s * 41 + me, finite=True)
        fx = buffer.dispatch(finite.to(device), idx_d, w_d, num_experts)[0]
        fx_em = buffer.dispatch(finite.to(device), None, w_d, num_experts, handle=em_handle,
                                expert_major=True, expert_alignment=ALIGN)[0]
        tag = f"{scenario}/{kind}"
        _check_combine(buffer, finite, idx, w, fx, handle, recv_w, exp, False, exact_combine, tag)
        _check_combine(buffer, finite, idx, w, fx_em, em_handle, em_w, exp, True, exact_combine, tag + " em")
    return received


def _check_combine(buffer, x, idx, w, y, handle, recv_w, exp, expert_major, exact, what):
    group, me = buffer.group, buffer.rank
    local = (idx >= 0).float()
    copies = local.sum(-1, keepdim=True) if expert_major else None
    everyone = gather((y.cpu(), recv_w.cpu(), dataclasses.replace(exp, fields=[])), group)
    ys, ws, exps = [e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone]
    for weighted in (False, True):
        out, out_w, work = buffer.combine(y, handle, topk_weights=recv_w if weighted else None)
        assert work is None
        out = out.cpu()
        tag = f"{what} {'weighted' if weighted else 'unweighted'} combine"
        if exact:  # bitwise: FP32 sums in ascending rank order, as the reference does them
            want, want_w = expected_combine(exps, ys, ws if weighted else None, me, x.shape[0], expert_major)
            assert_bitwise(out, want, tag)
            if weighted:
                assert_bitwise(out_w.cpu(), want_w, tag + " weights")
        # x times the number of copies (ranks, or (rank, slot) pairs when expert-major), or the sum of weights,
        # within the rounding of the payload's dtype (FP32 accumulation, one rounding per contribution).
        dests = torch.tensor([sum(1 for e in exps if (me, t) in set(e.rows)) for t in range(x.shape[0])],
                             dtype=torch.float32).view(-1, 1)
        scale = (w * local).sum(-1, keepdim=True) if weighted else (copies if expert_major else dests)
        scale_abs = (w.abs() * local).sum(-1, keepdim=True) if weighted else scale
        err = (out.float() - x.float() * scale).abs()
        eps = 2 ** -23 if x.dtype == torch.float32 else 2 ** -8
        bound = 4 * eps * x.float().abs() * scale_abs
        assert bool((err <= bound).all()), f"{tag}: max error {float((err - bound).max())} above FP32/BF16 rounding"
        if weighted:
            assert_bitwise(out_w.cpu(), torch.where(idx >= 0, w, 0.0) + 0.0, tag + " weights")
        again = buffer.combine(y, handle, topk_weights=recv_w if weighted else None)
        assert_bitwise(again[0], out, tag + " repeated")
