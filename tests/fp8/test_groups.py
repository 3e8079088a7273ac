"""Malformed ``group_offsets``/``masked_m`` of the grouped GEMMs: refused on the host, recorded on the device.

The host check (:func:`dualflow.fp8.groups.first_malformed`) is the reference that the device-side
recorders (the Triton kernels under the interpreter, the torch one of empty calls) are compared with.
The kernels are run on operands that sit inside guard rows of their storage: NaN around ``a`` and its
scales (a read outside them would put a NaN into the output) and a sentinel around ``out`` (a write
outside it would change one), with offsets that overshoot by less than the guard.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from dualflow.fp8 import Fp8ErrorFlag, fp8_grouped_gemm, quantize_1x128, quantize_128x128
from dualflow.fp8 import cutlass as cl
from dualflow.fp8.groups import RECORD_SIZE, check_on_host, first_malformed, record_on_device
from tests.fp8.helpers import scaled_randn

GUARD = 256  # rows of guard on each side; every malformed case below overshoots by less
SENTINEL = -12345.0
K, N = 256, 144


def _experts(groups: int, seed: int, device: torch.device | str = "cpu"):
    w = torch.randn(groups, N, K, generator=torch.Generator().manual_seed(seed))
    parts = [quantize_128x128(w[g]) for g in range(groups)]
    return torch.stack([p[0] for p in parts]).to(device), torch.stack([p[1] for p in parts]).to(device)


def guarded(t: torch.Tensor, fill: float, pad: int = GUARD) -> tuple[torch.Tensor, torch.Tensor]:
    """(storage, view): ``t``'s values in a view of a larger tensor with ``pad`` rows of ``fill`` before and
    after it (NaN stays NaN in E4M3)."""
    store = torch.full((2 * pad + t.shape[0], *t.shape[1:]), fill, dtype=torch.float32, device=t.device).to(t.dtype)
    view = store[pad:pad + t.shape[0]]
    view.copy_(t)
    return store, view


def guard_rows(store: torch.Tensor, pad: int = GUARD) -> torch.Tensor:
    return torch.cat([store[:pad], store[store.shape[0] - pad:]])


def _expected_record(values: list[int], op: str, bound: int) -> list[int]:
    found = first_malformed(values, op, bound)
    if found is None:
        return [0] * RECORD_SIZE
    return [1 if op == "contiguous" else 2, *found, bound]


# ----------------------------------------------------------------------------------------------------------
# what is malformed, and the messages
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("values", "op", "bound", "found"), [
    ([0, 100, 100, 200], "contiguous", 200, None),
    ([0, 0, 0], "contiguous", 0, None),
    ([3, 50, 60], "contiguous", 200, None),  # rows before the first group are merely outside every group
    ([0, 450, 100, 200], "contiguous", 200, (0, 0, 450)),
    ([-7, 3, 2, 256], "contiguous", 256, (0, -7, 3)),
    ([0, 150, 60, 200], "contiguous", 200, (1, 150, 60)),
    ([0, 100, 200, 201], "contiguous", 200, (2, 200, 201)),
    ([0, 10, -1, 5], "contiguous", 200, (1, 10, -1)),
    ([5, 0, 128], "masked", 128, None),
    ([5, -1, 300], "masked", 128, (1, -1, 128)),
    ([5, 129], "masked", 128, (1, 129, 128)),
])
def test_first_malformed(values, op, bound, found):
    assert first_malformed(values, op, bound) == found


def test_messages_name_the_group_its_values_and_the_problem():
    with pytest.raises(ValueError, match=r"group 1 has group_offsets\[1\] = 150, group_offsets\[2\] = 60 "
                                         r"\(decreasing\)"):
        check_on_host([0, 150, 60, 200], "contiguous", 200)
    with pytest.raises(ValueError, match=r"within \[0, T = 200\].*group 0 has group_offsets\[0\] = -5, "
                                         r"group_offsets\[1\] = 300 \(negative, beyond the T = 200 rows of a\)"):
        check_on_host([-5, 300, 300], "contiguous", 200)
    with pytest.raises(ValueError, match=r"masked_m\[g\] must lie in \[0, M_max = 64\].*group 2 has "
                                         r"masked_m\[2\] = 65"):
        check_on_host([0, 64, 65], "masked", 64)


def test_error_flag_raises_what_was_recorded_once():
    flag = Fp8ErrorFlag("cpu")
    flag.check()  # nothing recorded: no error
    flag.record.copy_(torch.tensor([1, 2, 90, 80, 128]))  # what a kernel writes
    with pytest.raises(ValueError, match=r"group 2 has group_offsets\[2\] = 90, group_offsets\[3\] = 80 "
                                         r"\(decreasing\).*recorded on the device by an earlier call"):
        flag.check()
    flag.check()  # cleared by the check
    flag.record.copy_(torch.tensor([2, 0, -3, 64, 64]))
    with pytest.raises(ValueError, match=r"group 0 has masked_m\[0\] = -3"):
        flag.check()


def test_device_recorder_matches_the_host_check():
    # the torch recorder of calls that run no kernel, on random and extreme indices
    rng = random.Random(0)
    extremes = [-2**31, -1, 0, 1, 2**31 - 1]
    for case in range(300):
        op = "contiguous" if case % 2 else "masked"
        bound = rng.choice([0, 1, 5, 200])
        length = rng.randint(1, 6)
        values = [rng.choice(extremes) if rng.random() < 0.1 else rng.randint(-3, bound + 3) for _ in range(length)]
        if op == "contiguous" and rng.random() < 0.5:  # well formed often enough to matter
            values = sorted(min(max(v, 0), bound) for v in values)
        flag = Fp8ErrorFlag("cpu")
        record_on_device(flag.record, torch.tensor(values, dtype=torch.int32), op, bound)
        assert flag.record.tolist() == _expected_record(values, op, bound), (values, op, bound)
    flag.record.copy_(torch.tensor([2, 0, 9, 5, 5]))
    record_on_device(flag.record, torch.tensor([0, 9, 1]), "contiguous", 5)
    assert flag.record.tolist() == [2, 0, 9, 5, 5]  # the first error stays


# ----------------------------------------------------------------------------------------------------------
# the public function: host indices refused before anything runs, by every backend
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton", "cutlass,triton,reference"])
def test_host_offsets_are_refused_before_any_backend_runs(backend):
    if "triton" in backend:
        pytest.importorskip("triton")
    a, sa = quantize_1x128(scaled_randn(200, K, 1))
    b, sb = _experts(3, 2)
    for offsets, match in (([0, 450, 100, 200], r"group 0 has group_offsets\[0\] = 0, group_offsets\[1\] = 450"),
                           ([-7, 3, 2, 200], r"group 0 has group_offsets\[0\] = -7"),
                           ([0, 150, 60, 200], r"group 1 .* \(decreasing\)")):
        for dtype in (torch.int32, torch.int64):
            for errors in (None, Fp8ErrorFlag("cpu")):  # a host index is checked at once, flag or not
                with pytest.raises(ValueError, match=match):
                    fp8_grouped_gemm(a, sa, b, sb, group_offsets=torch.tensor(offsets, dtype=dtype), backend=backend,
                                     errors=errors)
                assert errors is None or errors.record.tolist() == [0] * RECORD_SIZE
    # empty operands run no kernel but are checked all the same
    with pytest.raises(ValueError, match=r"group_offsets\[1\] = 5"):
        fp8_grouped_gemm(a[:0], sa[:0], b, sb, group_offsets=torch.tensor([0, 5, 5, 5]), backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_host_counts_are_refused_before_any_backend_runs(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    x = scaled_randn(3 * 64, K, 3).view(3, 64, K)
    parts = [quantize_1x128(x[g]) for g in range(3)]
    a, sa = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    b, sb = _experts(3, 4)
    for counts, match in (([5, -1, 3], r"group 1 has masked_m\[1\] = -1"), ([5, 0, 65], r"masked_m\[2\] = 65")):
        with pytest.raises(ValueError, match=match):
            fp8_grouped_gemm(a, sa, b, sb, masked_m=torch.tensor(counts), backend=backend)


def test_reference_refuses_what_it_is_handed_directly():
    # the registry entry itself (as a backend list or the CUTLASS stand-in calls it), not only the wrapper
    from dualflow.fp8.gemm import _REGISTRY

    a, sa = quantize_1x128(scaled_randn(64, K, 5))
    b, sb = _experts(2, 6)
    with pytest.raises(ValueError, match=r"group_offsets\[2\] = 65"):
        _REGISTRY["reference"].contiguous(a, sa, b, sb, torch.tensor([0, 10, 65]), torch.bfloat16)
    with pytest.raises(ValueError, match=r"masked_m\[0\] = 33"):
        _REGISTRY["reference"].masked(a.view(2, 32, K), sa.view(2, 32, -1), b, sb, torch.tensor([33, 0]),
                                      torch.bfloat16)


def test_index_and_flag_devices_are_checked():
    a, sa = quantize_1x128(scaled_randn(64, K, 7))
    b, sb = _experts(2, 8)
    offsets = torch.tensor([0, 10, 64])
    with pytest.raises(ValueError, match=r"errors must be an Fp8ErrorFlag on the operands' device \(cpu\), got one "
                                         r"on meta"):
        fp8_grouped_gemm(a, sa, b, sb, group_offsets=offsets, errors=Fp8ErrorFlag("meta"), backend="reference")
    with pytest.raises(ValueError, match=r"errors must be an Fp8ErrorFlag .* got Tensor"):
        fp8_grouped_gemm(a, sa, b, sb, group_offsets=offsets, errors=torch.zeros(5, dtype=torch.int64),
                         backend="reference")
    with pytest.raises(ValueError, match=r"group_offsets must be on the operands' device \(cpu\) or on the CPU, got "
                                         r"meta"):
        fp8_grouped_gemm(a, sa, b, sb, group_offsets=offsets.to("meta"), backend="reference")


def test_device_index_path_of_an_empty_call_runs():
    # A device index with a flag, on "meta" tensors standing in for a device the CPU lacks: the path runs
    # and keeps everything on the device (tests/fp8/test_groups_gpu.py checks the recorded values on a GPU).
    b, sb = _experts(2, 10)
    a = torch.empty(0, K, dtype=torch.float8_e4m3fn, device="meta")
    flag = Fp8ErrorFlag("meta")
    out = fp8_grouped_gemm(a, torch.empty(0, 2, device="meta"), b.to("meta"), sb.to("meta"),
                           group_offsets=torch.empty(3, dtype=torch.int32, device="meta"), errors=flag,
                           backend="reference")
    assert out.shape == (0, N) and out.device.type == "meta" and flag.record.device.type == "meta"


def test_cutlass_empty_call_records_without_a_kernel():
    # the CUTLASS binding's own path for calls with no rows: the offsets are still checked, on the device
    a, sa = quantize_1x128(scaled_randn(64, K, 9))
    b, sb = _experts(2, 10)
    flag = Fp8ErrorFlag("cpu")
    out = cl.grouped_gemm_contiguous(a[:0], sa[:0], b, sb, torch.tensor([0, 3, 2], dtype=torch.int32),
                                     errors=flag.record)
    assert out.shape == (0, N) and flag.record.tolist() == [1, 0, 0, 3, 0]
    with pytest.raises(ValueError, match=r"errors must be a contiguous int64 tensor of shape \(5,\)"):
        cl.grouped_gemm_contiguous(a, sa, b, sb, torch.tensor([0, 3, 64]), errors=torch.zeros(5))


# ----------------------------------------------------------------------------------------------------------
# the Triton kernels (interpreter): in bounds whatever the index, and the first malformed group recorded
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def kernels():
    pytest.importorskip("triton")
    from dualflow.fp8.kernels import gemm

    return gemm


CONTIGUOUS_CASES = [[0, 450, 100, 200], [-100, 50, 40, 200], [0, 150, 60, 200], [0, 100, 200, 456],
                    [-200, -100, 150, 120], [0, 70, 70, 200], [0, 0, 0, 0], [30, 60, 60, 150]]
MASKED_CASES = [[-5, 64, 300], [64, 193, 0], [7, 0, 192], [-1, -1, -1]]


def contiguous_case(kernels, offsets: list[int], device, close, sentinel: float = SENTINEL,
                    out_dtype: torch.dtype = torch.float32) -> None:
    """Run the contiguous kernel on guarded operands: no access outside them, the record as the host check
    says, and for well-formed offsets the reference's rows (compared by ``close(got, want, a, sa, b, sb)``)."""
    t = 200
    q, s = quantize_1x128(scaled_randn(t, K, 11))
    _, a = guarded(q.to(device), float("nan"))
    _, sa = guarded(s.to(device), float("nan"))
    b, sb = _experts(3, 12, device)
    out_store, out = guarded(torch.full((t, N), sentinel, dtype=out_dtype, device=device), sentinel)
    guard_before = guard_rows(out_store).clone()
    flag = Fp8ErrorFlag(device)
    index = torch.tensor(offsets, dtype=torch.int32, device=device)
    kernels.grouped_contiguous(a, sa, b, sb, index, out, flag.record)
    # untouched memory compared with what was written there: bitwise equality holds on any machine
    assert torch.equal(guard_rows(out_store), guard_before), "a write outside out"
    written = (out != sentinel).any(-1)
    assert torch.isfinite(out[written]).all(), "a read outside a or its scales (their guards are NaN)"
    assert flag.record.tolist() == _expected_record(offsets, "contiguous", t)
    if first_malformed(offsets, "contiguous", t) is None:  # well formed: exactly the reference's rows
        want = fp8_grouped_gemm(a, sa, b, sb, group_offsets=index, out_dtype=out_dtype, backend="reference")
        for g, (lo, hi) in enumerate(itertools.pairwise(offsets)):
            close(out[lo:hi], want[lo:hi], a[lo:hi], sa[lo:hi], b[g], sb[g])
        assert int(written.sum()) == offsets[-1] - offsets[0]


