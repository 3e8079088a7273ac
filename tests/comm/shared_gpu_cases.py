"""The cases of the shared-GPU tier (tests/comm/test_kernels_shared_gpu.py), run inside every rank.

Every rank is a process on the same GPU, in one gloo group. The kernels backend is compared, bit for
bit, with the torch backend on the same ranks and device (all_to_all_single over gloo), which the CPU
suite checks against the independent reference of tests/comm/reference.py.

A comparison never raises inside a case: :class:`Record` notes it and the case runs to its end, so a
mismatch on one rank cannot leave the others waiting in the case's next collective. Each rank returns
its record; a case passed when it passed on every rank.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from dualflow.comm import Buffer, KernelConfig, get_dispatch_layout, shared_gpu
from dualflow.comm import kernels as K
from tests.comm.cases import check_buffer, fields_of, gather
from tests.comm.reference import expected_receive
from tests.dist import progress

HIDDEN = 256
MAX_TOKENS = 320
SMS = (2, 4, 8, 16, 20, 24, 32, 64, 128)  # the ones that fit the device and the mode are run
TOPK = (1, 2, 3, 4, 6, 8)
SCENARIOS = ("topk", "duplicates", "receives nothing", "sender idle")
PAIRS = int(os.environ.get("DUALFLOW_TEST_SHARED_PAIRS", "1000"))


class Record:
    """Outcome of each case on this rank: the failures seen, in order (empty: passed)."""

    def __init__(self) -> None:
        self.cases: dict[str, list[str]] = {}
        self._current = "set-up"

    @contextlib.contextmanager
    def case(self, name: str):
        progress(name)
        self._current = name
        self.cases.setdefault(name, [])
        yield
        self._current = "between cases"

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.cases.setdefault(self._current, []).append(what)

    def bitwise(self, got, want, what: str) -> None:
        if got is None or want is None:
            self.check(got is None and want is None, f"{what}: one side is None")
            return
        got, want = got.detach(), want.detach()
        if got.dtype != want.dtype or got.shape != want.shape:
            self.check(False, f"{what}: {got.dtype} {list(got.shape)} != {want.dtype} {list(want.shape)}")
            return
        if got.dtype.is_floating_point:
            got, want = got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
        differ = int((got != want).sum())
        self.check(differ == 0, f"{what}: differs in {differ} elements")


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def kernels_buffer(num_sms: int, **kw) -> Buffer:
    kw.setdefault("max_tokens_per_rank", MAX_TOKENS)
    kw.setdefault("kernel_config", KernelConfig(timeout_s=60.0))
    return Buffer(None, HIDDEN, num_sms=num_sms, backend="kernels", shared_gpu=True, **kw)


def auto_buffer(num_sms: int) -> Buffer:
    return Buffer(None, HIDDEN, num_sms=num_sms, max_tokens_per_rank=MAX_TOKENS, shared_gpu=True)


def torch_buffer(**kw) -> Buffer:
    return Buffer(None, HIDDEN, backend="torch", shared_gpu=True, **kw)


def fitting_sms(world: int, sharing) -> list[int]:
    return [s for s in SMS if shared_gpu.problem(s, [sharing] * world) is None]


def routing(rank: int, world: int, seed: int, scenario: str):
    """``(topk_idx, weights, generator)``: uneven token counts, -1 slots, tokens routed nowhere, top-k <= 8."""
    k = TOPK[seed % len(TOPK)]  # the same on every rank
    num_experts = 4 * world
    g = torch.Generator().manual_seed(7919 * seed + rank)
    tokens = int(torch.randint(0, MAX_TOKENS + 1, (1,), generator=g))
    if scenario == "sender idle" and rank == 0:
        tokens = 0
    hosted = num_experts - (4 if scenario == "receives nothing" else 0)  # the last rank's experts: never
    if scenario == "duplicates" or k > hosted:
        idx = torch.randint(-1, hosted, (tokens, k), generator=g)  # the same expert twice in a token too
    else:
        idx = torch.rand(tokens, hosted, generator=g).topk(k, dim=1).indices
        idx[torch.rand(tokens, k, generator=g) < 0.1] = -1
    idx[: tokens // 10] = -1  # routed nowhere
    return idx, torch.rand(tokens, k, generator=g) * 2 - 0.5, g


def payloads(tokens: int, g: torch.Generator) -> dict:
    """A BF16 payload of wide range, and an FP8 one of arbitrary bytes (NaN patterns included: a copy is a copy)."""
    mag = torch.exp2(torch.randint(-20, 20, (tokens, 1), generator=g).float())
    bf16 = (torch.randn(tokens, HIDDEN, generator=g) * mag).bfloat16()
    fp8 = torch.randint(0, 256, (tokens, HIDDEN), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.rand(tokens, HIDDEN // 128, generator=g) + 0.5
    return {"bf16": bf16, "fp8": (fp8.view(torch.float8_e4m3fn), scales)}


def _to(x, dev):
    return tuple(t.to(dev) for t in x) if isinstance(x, tuple) else x.to(dev)


def versus_torch(rec: Record, kern: Buffer, ref: Buffer, seed: int, scenario: str, full: bool) -> None:
    """Dispatch (plain, cached, expert-major) and combine (weighted or not) bit for bit against ``ref``."""
    dev = kern.device
    idx, w, g = routing(kern.rank, kern.num_ranks, seed, scenario)
    idx, w = idx.to(dev), w.to(dev)
    num_experts = 4 * kern.num_ranks
    kinds = payloads(idx.shape[0], g)
    for kind in kinds if full else ("bf16", "fp8")[seed % 2:][:1]:
        x = _to(kinds[kind], dev)
        for em in (False, True) if full else (bool(seed % 3),):
            align = (1, 4, 128)[seed % 3]
            tag = f"{kind} em={em} top-{idx.shape[1]} {scenario}"
            a = kern.dispatch(x, idx, w, num_experts, expert_major=em, expert_alignment=align)
            b = ref.dispatch(x, idx, w, num_experts, expert_major=em, expert_alignment=align)
            for i, (u, v) in enumerate(zip([*fields_of(a[0]), a[1], a[2]], [*fields_of(b[0]), b[1], b[2]])):
                rec.bitwise(u, v, f"{tag}: dispatch output {i}")
            rec.check(a[3] == b[3] and a[4].expert_offsets == b[4].expert_offsets, f"{tag}: counts/offsets")
            cached = kern.dispatch(x, None, None, num_experts, handle=a[4], expert_major=em, expert_alignment=align)
            for u, v in zip(fields_of(cached[0]), fields_of(a[0])):
                rec.bitwise(u, v, f"{tag}: cached dispatch")
            y = (torch.randn(a[4].num_rows, HIDDEN, generator=g) * 4).to(dev, torch.bfloat16)
            for weights in (None, a[2]) if full else (a[2],):
                u, v = kern.combine(y, a[4], weights), ref.combine(y, b[4], weights)
                rec.bitwise(u[0], v[0], f"{tag}: combine weighted={weights is not None}")
                rec.bitwise(u[1], v[1], f"{tag}: combined weights")
                if full:
                    rec.bitwise(kern.combine(y, a[4], weights)[0], u[0], f"{tag}: repeated combine")


def source_indices(rec: Record, kern: Buffer, seed: int) -> None:
    idx, _, g = routing(kern.rank, kern.num_ranks, seed, "topk")
    num_experts = 4 * kern.num_ranks
    handle = kern.dispatch(payloads(idx.shape[0], g)["bf16"].to(kern.device), idx.to(kern.device), None,
                           num_experts)[4]
    everyone = gather(idx)
    exp = expected_receive([[torch.zeros(len(i), 1)] for i in everyone], everyone, None, num_experts, kern.rank)
    rec.check(handle.route.recv_src_idx.cpu().tolist() == [t for _, t in exp.rows], "source token indices")


def async_calls(rec: Record, kern: Buffer, seed: int) -> None:
    dev = kern.device
    idx, w, g = routing(kern.rank, kern.num_ranks, seed, "topk")
    idx, w = idx.to(dev), w.to(dev)
    x = payloads(idx.shape[0], g)["bf16"].to(dev)
    num_experts = 4 * kern.num_ranks
    sync = kern.dispatch(x, idx, w, num_experts)
    got = kern.dispatch(x, idx, w, num_experts, async_op=True)
    got[5].wait()
    for u, v in zip(got[:3], sync[:3]):
        rec.bitwise(u, v, "async dispatch")
    out = kern.combine(sync[0], got[4], got[2], async_op=True)
    out[2].wait()
    rec.bitwise(out[0], kern.combine(sync[0], sync[4], sync[2])[0], "async combine")


def autograd(rec: Record, kern: Buffer, ref: Buffer, seed: int) -> None:
    dev = kern.device
    idx, w, g = routing(kern.rank, kern.num_ranks, seed, "topk")
    idx, w = idx.to(dev), w.to(dev)
    x = payloads(idx.shape[0], g)["bf16"].to(dev)
    num_experts = 4 * kern.num_ranks
    grads = []
    for buffer in (kern, ref):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        recv_x, _, recv_w, _, h, _ = buffer.dispatch(xl, idx, wl, num_experts, expert_major=True, expert_alignment=4)
        out = buffer.combine(recv_x * 3, h, recv_w)[0]
        (out.float() * torch.linspace(-1, 1, HIDDEN, device=dev)).sum().backward()
        grads.append((xl.grad, wl.grad))
    rec.bitwise(grads[0][0], grads[1][0], "gradient of x")
    rec.bitwise(grads[0][1], grads[1][1], "gradient of the weights")


def pairs(rec: Record, num_sms: int, count: int = PAIRS) -> int:
    """``count`` consecutive dispatch/combine pairs on one buffer, every output checked; returns ring laps.

    Every tenth dispatch computes a new routing (notify, epochs advance), alternating two routings; the
    others reuse it. Payloads cycle through 5 tensors and combine inputs through 3, so a slot read before
    its new message landed shows up as another iteration's bytes. Mismatches are counted on the device:
    the host waits only for notify's totals, as in training.
    """
    dev = device()
    rank, world = dist.get_rank(), dist.get_world_size()
    num_experts = 2 * world
    kern = kernels_buffer(num_sms, max_tokens_per_rank=128, checks="first")
    ref = torch_buffer(checks="first")
    g = torch.Generator().manual_seed(4242 + rank)
    tokens = 48 + 8 * rank  # at most 104 of the 128 the buffer takes
    routes = []
    for _ in range(2):
        idx = torch.randint(-1, num_experts, (tokens, 2), generator=g).to(dev)
        w = (torch.rand(tokens, 2, generator=g) - 0.25).to(dev)
        h = ref.dispatch(torch.zeros(tokens, HIDDEN, dtype=torch.bfloat16, device=dev), idx, w, num_experts)
        ys = [(torch.randn(h[4].num_rows, HIDDEN, generator=g) * (q + 1)).to(dev, torch.bfloat16) for q in range(3)]
        routes.append((idx, w, h[2], h[4], ys))
    xs = [torch.randn(tokens, HIDDEN, generator=g).to(dev, torch.bfloat16) for _ in range(5)]
    want_x = [[ref.dispatch(x, None, None, num_experts, handle=r[3])[0] for x in xs] for r in routes]
    want_y = [[ref.combine(y, r[3], r[2])[:2] for y in r[4]] for r in routes]
    bad = torch.zeros((), dtype=torch.int64, device=dev)
    handle = None
    for i in range(count):
        r = (i // 10) % 2
        idx, w, recv_w, _, ys = routes[r]
        if i % 10 == 0:
            out = kern.dispatch(xs[i % 5], idx, w, num_experts)
            handle, got_w = out[4], out[2]
            bad += (got_w.view(torch.int32) != recv_w.view(torch.int32)).sum()
        else:
            out = kern.dispatch(xs[i % 5], None, None, num_experts, handle=handle)
        bad += (out[0].view(torch.int16) != want_x[r][i % 5].view(torch.int16)).sum()
        y, y_w = kern.combine(ys[i % 3], handle, got_w)[:2]
        bad += (y.view(torch.int16) != want_y[r][i % 3][0].view(torch.int16)).sum()
        bad += (y_w.view(torch.int32) != want_y[r][i % 3][1].view(torch.int32)).sum()
    kern.synchronize()
    rec.check(int(bad) == 0, f"{int(bad)} output elements differ from the torch backend over {count} pairs")
    # Rows through each ring into this rank: s's dispatched rows, then the rows s combines back.
    slots, channels = kern._backend.sizing.num_slots, kern._backend.sizing.num_channels
    per_op = [[h.route.recv_counts[s] + int(get_dispatch_layout(idx, num_experts, world).num_tokens_per_rank[s])
               for s in range(world)] for idx, _, _, h, _ in routes]
    per_ring = [sum(per_op[(i // 10) % 2][s] for i in range(count)) for s in range(world)]
    kern.close()
    return min(per_ring) // (slots * channels)


def mismatches(rec: Record, num_sms: int, ref: Buffer) -> None:
    """Ranks passing another configuration: the same ValueError on every rank before anything runs."""
    last = dist.get_world_size() - 1
    me = dist.get_rank()
    wrong = {
        "num_sms": dict(num_sms=num_sms + 2 if me == last else num_sms),
        "max_tokens_per_rank": dict(max_tokens_per_rank=MAX_TOKENS * (2 if me == last else 1)),
        "KernelConfig.fp8": dict(kernel_config=KernelConfig(fp8=me == last)),
        "KernelConfig.max_topk": dict(kernel_config=KernelConfig(max_topk=4 if me == last else 8)),
    }
    for name, kw in wrong.items():
        kw = {"num_sms": num_sms, **kw}
        sms = kw.pop("num_sms")
        try:
            kernels_buffer(sms, **kw).close()
            message = None
        except ValueError as exc:
            message = str(exc)
        seen = gather(message)
        rec.check(message is not None and f"disagree on {name}" in message, f"{name}: {message}")
        rec.check(len(set(seen)) == 1, f"{name}: different messages on the ranks: {seen}")
    # A call with another top-k width on one rank, then the same buffer still works.
    kern = kernels_buffer(num_sms)
    dev = kern.device
    idx, w, g = routing(me, last + 1, 3, "topk")
    x = payloads(idx.shape[0], g)["bf16"].to(dev)
    idx, w = idx.to(dev), w.to(dev)
    try:
        narrow = idx[:, :1] if me == last and idx.shape[1] > 1 else idx
        kern.dispatch(x, narrow.contiguous(), w[:, : narrow.shape[1]].contiguous(), 4 * (last + 1))
        message = None
    except ValueError as exc:
        message = str(exc)
    seen = gather(message)
    rec.check(message is not None and "disagree on topk" in message, f"per-call top-k: {message}")
    rec.check(len(set(seen)) == 1, f"per-call top-k: different messages on the ranks: {seen}")
    a, b = kern.dispatch(x, idx, w, 4 * (last + 1)), ref.dispatch(x, idx, w, 4 * (last + 1))
    rec.bitwise(a[0], b[0], "dispatch after the refused call")
    rec.bitwise(kern.combine(a[0], a[4], a[2])[0], ref.combine(b[0], b[4], b[2])[0], "combine after the refused call")
    kern.close()


def refuse_unfit(rec: Record, world: int, sharing) -> None:
    """A num_sms whose kernels cannot all be resident is refused on every rank (not a hang)."""
    unfit = [s for s in SMS if s not in fitting_sms(world, sharing)]
    if sharing.mps:  # the rule restated: the whole group resident at once under MPS, one kernel otherwise
        want = [s for s in SMS if world * s > sharing.client_sms or s > sharing.sms]
    else:
        want = [s for s in SMS if s > sharing.sms]
    rec.check(unfit == want, f"num_sms refused under {sharing.mode}: {unfit}, expected {want}")
    for s in unfit[:1]:
        try:
            kernels_buffer(s).close()
            message = None
        except ValueError as exc:
            message = str(exc)
        seen = gather(message)
        text = f"{world} x num_sms={s}" if sharing.mps else f"num_sms={s} exceeds"
        rec.check(message is not None and text in message, f"num_sms={s}: {message}")
        rec.check(len(set(seen)) == 1, f"num_sms={s}: different messages on the ranks: {seen}")


def tier(rank: int, world: int, expect_mps: str | None) -> dict:
    """Every case of the tier on this rank; returns {"mode", "cases": {name: failures}, "laps"}."""
    torch.cuda.set_device(0)
    dev = device()
    rec = Record()
    sharing = K.device_sharing(dev)
    with rec.case("mode detected"):
        rec.check(expect_mps is None or sharing.mps == (expect_mps == "1"),
                  f"the driver reports {sharing.mode}, the run expected MPS={expect_mps}")
        rec.check(len(set(gather(sharing))) == 1, "ranks see the GPU shared differently")
    fits = fitting_sms(world, sharing)
    main = max(s for s in fits if s <= 24)
    ref = torch_buffer()
    with rec.case("auto picks the kernels"):
        auto = auto_buffer(main)
        rec.check(auto.backend == "kernels" and "sharing one GPU" in auto.describe(), auto.describe())
        auto.close()
    with rec.case("refuses what cannot fit"):
        refuse_unfit(rec, world, sharing)
    for seed, num_sms in enumerate(fits):
        full = num_sms == main
        kern = kernels_buffer(num_sms)
        for n, scenario in enumerate(SCENARIOS if full else SCENARIOS[seed % 4:][:1]):
            with rec.case(f"bitwise num_sms={num_sms} {scenario}"):
                versus_torch(rec, kern, ref, 10 * seed + n, scenario, full)
        if full:
            with rec.case(f"source indices num_sms={num_sms}"):
                source_indices(rec, kern, seed)
            with rec.case(f"async num_sms={num_sms}"):
                async_calls(rec, kern, seed)
            with rec.case(f"autograd num_sms={num_sms}"):
                autograd(rec, kern, ref, seed)
        kern.close()
    with rec.case("mismatched configurations"):
        mismatches(rec, main, ref)
    with rec.case(f"{PAIRS} dispatch/combine pairs on one buffer"):
        laps = pairs(rec, 2)
        rec.check(laps >= 10, f"the smallest ring wrapped {laps} times, the test needs >= 10")
    with rec.case(f"independent reference num_sms={main}"):  # raises on a mismatch: last on purpose
        kern = kernels_buffer(main, max_tokens_per_rank=64)
        check_buffer(kern)
        kern.close()
    return {"mode": sharing.mode, "cases": rec.cases, "laps": laps}
