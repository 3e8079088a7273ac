"""The CUTLASS backend's host side on the CPU: tile-configuration choice, scale-layout conversions against
plain loops, argument validation, and the library's C ABI (configuration table, workspace queries and
its own validation) through ctypes. The kernels themselves run in test_cutlass_gpu.py."""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil

import pytest
import torch

from dualflow import _cuda
from dualflow.fp8 import BackendUnavailable, fp8_gemm, quantize_1x128, quantize_128x1, quantize_128x128
from dualflow.fp8 import cutlass as cl

FP8 = torch.float8_e4m3fn


# ----------------------------------------------------------------------------------------------------------
# configuration choice
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "m", "n", "k", "groups", "expected"), [
    ("fwd", 4096, 7168, 16384, 1, "fwd_128x128"),     # 32 x 56 tiles: the large tile
    ("fwd", 4096, 2112, 7168, 1, "fwd_128x128"),
    ("fwd", 64, 7168, 16384, 1, "fwd_64x128"),        # 64 rows: a 128-row tile would be half empty
    ("fwd", 1, 128, 128, 1, "fwd_64x128"),
    ("fwd", 128, 2112, 7168, 1, "fwd_64x128"),        # 1 x 17 tiles < 132 / 2: spread over 64-row tiles
    ("fwd", 256, 8192, 7168, 1, "fwd_128x128"),       # 2 x 64 = 128 tiles >= 66
    ("wgrad", 7168, 4096, 8192, 1, "wgrad_128x128"),
    ("wgrad", 16, 16, 128, 1, "wgrad_128x128"),
    ("grouped", 4 * 8192, 4096, 7168, 4, "grouped_128x128"),
    ("grouped", 8 * 48, 4096, 7168, 8, "grouped_64x128"),   # 48 rows per expert
    ("grouped", 2 * 256, 256, 7168, 2, "grouped_64x128"),   # 2 x 2 x 2 = 8 tiles
    ("kgrouped_wgrad", 2816, 2048, 98304, 64, "kgrouped_wgrad_128x128"),
])
def test_choose_config(kind, m, n, k, groups, expected):
    assert cl.choose_config(kind, m, n, k, groups=groups) == expected


def test_choose_config_returns_a_config_of_the_kind_everywhere():
    for kind, m, n, groups in itertools.product(cl.KINDS, [0, 1, 63, 64, 65, 129, 1000, 8192], [8, 128, 7168], [1, 8]):
        name = cl.choose_config(kind, m, n, 128, groups=groups if "grouped" in kind else 1)
        assert cl._BY_NAME[name].kind == kind, (kind, m, n, name)


def test_choose_config_takes_the_sm_count():
    # 2 x 16 = 32 tiles of 128x128: under half of 132 SMs, over half of 40
    assert cl.choose_config("fwd", 256, 2048, 1024) == "fwd_64x128"
    assert cl.choose_config("fwd", 256, 2048, 1024, num_sms=40) == "fwd_128x128"


def test_choose_config_rejects_bad_input():
    with pytest.raises(ValueError, match="kind must be one of"):
        cl.choose_config("dgrad", 1, 1, 128)
    with pytest.raises(ValueError, match="m, n, k must be >= 0"):
        cl.choose_config("fwd", -1, 1, 128)