def masked_case(kernels, counts: list[int], device, close, sentinel: float = SENTINEL,
                out_dtype: torch.dtype = torch.float32) -> None:
    """Like :func:`contiguous_case` for the masked kernel: rows past a group's (clamped) count stay untouched."""
    groups, m_max = 3, 192
    x = scaled_randn(groups * m_max, K, 13).view(groups, m_max, K)
    parts = [quantize_1x128(x[g]) for g in range(groups)]
    _, a = guarded(torch.stack([p[0] for p in parts]).to(device), float("nan"), pad=1)
    _, sa = guarded(torch.stack([p[1] for p in parts]).to(device), float("nan"), pad=1)
    b, sb = _experts(groups, 14, device)
    out_store, out = guarded(torch.full((groups, m_max, N), sentinel, dtype=out_dtype, device=device), sentinel, 1)
    guard_before = guard_rows(out_store, 1).clone()
    flag = Fp8ErrorFlag(device)
    kernels.grouped_masked(a, sa, b, sb, torch.tensor(counts, dtype=torch.int64, device=device), out, flag.record)
    assert torch.equal(guard_rows(out_store, 1), guard_before), "a write outside out"
    clamped = [min(max(c, 0), m_max) for c in counts]  # a malformed count runs no row past M_max, none below 0
    want = fp8_grouped_gemm(a, sa, b, sb, masked_m=torch.tensor(clamped, device=device), out_dtype=out_dtype,
                            backend="reference")
    for g, rows in enumerate(clamped):
        close(out[g, :rows], want[g, :rows], a[g, :rows], sa[g, :rows], b[g], sb[g])
        assert bool((out[g, rows:] == sentinel).all()), f"group {g}: rows past its count were written"
    assert flag.record.tolist() == _expected_record(counts, "masked", m_max)


