"""The ``torch.ops.dualflow`` operators pass ``torch.library.opcheck`` (schema, fake implementation with the
real shapes/dtypes/strides, tracing with dynamic shapes), on random and adversarial inputs; the reference
backend everywhere and the Triton kernels under the interpreter on small shapes."""

from __future__ import annotations

import pytest
import torch

import dualflow.fp8  # noqa: F401 (registers the operators)
from dualflow.fp8 import quantize_1x128, quantize_1x128_and_128x1, quantize_128x1, quantize_128x128
from dualflow.fp8.groups import RECORD_SIZE
from tests.fp8.helpers import adversarial, assert_same_fp8, assert_same_scales

ops = torch.ops.dualflow
# test_aot_dispatch_dynamic compares values: every output of these cases is fully defined
_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INTS[t.element_size()])


def _opcheck(op, args):
    """opcheck. Two of its checks cannot read FP8 or NaN, and are made here instead: its schema check compares
    inputs with arithmetic torch lacks for FP8 (so with FP8 inputs, this checks bit for bit that the inputs
    the schema does not declare mutable stay unchanged), and its comparison of traced with eager values
    counts NaN != NaN (so with NaN in an output, the traced operator's values are compared bit for bit)."""
    fp8_inputs = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)
    mutable = {i for i, a in enumerate(op._schema.arguments) if a.alias_info is not None and a.alias_info.is_write}
    before = [_bits(a).clone() if isinstance(a, torch.Tensor) and i not in mutable else None
              for i, a in enumerate(args)]
    eager = op(*args)
    outs = eager if isinstance(eager, tuple) else (eager,)
    if fp8_inputs:
        for old, arg in zip(before, args):
            assert old is None or torch.equal(old, _bits(arg)), "an input the schema does not declare mutable changed"
    has_nan = any(o is not None and o.is_floating_point() and o.float().isnan().any() for o in outs)
    checks = [c for c in _CHECKS if not (c == "test_schema" and fp8_inputs)
              and not (c == "test_aot_dispatch_dynamic" and has_nan)]
    torch.library.opcheck(op, args, test_utils=checks)
    if not has_nan:
        return
    torch.compiler.reset()  # one lambda serves every operator: start from a fresh cache each time
    traced = torch.compile(lambda *a: op(*a), backend="aot_eager", fullgraph=True, dynamic=True)(*args)
    for want, got in zip(outs, traced if isinstance(traced, tuple) else (traced,)):
        assert got.shape == want.shape and got.stride() == want.stride() and got.dtype == want.dtype
        assert torch.equal(_bits(got), _bits(want))