def test_forcing_a_config_by_argument_and_environment(monkeypatch):
    monkeypatch.delenv(cl.ENV_CONFIG, raising=False)
    assert cl.resolve_config("fwd", 4096, 7168, 1024) == "fwd_128x128"
    assert cl.resolve_config("fwd", 4096, 7168, 1024, "fwd_64x128") == "fwd_64x128"
    with pytest.raises(ValueError, match="cannot run a wgrad GEMM; use one of: wgrad_128x128"):
        cl.resolve_config("wgrad", 128, 128, 128, "fwd_64x128")
    with pytest.raises(ValueError, match="'nope' cannot run a fwd GEMM; use one of: fwd_128x128, fwd_64x128"):
        cl.resolve_config("fwd", 128, 128, 128, "nope")
    monkeypatch.setenv(cl.ENV_CONFIG, "grouped_128x128, fwd_64x128")
    assert cl.resolve_config("fwd", 4096, 7168, 1024) == "fwd_64x128"
    assert cl.resolve_config("grouped", 64, 128, 128, groups=4) == "grouped_128x128"
    assert cl.resolve_config("wgrad", 128, 128, 128) == "wgrad_128x128"  # none of its kind listed: heuristic
    assert cl.resolve_config("fwd", 4096, 7168, 1024, "fwd_128x128") == "fwd_128x128"  # the argument wins
    monkeypatch.setenv(cl.ENV_CONFIG, "fwd_64x128,fwd_256x128")
    with pytest.raises(ValueError, match=r"DUALFLOW_CUTLASS_CONFIG names unknown .*\['fwd_256x128'\]"):
        cl.resolve_config("fwd", 128, 128, 128)


# ----------------------------------------------------------------------------------------------------------
# scale layouts, against loops
# ----------------------------------------------------------------------------------------------------------
def _adversarial_scales(rows: int, kb: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(rows, kb, generator=g) * 10.0 ** torch.randint(-6, 6, (rows, kb), generator=g)
    if s.numel() >= 3:
        s.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), 1e-45])  # must travel unchanged
    return s


@pytest.mark.parametrize(("rows", "kb"), [(1, 1), (3, 2), (4, 3), (5, 1), (130, 4)])
@pytest.mark.parametrize("transposed_input", [False, True])
def test_scales_mn_major(rows, kb, transposed_input):
    s = _adversarial_scales(rows, kb, rows + kb)
    if transposed_input:  # a non-contiguous view must give the same result
        s = s.t().contiguous().t()
    out = cl.scales_mn_major(s)
    padded = rows + (-rows % 4)
    assert out.shape == (kb, padded) and out.is_contiguous() and out.dtype == torch.float32
    for r, j in itertools.product(range(padded), range(kb)):
        want = s[r, j].item() if r < rows else 0.0
        got = out[j, r].item()
        assert got == want or (got != got and want != want), (r, j, got, want)


def _grouped_reference(s: torch.Tensor, offsets: list[int]) -> list[float]:
    rows, kb = s.shape
    flat = [None] * (rows * kb)
    for lo, hi in itertools.pairwise(offsets):
        for j, r in itertools.product(range(kb), range(lo, hi)):
            flat[lo * kb + j * (hi - lo) + (r - lo)] = s[r, j].item()
    return flat


@pytest.mark.parametrize("sizes", [[5], [0, 3, 0, 4, 0], [128, 1, 127, 0, 2], [1, 1, 1]])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_grouped_scales_mn_major(sizes, dtype):
    kb = 3
    offsets = [0, *itertools.accumulate(sizes)]
    s = _adversarial_scales(offsets[-1], kb, len(sizes))
    got = cl.grouped_scales_mn_major(s, torch.tensor(offsets, dtype=dtype))
    want = _grouped_reference(s, offsets)
    assert got.shape == (len(want),)
    for i, (x, y) in enumerate(zip(got.tolist(), want, strict=True)):
        assert x == y or (x != x and y != y), (i, x, y)


def test_grouped_scales_with_bad_offsets_stay_inside_the_input():
    s = torch.arange(1.0, 21.0).view(10, 2)
    for offsets in ([0, 4, 2, 10], [0, 3, 25], [-5, 4, 10], [2, 6, 8]):
        got = cl.grouped_scales_mn_major(s, torch.tensor(offsets))
        assert got.shape == (20,) and set(got.tolist()) <= set(s.view(-1).tolist()), offsets
    assert cl.grouped_scales_mn_major(s[:0], torch.tensor([0, 0])).shape == (0,)