def _close_cpu(got, want, *_operands):
    from tests.fp8.test_gemm_triton import _close

    _close(got, want)


@pytest.mark.parametrize("offsets", CONTIGUOUS_CASES, ids=lambda o: "_".join(map(str, o)))
def test_triton_contiguous_stays_in_bounds_and_records(kernels, offsets):
    contiguous_case(kernels, offsets, "cpu", _close_cpu)


@pytest.mark.parametrize("counts", MASKED_CASES, ids=lambda c: "_".join(map(str, c)))
def test_triton_masked_stays_in_bounds_and_records(kernels, counts):
    masked_case(kernels, counts, "cpu", _close_cpu)


def test_triton_keeps_the_first_error_and_records_nothing_without_a_flag(kernels):
    a, sa = quantize_1x128(scaled_randn(64, K, 15))
    b, sb = _experts(2, 16)
    flag = Fp8ErrorFlag("cpu")
    out = torch.empty(64, N)
    kernels.grouped_contiguous(a, sa, b, sb, torch.tensor([0, 80, 64]), out, flag.record)
    kernels.grouped_contiguous(a, sa, b, sb, torch.tensor([0, 30, 20]), out, flag.record)
    assert flag.record.tolist() == [1, 0, 0, 80, 64]
    kernels.grouped_contiguous(a, sa, b, sb, torch.tensor([0, 30, 20]), out)  # still in bounds, nothing to write to
    assert flag.record.tolist() == [1, 0, 0, 80, 64]