def _x(rows: int, cols: int, kind: str = "normal", dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    return adversarial(rows, cols, kind, dtype=torch.float32, seed=seed).to(dtype) if rows and cols else \
        torch.zeros(rows, cols, dtype=dtype)


# ragged edges, a zero row count, NaN/Inf tiles, all-zero tiles
QUANT_CASES = [(200, 300, "normal"), (130, 256, "nonfinite"), (256, 130, "zero_tiles"), (0, 256, "normal")]


@pytest.mark.parametrize("m_major", [False, True])
@pytest.mark.parametrize("rows,cols,kind", QUANT_CASES)
def test_quantizer_operators_reference(rows, cols, kind, m_major):
    x = _x(rows, cols, kind)
    pow2 = m_major  # both values of each, in fewer runs
    _opcheck(ops.quantize_1x128.default, (x, pow2, "reference", m_major))
    _opcheck(ops.quantize_128x1.default, (x, not pow2, "reference", m_major))
    _opcheck(ops.quantize_1x128_and_128x1.default, (x, pow2, "reference", m_major))
    _opcheck(ops.quantize_128x128.default, (x, pow2, "reference"))
    _opcheck(ops.quantize_128x128_t.default, (x, pow2, "reference", 2 if rows == 256 else 1))


@pytest.mark.parametrize("rows,cols", [(130, 200), (1, 128)])
def test_quantizer_operators_triton_interpreted(rows, cols):
    x = _x(rows, cols, "nonfinite" if rows > 1 else "normal")
    _opcheck(ops.quantize_1x128_and_128x1.default, (x, True, "triton", True))
    _opcheck(ops.quantize_1x128.default, (x, False, "triton", False))
    _opcheck(ops.quantize_128x1.default, (x, False, "triton", True))
    _opcheck(ops.quantize_128x128.default, (x, False, "triton"))
    _opcheck(ops.quantize_128x128_t.default, (x, False, "triton", 1))
    _opcheck(ops.quantize_128x128_t.default, (_x(384, cols, "nonfinite"), True, "triton", 3))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_m_major_scales_hold_the_same_values_in_torch_scaled_mm_layout(backend):
    x = _x(130, 300, "nonfinite")
    (q, s), (qt, st) = quantize_1x128_and_128x1(x, backend=backend)
    (qm, sm), (qtm, stm) = quantize_1x128_and_128x1(x, backend=backend, m_major_scales=True)
    assert sm.stride() == (1, 130) and stm.stride() == (1, 300) and s.is_contiguous() and st.is_contiguous()
    assert_same_fp8(qm, q)
    assert_same_fp8(qtm, qt)
    assert_same_scales(sm.contiguous(), s)
    assert_same_scales(stm.contiguous(), st)
    one = _x(1, 256)  # a one-row tensor keeps stride (1, 1): torch checks the strides literally
    assert quantize_1x128(one, backend=backend, m_major_scales=True)[1].stride() == (1, 1)
    assert quantize_128x1(one, backend=backend, m_major_scales=True)[1].stride() == (1, 256)


def _operands(m: int, n: int, k: int, kind: str = "normal", rowwise: bool = False, m_major: bool = False):
    a, sa = quantize_1x128(_x(m, k, kind, seed=1), backend="reference", m_major_scales=m_major)
    w = _x(n, k, seed=2)
    b, sb = quantize_1x128(w, backend="reference") if rowwise else quantize_128x128(w, backend="reference")
    return a, sa, b, sb


@pytest.mark.parametrize("m,n,k,kind", [(200, 144, 300, "normal"), (64, 256, 256, "nonfinite"),
                                        (0, 128, 256, "normal")])
def test_gemm_operators(m, n, k, kind):
    for rowwise in (False, True):
        a, sa, b, sb = _operands(m, n, k, kind, rowwise, m_major=rowwise)
        for out_dtype in (torch.bfloat16, torch.float32):
            _opcheck(ops.fp8_gemm.default, (a, sa, b, sb, out_dtype, rowwise, "reference"))
        acc = torch.randn(m, n)
        _opcheck(ops.fp8_gemm_accumulate.default, (a, sa, b, sb, acc, rowwise, "reference"))


def test_gemm_operator_triton_interpreted():
    a, sa, b, sb = _operands(70, 128, 256, m_major=True)
    _opcheck(ops.fp8_gemm.default, (a, sa, b, sb, torch.bfloat16, False, "triton"))


def _grouped(groups: int, n: int, k: int):
    w = torch.stack([_x(n, k, seed=g) for g in range(groups)])
    parts = [quantize_128x128(w[g], backend="reference") for g in range(groups)]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def test_grouped_gemm_operators():
    b, sb = _grouped(3, 144, 256)
    a, sa = quantize_1x128(_x(300, 256, "zero_tiles"), backend="reference")
    offsets = torch.tensor([0, 100, 100, 260], dtype=torch.int32)  # an empty group, rows after the last
    out = ops.fp8_grouped_gemm_contiguous(a, sa, b, sb, offsets, torch.bfloat16, "reference", True, None)
    out[260:] = 0  # rows outside every group are unspecified: compare the defined ones only
    args = (a[:260], sa[:260], b, sb, offsets, torch.bfloat16, "reference", True, None)
    _opcheck(ops.fp8_grouped_gemm_contiguous.default, args)
    am, sam = quantize_1x128(_x(3 * 64, 256), backend="reference")
    am, sam = am.view(3, 64, 256), sam.view(3, 64, 2)
    full = torch.tensor([64, 64, 64], dtype=torch.int64)  # every row defined
    _opcheck(ops.fp8_grouped_gemm_masked.default, (am, sam, b, sb, full, torch.float32, "reference", True, None))


def test_grouped_gemm_operator_mutates_the_error_record():
    # no rows: no kernel runs and the index is checked with torch operations into the record (mutated)
    b, sb = _grouped(2, 128, 128)
    a, sa = quantize_1x128(torch.zeros(0, 128), backend="reference")
    bad = torch.tensor([0, 5, 3], dtype=torch.int32)
    record = torch.zeros(RECORD_SIZE, dtype=torch.int64)
    out = ops.fp8_grouped_gemm_contiguous(a, sa, b, sb, bad, torch.bfloat16, "reference", False, record)
    assert out.shape == (0, 128) and record.tolist() == [1, 0, 0, 5, 0]
    _opcheck(ops.fp8_grouped_gemm_contiguous.default,
             (a, sa, b, sb, bad, torch.bfloat16, "reference", False, torch.zeros(RECORD_SIZE, dtype=torch.int64)))


@pytest.mark.parametrize("fused", [False, True])
def test_moe_operators(fused):
    tokens, hidden = 256, 128
    h = _x(tokens, 2 * hidden, "nonfinite" if not fused else "normal")
    da = _x(tokens, hidden, seed=5)
    _opcheck(ops.swiglu_quantize.default, (h, True, fused, "reference", None))
    _opcheck(ops.swiglu_backward_quantize.default, (h, da, False, fused, "reference", None))
    (gq, gs), (xq, xs) = quantize_128x1(_x(tokens, 144, seed=6)), quantize_128x1(_x(tokens, 128, seed=7))
    offsets = torch.tensor([0, 128, 128, 256], dtype=torch.int32)
    _opcheck(ops.grouped_wgrad.default, (gq, gs, xq, xs, offsets, "triton" if fused else "reference"))