def test_block_scales_to_rows():
    b_scales = _adversarial_scales(3, 2, 7)
    rows = cl.block_scales_to_rows(b_scales, 300)
    assert rows.shape == (300, 2)
    for r in range(300):
        assert torch.equal(rows[r].nan_to_num(-1), b_scales[r // 128].nan_to_num(-1))


# ----------------------------------------------------------------------------------------------------------
# argument validation (all of it runs before the device check, so the CPU reaches every message)
# ----------------------------------------------------------------------------------------------------------
def _dense(m=64, n=256, k=256, device="cpu", rowwise_b=False):
    x, w = torch.randn(m, k), torch.randn(n, k)
    a, sa = quantize_1x128(x)
    b, sb = (quantize_1x128 if rowwise_b else quantize_128x128)(w)
    return [t.to(device) for t in (a, sa, b, sb)]


def test_valid_problems_on_the_cpu_stop_at_the_device_check():
    a, sa, b, sb = _dense()
    with pytest.raises(cl.CutlassUnsupported, match="run on CUDA tensors, got tensors on cpu") as err:
        cl.gemm_fwd(a, sa, b, sb)
    assert isinstance(err.value, BackendUnavailable) and isinstance(err.value, ValueError)
    a, sa, b, sb = _dense(rowwise_b=True)
    with pytest.raises(cl.CutlassUnsupported, match="CUDA tensors"):
        cl.gemm_wgrad(a, sa, b, sb, out=torch.zeros(64, 256), accumulate=True)
    with pytest.raises(cl.CutlassUnsupported, match="CUDA tensors"):
        cl.grouped_gemm_contiguous(a, sa, b.view(2, 128, 256), sb.view(2, 128, 2)[:, :1].contiguous(),
                                   torch.tensor([0, 30, 64]))


def test_dtype_shape_and_device_errors():
    a, sa, b, sb = _dense()
    with pytest.raises(TypeError, match=r"a must be a 2-D torch.float8_e4m3fn tensor, got torch.bfloat16"):
        cl.gemm_fwd(a.to(torch.bfloat16), sa, b, sb)
    with pytest.raises(ValueError, match=r"b must be \[N, K\] with the same K"):
        cl.gemm_fwd(a, sa, b[:, :128], sb)
    with pytest.raises(ValueError, match=r"a_scales must be float32 of shape \(64, 2\)"):
        cl.gemm_fwd(a, sa.double(), b, sb)
    with pytest.raises(ValueError, match=r"b_scales must be float32 of shape \(2, 2\) \(128x128 blocks"):
        cl.gemm_fwd(a, sa, b, sa[:2, :1])
    with pytest.raises(TypeError, match="out_dtype must be"):
        cl.gemm_fwd(a, sa, b, sb, torch.int8)
    with pytest.raises(ValueError, match="all tensors must be on one device, got a on cpu, a_scales on meta"):
        cl.gemm_fwd(a, sa.to("meta"), b, sb)
    aw, saw, bw, sbw = _dense(rowwise_b=True)
    with pytest.raises(ValueError, match=r"b_scales must be float32 of shape \(256, 2\) \(1x128 tiles"):
        cl.gemm_wgrad(aw, saw, bw, sb)
    with pytest.raises(ValueError, match="accumulate=True adds into `out`"):
        cl.gemm_wgrad(aw, saw, bw, sbw, accumulate=True)
    with pytest.raises(ValueError, match=r"out must be float32 of shape \(64, 256\)"):
        cl.gemm_wgrad(aw, saw, bw, sbw, out=torch.zeros(64, 256, dtype=torch.bfloat16))


def test_grouped_errors():
    a, sa, _, _ = _dense(m=96)
    b3, sb3 = (torch.zeros(3, 128, 256, dtype=FP8), torch.ones(3, 1, 2))
    offsets = torch.tensor([0, 32, 32, 96])
    with pytest.raises(ValueError, match=r"group_offsets must be int32/int64 of shape \(4,\) for G = 3, got "
                                         r"torch.float32"):
        cl.grouped_gemm_contiguous(a, sa, b3, sb3, offsets.float())
    with pytest.raises(ValueError, match=r"shape \(4,\) for G = 3, got torch.int64 of shape \(3,\)"):
        cl.grouped_gemm_contiguous(a, sa, b3, sb3, offsets[:3])
    with pytest.raises(ValueError, match=r"b_scales must be float32 of shape \(3, 1, 2\)"):
        cl.grouped_gemm_contiguous(a, sa, b3, sb3[:, :, :1], offsets)
    with pytest.raises(cl.CutlassUnsupported, match=r"writes torch.bfloat16"):
        cl.grouped_gemm_contiguous(a, sa, b3, sb3, offsets, torch.float32)
    with pytest.raises(cl.CutlassUnsupported, match="b must be contiguous"):
        cl.grouped_gemm_contiguous(a, sa, b3.transpose(0, 1).contiguous().transpose(0, 1), sb3, offsets)


def test_unsupported_shapes_and_layouts():
    a, sa, b, sb = _dense(k=320)
    with pytest.raises(cl.CutlassUnsupported, match=r"K must be a multiple of 128 .* got K=320"):
        cl.gemm_fwd(a, sa, b, sb)
    a, sa, b, sb = _dense(n=260)
    with pytest.raises(cl.CutlassUnsupported, match=r"N must be a multiple of 8 for a torch.bfloat16 output"):
        cl.gemm_fwd(a, sa, b, sb)
    aw, saw, bw, sbw = _dense(n=258, rowwise_b=True)
    with pytest.raises(cl.CutlassUnsupported, match=r"N must be a multiple of 4 for a torch.float32 output"):
        cl.gemm_wgrad(aw, saw, bw, sbw)
    a, sa, b, sb = _dense()
    wide = torch.zeros(64, 256 + 32, dtype=FP8)
    with pytest.raises(cl.CutlassUnsupported, match="a must have contiguous rows starting 16-byte aligned"):
        cl.gemm_fwd(wide[:, 8:264], sa, b, sb)  # base 8 bytes off
    with pytest.raises(cl.CutlassUnsupported, match="row stride of a multiple of 16 bytes"):
        cl.gemm_fwd(torch.zeros(64, 264, dtype=FP8)[:, :256], sa, b, sb)
    with pytest.raises(cl.CutlassUnsupported, match=r"b must have contiguous rows .* strides \(1, 256\)"):
        cl.gemm_fwd(a, sa, torch.zeros(256, 256, dtype=FP8).t(), sb)
    # a wider matrix whose rows stay 16-byte aligned is a supported leading dimension
    with pytest.raises(cl.CutlassUnsupported, match="CUDA tensors"):
        cl.gemm_fwd(wide[:, 16:272], sa, b, sb)
    huge = torch.empty(2**31, 128, dtype=FP8, device="meta")
    with pytest.raises(cl.CutlassUnsupported, match=r"dimensions < 2\^31, got \{'M': 2147483648\}"):
        cl.gemm_fwd(huge, torch.empty(2**31, 1, device="meta"), b[:, :128].to("meta"), sb[:, :1].to("meta"))


def test_empty_problems_need_no_kernel():
    a, sa, b, sb = _dense(m=1)
    assert cl.gemm_fwd(a[:0], sa[:0], b, sb).shape == (0, 256)
    a0, b0, s0 = torch.zeros(64, 0, dtype=FP8), torch.zeros(256, 0, dtype=FP8), torch.zeros(64, 0)
    out = torch.full((64, 256), 3.0)
    assert cl.gemm_wgrad(a0, s0, b0, torch.zeros(256, 0), out=out, accumulate=True) is out and bool((out == 3).all())
    assert bool((cl.gemm_wgrad(a0, s0, b0, torch.zeros(256, 0), out=out) == 0).all())
    assert bool((cl.gemm_fwd(a0, s0, b0, torch.zeros(2, 0)) == 0).all())


def test_kgrouped_wgrad_errors():
    (a, sa), (b, sb) = quantize_128x1(torch.randn(256, 64)), quantize_128x1(torch.randn(256, 32))  # [64|32, 256]
    offsets = torch.tensor([0, 128, 128, 256])
    with pytest.raises(TypeError, match=r"b must be a 2-D torch.float8_e4m3fn tensor"):
        cl.kgrouped_wgrad(a, sa, b.float(), sb, offsets)
    with pytest.raises(ValueError, match=r"b must be \[N, T\] with the same T"):
        cl.kgrouped_wgrad(a, sa, b[:, :128], sb, offsets)
    with pytest.raises(ValueError, match=r"b_scales must be float32 of shape \(32, 2\) \(1x128 tiles of b\[32, 256\]"):
        cl.kgrouped_wgrad(a, sa, b, sb[:, :1], offsets)
    with pytest.raises(ValueError, match=r"group_offsets must be a 1-D int32/int64 tensor .* got torch.float32"):
        cl.kgrouped_wgrad(a, sa, b, sb, offsets.float())
    with pytest.raises(cl.CutlassUnsupported, match=r"K must be a multiple of 128 .* got K=192"):
        q, s = quantize_128x1(torch.randn(192, 64))
        cl.kgrouped_wgrad(q, s, q, s, torch.tensor([0, 192]))
    (a6, sa6) = quantize_128x1(torch.randn(256, 6))
    with pytest.raises(cl.CutlassUnsupported, match=r"M and N must be multiples of 4 .* got M=6, N=32"):
        cl.kgrouped_wgrad(a6, sa6, b, sb, offsets)
    with pytest.raises(cl.CutlassUnsupported, match="CUDA tensors"):  # valid: stops at the device
        cl.kgrouped_wgrad(a, sa, b, sb, offsets)
    # nothing to multiply: no kernel, on any device
    assert cl.kgrouped_wgrad(a, sa, b, sb, offsets[:1]).shape == (0, 64, 32)
    empty = cl.kgrouped_wgrad(a[:, :0], sa[:, :0], b[:, :0], sb[:, :0], torch.tensor([0, 0, 0]))
    assert empty.shape == (2, 64, 32) and bool((empty == 0).all())


def test_engine_falls_through_to_the_next_backend_on_the_cpu():
    a, sa, b, sb = _dense()
    with pytest.raises(BackendUnavailable, match="cutlass: the CUTLASS GEMMs need CUDA tensors"):
        fp8_gemm(a, sa, b, sb, backend="cutlass")
    # both run the reference backend on the same operands: the same bits
    assert torch.equal(fp8_gemm(a, sa, b, sb, backend="cutlass,reference"), fp8_gemm(a, sa, b, sb, backend="reference"))


# ----------------------------------------------------------------------------------------------------------
# the library through ctypes (host-only entry points; the launch entry points up to their validation)
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def lib():
    if _cuda.library_path() is None:
        nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
        if nvcc and os.environ.get("DUALFLOW_CUDA", "AUTO").upper() != "OFF":
            pytest.fail("nvcc is present but libdualflow_cuda was not built (run `make build`)")
        pytest.skip("libdualflow_cuda not built (DUALFLOW_CUDA=OFF or no nvcc)")
    if "cutlass=1" not in _cuda.build_info():
        pytest.skip(f"libdualflow_cuda was built without CUTLASS ({_cuda.build_info()})")
    return cl._library()


def test_the_python_table_is_the_library_table(lib):
    assert cl.library_configs() == cl.CONFIGS
    count = len(cl.CONFIGS)
    with pytest.raises(_cuda.CudaLibraryError, match=rf"index must be in \[0, {count}\), got {count}"):
        _cuda.call("dualflow_cutlass_config_info", count, None, 0, *[None] * 7)


@pytest.mark.parametrize("config", [c.name for c in cl.CONFIGS])
def test_workspace_query_without_a_gpu(lib, config):
    kind = cl._BY_NAME[config].kind
    groups = 4 if "grouped" in kind else 1
    size = cl.workspace_size(config, 1000, 7168, 2048, groups=groups)
    assert size >= 0
    if "grouped" in kind:  # CUTLASS's per-SM descriptors plus our per-group argument arrays
        assert cl.workspace_size(config, 1000, 7168, 2048, groups=64) > size > 0
        assert cl.workspace_size(config, 1000, 7168, 2048, groups=4, num_sms=264) > size
    with pytest.raises(_cuda.CudaLibraryError, match=r"k must be a multiple of 128 .* got 200"):
        cl.workspace_size(config, 1000, 7168, 200, groups=groups)
    with pytest.raises(_cuda.CudaLibraryError, match="sm_count must be the device's number of SMs"):
        cl.workspace_size(config, 1000, 7168, 2048, groups=groups, num_sms=0)


def test_library_validation_messages(lib):
    ws = lambda *args: _cuda.call("dualflow_cutlass_workspace_size", *args, ctypes.byref(ctypes.c_size_t()))  # noqa: E731
    with pytest.raises(_cuda.CudaLibraryError, match="unknown CUTLASS configuration 'fwd_1x1'; configurations: "
                                                     "fwd_128x128, fwd_64x128, wgrad_128x128, grouped_128x128"):
        ws(b"fwd_1x1", 128, 128, 128, 1, 128, 128, 128, 128, 0, 132)
    with pytest.raises(_cuda.CudaLibraryError, match="lda must be >= k = 256 and a multiple of 16, got 264"):
        ws(b"fwd_128x128", 128, 128, 256, 1, 264, 256, 128, 128, 0, 132)
    with pytest.raises(_cuda.CudaLibraryError, match="sfa_ld must be >= m = 130 and a multiple of 4"):
        ws(b"fwd_64x128", 130, 128, 256, 1, 256, 256, 128, 130, 0, 132)
    with pytest.raises(_cuda.CudaLibraryError, match="ldd must be >= n = 100 and a multiple of 8"):
        ws(b"fwd_64x128", 128, 100, 256, 1, 256, 256, 100, 128, 0, 132)
    with pytest.raises(_cuda.CudaLibraryError, match="sfb_ld must be >= n = 128 and a multiple of 4"):
        ws(b"wgrad_128x128", 128, 128, 256, 1, 256, 256, 128, 128, 126, 132)
    with pytest.raises(_cuda.CudaLibraryError, match="grouped operands must be contiguous"):
        ws(b"grouped_128x128", 128, 128, 256, 2, 512, 256, 128, 0, 0, 132)
    with pytest.raises(_cuda.CudaLibraryError, match="groups must be 1 for a dense GEMM, got 3"):
        ws(b"fwd_128x128", 128, 128, 256, 3, 256, 256, 128, 128, 0, 132)
    with pytest.raises(_cuda.CudaLibraryError, match=r"m, n, k must be < 2\^31"):
        ws(b"fwd_128x128", 2**31, 128, 256, 1, 256, 256, 128, 2**31, 0, 132)
    kg = b"kgrouped_wgrad_128x128"
    assert cl.workspace_size(kg.decode(), 2816, 2048, 98304, groups=64) > 0  # m, n, k, groups, lda, ldb, ldd, ...
    with pytest.raises(_cuda.CudaLibraryError, match=r"d must be contiguous \[groups, m, n\] \(ldd = n = 128\)"):
        ws(kg, 256, 128, 512, 2, 512, 512, 256, 256, 128, 132)
    with pytest.raises(_cuda.CudaLibraryError, match="MN-major with sfa_ld = m and sfb_ld = n, both multiples of 4; "
                                                     "got m=256 n=128 sfa_ld=260"):
        ws(kg, 256, 128, 512, 2, 512, 512, 128, 260, 128, 132)
    with pytest.raises(_cuda.CudaLibraryError, match="got m=254 n=128 sfa_ld=254"):
        ws(kg, 254, 128, 512, 2, 512, 512, 128, 254, 128, 132)
    with pytest.raises(_cuda.CudaLibraryError, match="lda must be >= k = 512 and a multiple of 16, got 256"):
        ws(kg, 256, 128, 512, 2, 256, 512, 128, 256, 128, 132)


def test_launch_entry_points_validate_before_touching_the_gpu(lib):
    fwd = lambda config, a, b, d, sfa, sfb, ld=256: _cuda.call(  # noqa: E731
        "dualflow_cutlass_gemm_fwd", config, 128, 128, 256, a, ld, sfa, 128, b, 256, sfb, d, 128, 132, 0, 0, 0)
    with pytest.raises(_cuda.CudaLibraryError, match="a, b, d, sfa and sfb must not be NULL"):
        fwd(b"fwd_128x128", 0, 256, 256, 256, 256)
    with pytest.raises(_cuda.CudaLibraryError, match=r"must be 16-byte aligned .* a=0x108"):
        fwd(b"fwd_128x128", 0x108, 256, 256, 256, 256)
    with pytest.raises(_cuda.CudaLibraryError, match="sfb must be 4-byte aligned"):
        fwd(b"fwd_128x128", 256, 256, 256, 256, 258)
    with pytest.raises(_cuda.CudaLibraryError, match="'wgrad_128x128' is a weight-gradient GEMM, this call needs a "
                                                     "forward/input-gradient one: fwd_128x128, fwd_64x128"):
        fwd(b"wgrad_128x128", 256, 256, 256, 256, 256)
    with pytest.raises(_cuda.CudaLibraryError, match="unknown CUTLASS configuration '\\(null\\)'"):
        fwd(None, 256, 256, 256, 256, 256)
    grouped = lambda offsets, offsets_bytes, errors: _cuda.call(  # noqa: E731
        "dualflow_cutlass_grouped_gemm", b"grouped_64x128", 128, 128, 256, 2, 256, 256, 256, 256, offsets,
        offsets_bytes, errors, 256, 132, 0, 0, 0)
    with pytest.raises(_cuda.CudaLibraryError, match="offsets_bytes must be 4 or 8, got 2"):
        grouped(256, 2, 0)
    with pytest.raises(_cuda.CudaLibraryError, match="offsets must be a non-NULL, 8-byte aligned"):
        grouped(4, 8, 0)
    with pytest.raises(_cuda.CudaLibraryError, match="errors must be NULL or an 8-byte aligned device pointer"):
        grouped(256, 8, 260)
    kgrouped = lambda config, offsets, offsets_bytes: _cuda.call(  # noqa: E731
        "dualflow_cutlass_kgrouped_wgrad", config, 128, 128, 256, 2, 256, 256, 256, 256, 256, 256, offsets,
        offsets_bytes, 0, 256, 132, 0, 0, 0)
    with pytest.raises(_cuda.CudaLibraryError, match="offsets_bytes must be 4 or 8, got 3"):
        kgrouped(b"kgrouped_wgrad_128x128", 256, 3)
    with pytest.raises(_cuda.CudaLibraryError, match="'grouped_64x128' is a grouped GEMM, this call needs a "
                                                     "k-grouped weight-gradient one: kgrouped_wgrad_128x128"):
        kgrouped(b"grouped_64x128", 256, 8)
    with pytest.raises(_cuda.CudaLibraryError, match="k must be a multiple of 128"):
        _cuda.call("dualflow_cutlass_gemm_wgrad", b"wgrad_128x128", 128, 128, 192, 256, 192, 256, 128, 256, 192, 256,
                   128, 256, 128, 1, 132, 0, 0, 0)
