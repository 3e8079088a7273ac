"""The Triton kernels compile for sm90 without a GPU, into the instructions the bit-exactness relies on.

The CPU tests run the kernels under the interpreter, which cannot show what the GPU compiler makes of
them: these tests compile them for Hopper (Triton's bundled ptxas, no device needed) and read the PTX.
The compile runs in a subprocess without ``TRITON_INTERPRET`` (under it, ``@triton.jit`` makes
interpreted functions that cannot be compiled). The grouped kernels, with their error record, compile
for sm90 and sm89; for sm80 the FP8 kernels do not compile at all, which is why the Triton backends
require compute capability 8.9 (dualflow.fp8.triton_support).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _compile(fn, signature: dict, constexprs: dict, hinted: list[str], arch: int = 90, **options):
    """Compile ``fn`` for ``sm{arch}`` as a launch would: integer 1s specialized, pointers and named ints
    16-aligned."""
    names = list(signature)  # outside the try: a wrong name here is this test's bug, not Triton's API
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    try:  # the ahead-of-time API is private and moves between Triton versions
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    except (ImportError, TypeError, ValueError, KeyError, AttributeError) as exc:
        print(json.dumps({"api_mismatch": f"{type(exc).__name__}: {exc}"}))
        sys.exit(0)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _quantizer() -> dict:
    from dualflow.fp8.kernels import quant

    order = ["x_ptr", "R", "C", "sxr", "sxc", "q_ptr", "s_ptr", "sqr", "ssr", "ssc", "qt_ptr", "st_ptr", "sqtr",
             "sstr", "sstc", "GROUP_ROWS"]
    ptrs = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "qt_ptr": "*fp8e4nv", "st_ptr": "*fp32"}
    hinted = ["x_ptr", "q_ptr", "qt_ptr", "R", "C", "sxr"]
    report = {}
    for name, flags in (
        ("fused", {"ROWWISE": True, "COLWISE": True, "BLOCKWISE": False, "POW2": True, "TILE_R": 128, "TILE_C": 128,
                   "BLOCK_T": False}),
        ("blockwise", {"ROWWISE": False, "COLWISE": False, "BLOCKWISE": True, "POW2": True, "TILE_R": 128,
                       "TILE_C": 128, "BLOCK_T": True}),  # with the transposed copy
    ):
        signature = {n: ptrs.get(n, "i32") for n in order} | {k: "constexpr" for k in flags}
        ptx = _compile(quant._quant_kernel, signature, flags, hinted, num_warps=4).asm["ptx"]
        report[name] = {"div_rn": "div.rn.f32" in ptx, "satfinite": "cvt.rn.satfinite.e4m3x2.f32" in ptx,
                        "approximate": any(s in ptx for s in ("div.full", "div.approx", "rcp.approx"))}
    return report


def _gemm() -> dict:
    from dualflow.fp8.kernels import gemm

    order = ["a_ptr", "sa_ptr", "b_ptr", "sb_ptr", "c_ptr", "M", "N", "K", "s_am", "s_ak", "s_sam", "s_sak", "s_bn",
             "s_bk", "s_sbn", "s_sbk", "s_cm", "s_cn"]
    ptrs = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "sa_ptr": "*fp32", "sb_ptr": "*fp32", "c_ptr": "*bf16"}
    unit = {"s_ak": 1, "s_bk": 1, "s_sak": 1, "s_sbk": 1, "s_cn": 1}  # what the JIT specializes
    flags = {"B_ROWWISE": False, "ACCUMULATE": False, "EVEN_K": True, "BLOCK_M": 128, "BLOCK_N": 128,
             "BLOCK_K": 128, "GROUP_M": 8}
    signature = {n: ptrs.get(n, "constexpr" if n in unit else "i32") for n in order} | {k: "constexpr" for k in flags}
    kernel = _compile(gemm._dense_kernel, signature, unit | flags, [*ptrs, "N", "K", "s_am", "s_bn", "s_cm"],
                      num_warps=8, num_stages=3)
    return {"wgmma_e4m3": "wgmma.mma_async" in kernel.asm["ptx"] and "e4m3" in kernel.asm["ptx"],
            "async_copies": kernel.asm["ttgir"].count("async_copy_global_to_local")}


def _grouped() -> dict:
    from dualflow.fp8.kernels import gemm

    ptrs = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "sa_ptr": "*fp32", "sb_ptr": "*fp32", "c_ptr": "*bf16",
            "offsets_ptr": "*i32", "counts_ptr": "*i32", "errors_ptr": "*i64"}
    unit = {"s_ak": 1, "s_bk": 1, "s_sak": 1, "s_sbk": 1, "s_cn": 1}
    flags = {"RECORD": True, "EVEN_K": True, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}
    kernels = {"contiguous": (gemm._contiguous_kernel, "offsets_ptr"), "masked": (gemm._masked_kernel, "counts_ptr")}
    report, signatures = {}, {}
    for name, (fn, index) in kernels.items():
        pointers = ["a_ptr", "sa_ptr", "b_ptr", "sb_ptr", "c_ptr", index, "errors_ptr"]
        # the flags are the last parameters; every other one not a pointer is an int
        signatures[name] = {n: ptrs[n] if n in pointers else "constexpr" if n in unit else "i32"
                            for n in fn.arg_names if n not in flags} | {k: "constexpr" for k in flags}
        for arch, record in ((90, True), (89, True), (90, False)):
            ptx = _compile(fn, signatures[name], unit | flags | {"RECORD": record}, pointers, arch, num_warps=8,
                           num_stages=3).asm["ptx"]
            # the record is the kernel's only 64-bit store
            report[f"{name}_sm{arch}{'' if record else '_norecord'}"] = {"fp8_mma": "e4m3" in ptx,
                                                                        "records": "st.global.b64" in ptx}
    try:
        _compile(gemm._contiguous_kernel, signatures["contiguous"], unit | flags, ["a_ptr", "b_ptr", "c_ptr"], 80,
                 num_warps=8)
        report["sm80"] = "compiled"
    except Exception as exc:  # the compiler's own error type varies between versions
        report["sm80"] = f"{type(exc).__name__}: {exc}"
    return report


def report() -> None:
    """Entry point of the subprocess: print what the PTX holds, as JSON."""
    print(json.dumps({"quant": _quantizer(), "gemm": _gemm(), "grouped": _grouped()}))


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from tests.fp8.test_compile_sm90 import report; report()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "api_mismatch" in result:
        pytest.skip(f"triton {triton.__version__}'s ahead-of-time compile API differs: {result['api_mismatch']}")
    return result


@pytest.mark.parametrize("kernel", ["fused", "blockwise"])
def test_quantizer_uses_exact_division_and_saturating_round_to_nearest_even(compiled, kernel):
    ptx = compiled["quant"][kernel]
    assert ptx["div_rn"], "1/scale and amax/448 must be correctly rounded divisions"
    assert not ptx["approximate"]
    assert ptx["satfinite"]


def test_gemm_is_a_pipelined_wgmma_loop(compiled):
    assert compiled["gemm"]["wgmma_e4m3"]
    assert compiled["gemm"]["async_copies"] >= 2, "operand loads are not pipelined"


@pytest.mark.parametrize("kernel", ["contiguous", "masked"])
def test_grouped_kernels_compile_from_sm89_with_their_error_record(compiled, kernel):
    for arch in ("sm90", "sm89"):
        assert compiled["grouped"][f"{kernel}_{arch}"] == {"fp8_mma": True, "records": True}, arch
    assert compiled["grouped"][f"{kernel}_sm90_norecord"] == {"fp8_mma": True, "records": False}


def test_fp8_kernels_do_not_compile_below_sm89(compiled):
    from dualflow.fp8.triton_support import MIN_CAPABILITY

    assert MIN_CAPABILITY == (8, 9)
    assert "fp8e4nv not supported" in compiled["grouped"]["sm80"], compiled["grouped"]["sm80"]
