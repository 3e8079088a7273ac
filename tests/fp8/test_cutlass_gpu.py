"""The CUTLASS kernels on a Hopper GPU, against the reference backend and the unquantized GEMM.

Agreement with the reference: the reference sums each 128-wide K block exactly in FP32, the tensor
core adds the FP8 products of a block with its own limited-precision accumulator (about 14 bits,
DeepSeek-V3 section 3.3) before the FP32 promotion. Outputs must therefore agree to the output format's
rounding plus 2^-10 of ``|A| @ |B|^T`` (the sum of the magnitudes that entered each output), and to
nothing looser: a scale taken from a wrong block, or a lost promotion, is off by whole multiples of the
magnitudes (the data's magnitudes jump by decades between blocks).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dualflow import _cuda
from dualflow.fp8 import (
    Fp8ErrorFlag,
    Fp8Linear,
    Fp8Recipe,
    fp8_gemm,
    fp8_grouped_gemm,
    fp8_grouped_mlp,
    quantize_1x128,
    quantize_128x1,
    quantize_128x128,
)
from dualflow.fp8 import cutlass as cl
from dualflow.fp8.groups import RECORD_SIZE, first_malformed
from dualflow.fp8.moe import grouped_mlp_reference
from tests.fp8.helpers import assert_agrees, gemm_error, magnitude, scaled_randn
from tests.fp8.test_groups import guard_rows, guarded

pytestmark = pytest.mark.gpu
REF = "reference"
FWD = [c.name for c in cl.CONFIGS if c.kind == "fwd"]
GROUPED = [c.name for c in cl.CONFIGS if c.kind == "grouped"]


@pytest.fixture(autouse=True)
def hopper(monkeypatch):
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        pytest.skip(f"the CUTLASS kernels are sm90a; this GPU is sm{major}{minor}")
    if not cl.is_available():
        pytest.fail("a Hopper GPU is present but libdualflow_cuda has no CUTLASS GEMMs (`make build` with the "
                    "nvidia-cutlass package installed)")
    monkeypatch.delenv(cl.ENV_CONFIG, raising=False)


def _data(rows: int, cols: int, seed: int, adversarial: bool) -> torch.Tensor:
    x = scaled_randn(rows, cols, seed) if adversarial else torch.randn(rows, cols, generator=torch.Generator()
                                                                       .manual_seed(seed))
    return x.cuda()


# ----------------------------------------------------------------------------------------------------------
# forward / input gradient
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [*FWD, None])
@pytest.mark.parametrize(("m", "n", "k"), [(64, 256, 512), (200, 264, 1024), (1, 128, 128), (1000, 2048, 2048)])
def test_fwd(config, m, n, k):
    for adversarial in (False, True):
        x, w = _data(m, k, 1, adversarial), _data(n, k, 2, adversarial)
        a, sa = quantize_1x128(x)
        b, sb = quantize_128x128(w)
        got = cl.gemm_fwd(a, sa, b, sb, config=config)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        assert_agrees(got, fp8_gemm(a, sa, b, sb, backend=REF), magnitude(a, sa, 1, b, sb, 128))
        if not adversarial:
            assert gemm_error(got, x.double() @ w.double().T) < 1e-3


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_fwd_wider_outputs_run_on_the_weight_gradient_kernel(out_dtype):
    # FP16 overflows at 65504: the adversarial data (magnitudes up to 1e4) would make the comparison one
    # of overflow positions, decided by the last bits of sums above the range, not of the kernel
    adversarial = out_dtype != torch.float16
    x, w = _data(300, 384, 3, adversarial), _data(520, 384, 4, adversarial)
    a, sa = quantize_1x128(x)
    b, sb = quantize_128x128(w)
    got = cl.gemm_fwd(a, sa, b, sb, out_dtype)
    assert got.dtype == out_dtype
    assert_agrees(got, fp8_gemm(a, sa, b, sb, out_dtype, backend=REF), magnitude(a, sa, 1, b, sb, 128))
    with pytest.raises(ValueError, match="cannot run a wgrad GEMM"):
        cl.gemm_fwd(a, sa, b, sb, out_dtype, config="fwd_128x128")


def test_each_forced_config_runs_its_own_kernel(monkeypatch):
    a, sa = quantize_1x128(_data(512, 512, 5, False))
    b, sb = quantize_128x128(_data(512, 512, 6, False))
    schedule = {"cooperative": "CooperativeFP8Blockwise", "pingpong": "PingpongFP8Blockwise"}
    for config in FWD:
        for how in ("argument", "environment"):
            if how == "environment":
                monkeypatch.setenv(cl.ENV_CONFIG, config)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                cl.gemm_fwd(a, sa, b, sb, config=config if how == "argument" else None)
                torch.cuda.synchronize()
            monkeypatch.delenv(cl.ENV_CONFIG, raising=False)
            names = [e.name for e in prof.events() if "GemmUniversal" in e.name]
            wanted = schedule[cl._BY_NAME[config].schedule]
            assert names and all(wanted in n for n in names), (config, how, [n[:200] for n in names])


def test_leading_dimensions_are_read_in_place():
    x, w = _data(256, 1024, 7, True), _data(384, 1024, 8, True)
    a, sa = quantize_1x128(x)
    b, sb = quantize_128x128(w)
    wide_a = torch.zeros(256, 1024 + 256, dtype=a.dtype, device="cuda")
    wide_a[:, 128:1152] = a
    got = cl.gemm_fwd(wide_a[:, 128:1152], sa, b, sb)
    # the same kernel on the same values and shape (only the row stride differs): the same bits
    assert torch.equal(got, cl.gemm_fwd(a, sa, b, sb))


def test_non_finite_tiles_stay_non_finite():
    x = _data(256, 512, 9, False)
    x[3, 200], x[130, 10] = float("nan"), float("inf")
    a, sa = quantize_1x128(x)
    b, sb = quantize_128x128(_data(256, 512, 10, False))
    got = cl.gemm_fwd(a, sa, b, sb)
    assert not torch.isfinite(got[[3, 130]]).any() and torch.isfinite(got[:3]).all()
    assert_agrees(got, fp8_gemm(a, sa, b, sb, backend=REF), magnitude(a, sa, 1, b, sb, 128).nan_to_num())


# ----------------------------------------------------------------------------------------------------------
# weight gradient
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("tokens", "d_in", "d_out"), [(512, 256, 384), (384, 132, 200), (4096, 1024, 512)])
def test_wgrad_with_the_engines_128x1_operands(tokens, d_in, d_out):
    x, dy = _data(tokens, d_in, 11, False), _data(tokens, d_out, 12, False)
    a, sa = quantize_128x1(dy)  # dy.T [d_out, tokens], 1x128 along the tokens
    b, sb = quantize_128x1(x)   # x.T  [d_in, tokens]
    got = cl.gemm_wgrad(a, sa, b, sb)
    assert got.dtype == torch.float32 and got.shape == (d_out, d_in)
    mag = magnitude(a, sa, 1, b, sb, 1)
    assert_agrees(got, fp8_gemm(a, sa, b, sb, torch.float32, backend=REF), mag)
    assert gemm_error(got, dy.double().T @ x.double()) < 1e-3
    # accumulation adds in FP32; without it a NaN-filled buffer is fully overwritten (C is not read)
    start = torch.randn(d_out, d_in, device="cuda") * got.abs().mean()
    acc = start.clone()
    assert cl.gemm_wgrad(a, sa, b, sb, out=acc, accumulate=True) is acc
    assert_agrees(acc, start + fp8_gemm(a, sa, b, sb, torch.float32, backend=REF), mag + start.abs())
    poisoned = torch.full((d_out, d_in), float("nan"), device="cuda")
    assert torch.equal(cl.gemm_wgrad(a, sa, b, sb, out=poisoned), got)  # the same kernel and inputs as `got`


def test_wgrad_adversarial_magnitudes():
    a, sa = quantize_1x128(_data(256, 640, 13, True))
    b, sb = quantize_1x128(_data(136, 640, 14, True))
    assert_agrees(cl.gemm_wgrad(a, sa, b, sb), fp8_gemm(a, sa, b, sb, torch.float32, backend=REF),
                  magnitude(a, sa, 1, b, sb, 1))


# ----------------------------------------------------------------------------------------------------------
# weight gradient grouped along the tokens (MoE experts)
# ----------------------------------------------------------------------------------------------------------
def _token_groups(counts, m, n, seed, adversarial, index_dtype=torch.int64):
    """128x1-quantized ``dy.T [m, T]`` and ``x.T [n, T]`` with 128 rows after the last group (in no group)."""
    offsets = torch.tensor([0, *itertools.accumulate(counts)], dtype=index_dtype, device="cuda")
    total = int(offsets[-1]) + 128
    (a, sa), (b, sb) = quantize_128x1(_data(total, m, seed, adversarial)), quantize_128x1(
        _data(total, n, seed + 1, adversarial))
    return a, sa, b, sb, offsets


KGROUPED_CONFIGS = [c.name for c in cl.CONFIGS if c.kind == "kgrouped_wgrad"]


@pytest.mark.parametrize("counts", [[128, 0, 384, 1024, 0], [0, 0], [2048], [128] * 16, [0, 256]])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("config", KGROUPED_CONFIGS)
def test_kgrouped_wgrad(counts, index_dtype, config):
    m, n = 384, 264
    for adversarial in (False, True):
        a, sa, b, sb, offsets = _token_groups(counts, m, n, 70, adversarial, index_dtype)
        got = cl.kgrouped_wgrad(a, sa, b, sb, offsets, config=config)
        assert got.dtype == torch.float32 and got.shape == (len(counts), m, n)
        want = torch.ops.dualflow.grouped_wgrad(a, sa, b, sb, offsets, "reference")
        for g, (lo, hi) in enumerate(itertools.pairwise(offsets.tolist())):
            if hi == lo:
                assert torch.equal(got[g], torch.zeros_like(got[g])), "a group without tokens must get zeros"
                continue
            kb = slice(lo // 128, hi // 128)
            assert_agrees(got[g], want[g], magnitude(a[:, lo:hi], sa[:, kb], 1, b[:, lo:hi], sb[:, kb], 1))


@pytest.mark.parametrize("offsets", [[0, 512, 128, 640], [-128, 128, 256, 640], [0, 100, 300, 640],
                                     [0, 256, 256, 9999]], ids=lambda o: "_".join(map(str, o)))
@pytest.mark.parametrize("config", KGROUPED_CONFIGS)
def test_kgrouped_wgrad_with_malformed_offsets_stays_in_bounds(offsets, config):
    # operands inside NaN guard columns of their storage (a read outside them puts a NaN into the output);
    # the output is a fresh tensor, so a write outside it would corrupt memory the guards would not see:
    # compute-sanitizer on this test is the stronger check
    m, n, t = 256, 128, 640
    (a, sa), (b, sb) = quantize_128x1(_data(t, m, 80, False)), quantize_128x1(_data(t, n, 81, False))
    pad = 128

    def guarded_columns(x, fill):
        store = torch.full((x.shape[0], x.shape[1] + 2 * pad), fill, dtype=torch.float32, device="cuda").to(x.dtype)
        store[:, pad:-pad] = x
        return store[:, pad:-pad]

    nan8 = float("nan")
    a_in, b_in = guarded_columns(a, nan8), guarded_columns(b, nan8)
    index = torch.tensor(offsets, dtype=torch.int64, device="cuda")
    got = cl.kgrouped_wgrad(a_in, sa, b_in, sb, index, config=config)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all(), "a read outside a or b (their guards are NaN)"


def test_kgrouped_wgrad_in_a_cuda_graph_and_in_the_expert_layer():
    counts = [256, 0, 640, 128]
    a, sa, b, sb, offsets = _token_groups(counts, 256, 128, 90, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cl.kgrouped_wgrad(a, sa, b, sb, offsets)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cl.kgrouped_wgrad(a, sa, b, sb, offsets)
    fresh = _token_groups(counts, 256, 128, 91, True)
    for dst, src in zip((a, sa, b, sb), fresh[:4], strict=True):
        dst.copy_(src)
    graph.replay()
    assert torch.equal(captured, cl.kgrouped_wgrad(*fresh))  # the same kernel on the same data: same bits
    # the experts' layer on the cutlass backend takes it for both weight gradients
    torch.manual_seed(3)
    e, d, h = 4, 256, 384
    x = torch.randn(int(offsets[-1]), d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w13 = (torch.randn(e, 2 * h, d, device="cuda") / d ** 0.5).requires_grad_(True)
    w2 = (torch.randn(e, d, h, device="cuda") / h ** 0.5).requires_grad_(True)
    dy = torch.randn(int(offsets[-1]), d, device="cuda", dtype=torch.bfloat16)
    grads = {}
    for backend in ("cutlass", "triton"):
        for t in (x, w13, w2):
            t.grad = None
        fp8_grouped_mlp(x, w13, w2, offsets, Fp8Recipe(backend=backend)).backward(dy)
        grads[backend] = [t.grad.clone() for t in (x, w13, w2)]
    for t in (x, w13, w2):
        t.grad = None
    grouped_mlp_reference(x.double(), w13.double(), w2.double(), offsets).backward(dy.double())
    for got, triton, exact in zip(grads["cutlass"], grads["triton"], (x.grad, w13.grad, w2.grad), strict=True):
        assert gemm_error(got, exact) < 0.05  # FP8 against float64: the recipe's error
        assert gemm_error(got, triton) < 1e-5  # the same quantized operands, two kernels: accumulation order


# ----------------------------------------------------------------------------------------------------------
# grouped (MoE experts, contiguous rows)
# ----------------------------------------------------------------------------------------------------------
def _experts(groups: int, n: int, k: int, seed: int, adversarial: bool):
    w = torch.stack([_data(n, k, seed + g, adversarial) for g in range(groups)])
    parts = [quantize_128x128(w[g]) for g in range(groups)]
    return w, torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


@pytest.mark.parametrize("config", [*GROUPED, None])
@pytest.mark.parametrize("sizes", [[128, 256, 0, 128], [100, 0, 37, 200], [0, 0, 5], [1] * 9, [0, 300, 0], [700]])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_grouped(config, sizes, index_dtype):
    k, n = 512, 264
    for adversarial in (False, True):
        x = _data(sum(sizes), k, 20, adversarial)
        w, b, sb = _experts(len(sizes), n, k, 30, adversarial)
        a, sa = quantize_1x128(x)
        offsets = torch.tensor([0, *itertools.accumulate(sizes)], dtype=index_dtype, device="cuda")
        got = cl.grouped_gemm_contiguous(a, sa, b, sb, offsets, config=config)
        want = fp8_grouped_gemm(a, sa, b, sb, group_offsets=offsets, backend=REF)
        for g, (lo, hi) in enumerate(itertools.pairwise(offsets.tolist())):
            if hi == lo:
                continue
            assert_agrees(got[lo:hi], want[lo:hi], magnitude(a[lo:hi], sa[lo:hi], 1, b[g], sb[g], 128))
            if not adversarial:
                assert gemm_error(got[lo:hi], x[lo:hi].double() @ w[g].double().T) < 1e-3


@pytest.mark.parametrize("config", GROUPED)
@pytest.mark.parametrize("offsets", [[0, 500, 100, 256], [-7, 3, 2, 256], [0, 200, 60, 256], [0, 100, 256, 480],
                                     [-200, -100, 150, 120], [0, 0, 0, 0], [0, 56, 56, 256]],
                         ids=lambda o: "_".join(map(str, o)))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_grouped_with_malformed_offsets_stays_in_bounds(config, offsets, index_dtype):
    # The C ABI directly, on operands inside guard rows of their storage: NaN around A and its scales (a
    # read outside them puts a NaN into the output), a sentinel around D (a write outside it changes one);
    # every malformed case overshoots by less than the guard.
    t, n, k, groups = 256, 128, 256, 3
    a, sa = quantize_1x128(_data(t, k, 40, False))
    _, b, sb = _experts(groups, n, k, 41, False)
    index = torch.tensor(offsets, dtype=index_dtype, device="cuda")
    _, a_in = guarded(a, float("nan"))
    _, sfa_in = guarded(cl.grouped_scales_mn_major(sa, index).view(t, -1), float("nan"))
    sentinel = -(2.0 ** 100)  # exact in BF16, far from any output of this data
    d_store, d = guarded(torch.full((t, n), sentinel, dtype=torch.bfloat16, device="cuda"), sentinel)
    before = guard_rows(d_store).clone()
    errors = torch.zeros(RECORD_SIZE, dtype=torch.int64, device="cuda")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    size = cl.workspace_size(config, t, n, k, groups=groups, num_sms=num_sms)
    workspace = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
    _cuda.call("dualflow_cutlass_grouped_gemm", config.encode(), t, n, k, groups, a_in.data_ptr(), sfa_in.data_ptr(),
               b.data_ptr(), sb.data_ptr(), index.data_ptr(), index.element_size(), errors.data_ptr(), d.data_ptr(),
               num_sms, workspace.data_ptr(), size, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    # untouched memory compared with what was written there: bitwise equality holds on any machine
    assert torch.equal(guard_rows(d_store), before), "a write outside D"
    written = (d != sentinel).any(-1)
    assert torch.isfinite(d[written].float()).all(), "a read outside A or its scales (their guards are NaN)"
    found = first_malformed(offsets, "contiguous", t)
    assert errors.tolist() == ([0] * RECORD_SIZE if found is None else [1, *found, t])
    if found is None:
        want = fp8_grouped_gemm(a, sa, b, sb, group_offsets=index, backend=REF)
        for g, (lo, hi) in enumerate(itertools.pairwise(offsets)):
            assert_agrees(d[lo:hi], want[lo:hi], magnitude(a[lo:hi], sa[lo:hi], 1, b[g], sb[g], 128))
        assert int(written.sum()) == offsets[-1] - offsets[0]


@pytest.mark.parametrize("offsets", [[0, 128, 384, 384, 1024], [0, 5, 17, 400, 1000], [0, 0, 0, 1024],
                                     [0, 500, 100, 1024], [-7, 3, 2, 1024], [0, 100, 256, 1480], [-200, -100, 150, 120],
                                     [3, 900, 4, 1024], [0, 1024]], ids=lambda o: "_".join(map(str, o)))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("m_major", [False, True])
def test_grouped_scales_kernel_equals_the_torch_gather(offsets, index_dtype, m_major):
    # the library's one-kernel conversion against the torch reference, bit for bit (a gather: no
    # arithmetic on the values), on well-formed, unsorted, negative and overshooting offsets, with
    # NaN/Inf/denormal scales and both scale layouts the quantizers write
    from tests.fp8.test_cutlass import _adversarial_scales

    t, kb = 1024, 7
    s = _adversarial_scales(t, kb, len(offsets)).cuda()
    if m_major:
        s = s.t().contiguous().t()
    index = torch.tensor(offsets, dtype=index_dtype, device="cuda")
    got = cl.grouped_scales_mn_major_cuda(s, index)
    want = cl.grouped_scales_mn_major(s, index)
    assert got.shape == want.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_grouped_malformed_offsets_reach_the_error_flag():
    a, sa = quantize_1x128(_data(256, 256, 46, False))
    _, b, sb = _experts(3, 128, 256, 47, False)
    bad = torch.tensor([0, 200, 60, 256], dtype=torch.int32, device="cuda")
    flag = Fp8ErrorFlag("cuda")
    cl.grouped_gemm_contiguous(a, sa, b, sb, bad, errors=flag.record)
    with pytest.raises(ValueError, match=r"group 1 has group_offsets\[1\] = 200, group_offsets\[2\] = 60"):
        flag.check()
    fp8_grouped_gemm(a, sa, b, sb, group_offsets=bad, backend="cutlass", errors=flag)  # returns: no sync
    with pytest.raises(ValueError, match=r"group 1 has group_offsets\[1\] = 200"):
        flag.check()
    with pytest.raises(ValueError, match=r"group 1 has group_offsets\[1\] = 200"):  # no flag: read back first
        fp8_grouped_gemm(a, sa, b, sb, group_offsets=bad, backend="cutlass")


# ----------------------------------------------------------------------------------------------------------
# the C ABI on the device, the engine's backend, several GPUs
# ----------------------------------------------------------------------------------------------------------
def test_too_small_a_workspace_is_an_error():
    a, sa = quantize_1x128(_data(256, 256, 42, False))
    _, b, sb = _experts(2, 128, 256, 43, False)
    offsets = torch.tensor([0, 100, 256], dtype=torch.int32, device="cuda")
    out = torch.empty(256, 128, dtype=torch.bfloat16, device="cuda")
    sfa = cl.grouped_scales_mn_major(sa, offsets)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    needed = cl.workspace_size("grouped_128x128", 256, 128, 256, groups=2, num_sms=num_sms)
    assert needed > 0
    with pytest.raises(_cuda.CudaLibraryError, match=f"the workspace has 64 bytes, this problem needs {needed}"):
        _cuda.call("dualflow_cutlass_grouped_gemm", b"grouped_128x128", 256, 128, 256, 2, a.data_ptr(),
                   sfa.data_ptr(), b.data_ptr(), sb.data_ptr(), offsets.data_ptr(), 4, 0, out.data_ptr(), num_sms,
                   torch.empty(64, dtype=torch.uint8, device="cuda").data_ptr(), 64,
                   torch.cuda.current_stream().cuda_stream)


def test_cuda_graph_capture_replays_on_new_data():
    def operands(seed):
        a, sa = quantize_1x128(_data(384, 512, seed, True))
        b, sb = quantize_128x128(_data(256, 512, seed + 1, True))
        bw, sbw = quantize_1x128(_data(256, 512, seed + 2, True))
        _, be, sbe = _experts(3, 256, 512, seed + 3, True)
        return a, sa, b, sb, bw, sbw, be, sbe

    offsets = torch.tensor([0, 100, 100, 384], dtype=torch.int32, device="cuda")

    def run(a, sa, b, sb, bw, sbw, be, sbe):
        return (cl.gemm_fwd(a, sa, b, sb), cl.gemm_wgrad(a, sa, bw, sbw),
                cl.grouped_gemm_contiguous(a, sa, be, sbe, offsets))

    inputs = operands(50)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(*inputs)  # first calls outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(*inputs)
    fresh = operands(60)
    for dst, src in zip(inputs, fresh, strict=True):
        dst.copy_(src)
    graph.replay()
    for got, want in zip(captured, run(*fresh), strict=True):  # the same kernels on the same data: same bits
        assert torch.equal(got, want)


def test_fp8_linear_on_the_cutlass_backend_matches_the_reference_backend():
    torch.manual_seed(0)
    layers = {name: Fp8Linear(512, 384, bias=False, device="cuda", dtype=torch.bfloat16,
                              recipe=Fp8Recipe(backend=name)) for name in ("cutlass", REF)}
    layers[REF].load_state_dict(layers["cutlass"].state_dict())
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(256, 384, device="cuda", dtype=torch.bfloat16)
    results = {}
    for name, layer in layers.items():
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        results[name] = (y, xi.grad, layer.weight.grad)
    for got, want in zip(results["cutlass"], results[REF], strict=True):
        assert gemm_error(got, want) < 1e-5


@pytest.mark.multigpu
def test_operands_on_another_device_than_the_current_one():
    with torch.cuda.device(1):
        a, sa = quantize_1x128(_data(128, 256, 44, False).to("cuda:1"))
        b, sb = quantize_128x128(_data(256, 256, 45, False).to("cuda:1"))
    with torch.cuda.device(0):
        got = cl.gemm_fwd(a, sa, b, sb)
    assert got.device == torch.device("cuda:1")
    assert_agrees(got, fp8_gemm(a, sa, b, sb, backend=REF), magnitude(a, sa, 1, b, sb, 128))
