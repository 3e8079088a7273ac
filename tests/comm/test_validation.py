"""Bad input fails on every rank with a ValueError naming the problem, before any payload moves."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dualflow.comm import Buffer
from tests.dist import progress, run_workers

HIDDEN, K, BAD = 128, 2, 1


def _inputs(rank, world, num_experts):
    g = torch.Generator().manual_seed(rank)
    idx = torch.randint(-1, num_experts, (5 + rank, K), generator=g)
    return torch.randn(5 + rank, HIDDEN), idx, torch.rand(5 + rank, K, generator=g)


def _fp8(x):
    return x.to(torch.float8_e4m3fn), torch.ones(x.shape[0], HIDDEN // 128)


# name -> (rank(s) that go wrong, expected text on them, the bad call). The call gets c with c.b the buffer,
# c.o = (another buffer, a handle of it), c.x/c.i/c.w valid inputs, c.E the expert count, c.h a valid handle,
# c.r the rank.
CASES = {
    "expert above range": (BAD, "expert index outside [-1, num_experts=6)",
                           lambda c: c.b.dispatch(c.x, c.i.clone().fill_(c.E), c.w, c.E)),
    "expert below -1": (BAD, "values in [-2,", lambda c: c.b.dispatch(c.x, c.i.clone().fill_(-2), c.w, c.E)),
    "experts not divisible": (None, "not divisible by the group size 3",
                              lambda c: c.b.dispatch(c.x, c.i.clamp(max=3), c.w, 4)),
    "topk_idx dtype": (BAD, "topk_idx must be an int64", lambda c: c.b.dispatch(c.x, c.i.int(), c.w, c.E)),
    "token count": (BAD, "topk_idx has", lambda c: c.b.dispatch(c.x[:-1], c.i, c.w, c.E)),
    "weights shape": (BAD, "topk_weights must be float32", lambda c: c.b.dispatch(c.x, c.i, c.w[:, :1], c.E)),
    "weights dtype": (BAD, "topk_weights must be float32", lambda c: c.b.dispatch(c.x, c.i, c.w.half(), c.E)),
    "payload dtype": (BAD, "x must be bfloat16 or float32", lambda c: c.b.dispatch(c.x.half(), c.i, c.w, c.E)),
    "payload width": (BAD, "hidden=128", lambda c: c.b.dispatch(c.x[:, :64], c.i, c.w, c.E)),
    "fp8 scales shape": (BAD, "scales must be [num_tokens, hidden/128]",
                         lambda c: c.b.dispatch((_fp8(c.x)[0], torch.ones(c.x.shape[0], 2)), c.i, c.w, c.E)),
    "fp8 scales dtype": (BAD, "scales must be float32",
                         lambda c: c.b.dispatch((_fp8(c.x)[0], _fp8(c.x)[1].double()), c.i, c.w, c.E)),
    "fp8 hidden": (None, "multiple of 128",
                   lambda c: c.o[0].dispatch((c.x[:, :64].to(torch.float8_e4m3fn), c.x[:, :0]), c.i, c.w, c.E)),
    "handle of another buffer": (BAD, "made by another Buffer",
                                 lambda c: c.b.dispatch(c.x, None, c.w, c.E, handle=c.o[1])),
    "handle of another routing": (BAD, "another routing",
                                  lambda c: c.b.dispatch(c.x, (c.i + 1) % c.E, c.w, c.E, handle=c.h)),
    "handle other token count": (BAD, "another routing",
                                 lambda c: c.b.dispatch(c.x[:-1], None, None, c.E, handle=c.h)),
    "handle with other flags": (BAD, "the handle was made with",
                                lambda c: c.b.dispatch(c.x, None, c.w, c.E, handle=c.h, expert_alignment=4)),
    "combine rows": (BAD, "combine input y must be", lambda c: c.b.combine(c.x, c.h)),
    "combine weights": (BAD, "combine topk_weights must be",
                        lambda c: c.b.combine(torch.zeros(c.h.num_rows, HIDDEN), c.h, c.w)),
    "layout shape": (BAD, "layout must come from get_dispatch_layout",
                     lambda c: c.b.dispatch(c.x, c.i, c.w, c.E, layout=c.b.get_dispatch_layout(c.i % 3, 3))),
    "disagree num_experts": ("all", "disagree on num_experts: [6, 12, 6]",
                             lambda c: c.b.dispatch(c.x, c.i, c.w, 2 * c.E if c.r == BAD else c.E)),
    "disagree payload": ("all", "disagree on payload: ['bfloat16', 'float32', 'bfloat16']",
                         lambda c: c.b.dispatch(c.x if c.r == BAD else c.x.bfloat16(), c.i, c.w, c.E)),
    "disagree weights": ("all", "disagree on weights",
                         lambda c: c.b.dispatch(c.x, c.i, None if c.r == BAD else c.w, c.E)),
    "different operations": ("all", "different operations: ['dispatch', 'combine', 'dispatch']",
                             lambda c: c.b.combine(torch.zeros(c.h.num_rows, HIDDEN), c.h)
                             if c.r == BAD else c.b.dispatch(c.x, c.i, c.w, c.E)),
}


def _worker(rank, world):
    num_experts = 2 * world
    buffer = Buffer(None, HIDDEN)
    x, idx, w = _inputs(rank, world, num_experts)
    handle = buffer.dispatch(x, idx, w, num_experts)[4]
    other = Buffer(None, 64)
    other = (other, other.dispatch(x[:, :64], idx, w, num_experts)[4])
    results = {}
    for name, (who, _, call) in CASES.items():
        progress(name)
        mine = who in (None, "all") or who == rank
        try:
            if mine:
                call(SimpleNamespace(b=buffer, o=other, x=x, i=idx, w=w, E=num_experts, h=handle, r=rank))
            elif name.startswith("combine"):
                buffer.combine(torch.zeros(handle.num_rows, HIDDEN), handle)
            else:
                buffer.dispatch(x, idx, w, num_experts)
            results[name] = None
        except ValueError as exc:
            results[name] = str(exc)
        # The group is still usable: a valid dispatch/combine round trip works on every rank.
        recv = buffer.dispatch(x, idx, w, num_experts)
        out = buffer.combine(recv[0], recv[4])[0]
        assert out.shape == x.shape, name
    try:
        Buffer(None, HIDDEN, num_sms=3 if rank == BAD else 20)
        results["num_sms"] = None
    except ValueError as exc:
        results["num_sms"] = str(exc)
    try:
        buffer.get_dispatch_layout(idx.clone().fill_(num_experts), num_experts)
    except ValueError as exc:
        results["layout range"] = str(exc)
    return results


@pytest.fixture(scope="module")
def messages():
    return run_workers(_worker, 3, timeout=120)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_on_every_rank(messages, name):
    who, text, _ = CASES[name]
    for rank, results in enumerate(messages):
        msg = results[name]
        assert msg is not None, f"rank {rank} did not raise for {name}"
        if who in (None, "all") or who == rank:
            assert text in msg, f"rank {rank}: {msg!r} does not contain {text!r}"
        else:
            assert f"rank {BAD}:" in msg and "nothing was sent" in msg, msg


def test_buffer_arguments_checked_on_every_rank(messages):
    for rank, results in enumerate(messages):
        msg = results["num_sms"]
        assert msg is not None and ("num_sms must be an even int" in msg if rank == BAD else f"rank {BAD}" in msg)


def test_layout_errors_are_local(messages):
    assert all("expert index outside" in r["layout range"] for r in messages)


# -- Buffer(checks=...): how often dispatch/combine exchange the header -----------------------------


def _checks_worker(rank, world, checks):
    import dualflow.comm.buffer as buffer_module

    exchanged = []
    real_agree = buffer_module.agree

    def counting_agree(group, device, operation, values, failure):  # the real exchange, counted
        exchanged.append(operation)
        return real_agree(group, device, operation, values, failure)

    buffer_module.agree = counting_agree
    num_experts = 2 * world
    x, idx, w = _inputs(rank, world, num_experts)
    out = {}
    try:
        Buffer(None, HIDDEN, checks="local" if rank == BAD and checks != "local" else checks)
    except ValueError as exc:
        out["mixed modes"] = str(exc)
    buffer = Buffer(None, HIDDEN, checks=checks)
    if checks == "first":  # the first dispatch exchanges the header: a mismatch fails on every rank
        try:
            buffer.dispatch(x, idx, w, 2 * num_experts if rank == BAD else num_experts)
        except ValueError as exc:
            out["first mismatch"] = str(exc)
    del exchanged[:]
    rounds = []
    for _ in range(3):
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(x, idx, w, num_experts)
        y, combined_w, _ = buffer.combine(recv_x * 2, handle, recv_w)
        rounds.append((recv_x, recv_idx, recv_w, counts, y, combined_w))
    out["exchanges"] = list(exchanged)
    out["rounds"] = rounds
    # A local failure after the first calls. "collective": every rank is in the call and raises;
    # otherwise only the failing rank calls: it raises alone and nothing is sent.
    if rank == BAD or checks == "collective":
        try:
            buffer.dispatch(x, idx.int() if rank == BAD else idx, w, num_experts)
        except ValueError as exc:
            out["local failure"] = str(exc)
    recv = buffer.dispatch(x, idx, w, num_experts)  # the group is still usable
    out["after"] = buffer.combine(recv[0], recv[4])[0]
    return out


@pytest.fixture(scope="module")
def by_checks():
    return {checks: run_workers(_checks_worker, 3, checks, timeout=120) for checks in ("collective", "first", "local")}


def test_checks_modes_move_the_same_data(by_checks):
    # bitwise: the checks add exchanges of their own but change no operation of the data's path
    for checks in ("first", "local"):
        for rank, (got, want) in enumerate(zip(by_checks[checks], by_checks["collective"])):
            for r, (a, b) in enumerate(zip(got["rounds"], want["rounds"])):
                for u, v in zip(a, b):
                    assert (u == v) if isinstance(u, list) else torch.equal(u, v), (checks, rank, r)
            assert torch.equal(got["after"], want["after"])


def test_checks_modes_exchange_the_header_as_documented(by_checks):
    expected = {"collective": ["dispatch", "combine"] * 3, "first": ["dispatch", "combine"], "local": []}
    for checks, results in by_checks.items():
        assert all(r["exchanges"] == expected[checks] for r in results), (checks, results[0]["exchanges"])


def test_checks_first_catches_a_mismatch_on_every_rank(by_checks):
    assert all("disagree on num_experts" in r["first mismatch"] for r in by_checks["first"])


def test_checks_local_failure_raises_on_its_rank_and_keeps_the_group_usable(by_checks):
    for checks, results in by_checks.items():
        msg = results[BAD]["local failure"]
        assert "topk_idx must be an int64" in msg, msg
        peers = [r for i, r in enumerate(results) if i != BAD]
        if checks == "collective":
            assert all(f"rank {BAD}: invalid topk_idx" in r["local failure"] for r in peers)
        else:
            assert f"checks={checks!r}" in msg and "not told" in msg, msg
            assert all("local failure" not in r for r in peers)


def test_checks_mode_must_agree_across_ranks(by_checks):
    for checks in ("collective", "first"):
        assert all("disagree on checks: ['" in r["mixed modes"] for r in by_checks[checks])
