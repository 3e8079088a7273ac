"""Bit-exact FP8 conversions for Triton's CPU interpreter (``TRITON_INTERPRET=1``).

The interpreter of Triton 3.9 converts fp32/bf16/fp16 to fp8 with its own bit manipulation, which is not
what the GPU computes: a mantissa carry into the exponent is lost, values beyond the format's range do
not saturate, and ties round away from even. On the GPU, Triton lowers these casts to
``cvt.rn.satfinite`` (round to nearest even, finite values saturate to the largest normal, Inf saturates
too, NaN stays NaN). Its ``tl.dot`` on fp8 operands also widens the NaN codes to 480, and its
fp32 -> bf16 cast truncates where the GPU rounds to nearest even.

:func:`install` routes every interpreter conversion that has an fp8 side through torch casts that
compute exactly that (likewise narrowings to bf16, and fp8 ``tl.dot`` operands through exact
widening), so kernels tested on the CPU see the bytes the GPU would produce. It is the only workaround
of this kind in the project; conftest.py installs it once for the whole test session (and
tests/dist.py in each worker).
"""

from __future__ import annotations

import numpy as np
import torch

_installed = False


def _tables():
    import triton.language as tl

    fp8 = {
        tl.float8e4nv: (torch.float8_e4m3fn, 448.0),
        tl.float8e5: (torch.float8_e5m2, 57344.0),
    }
    floats = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}
    return fp8, floats


def _to_torch(data: np.ndarray, dtype, fp8, floats) -> torch.Tensor:
    raw = torch.from_numpy(np.ascontiguousarray(data))
    if dtype in fp8:
        return raw.view(torch.uint8).view(fp8[dtype][0])
    tdt = floats[dtype]
    return raw.view(tdt) if raw.dtype != tdt else raw


def _convert(data: np.ndarray, src, dst, fp8, floats) -> np.ndarray:
    x = _to_torch(data, src, fp8, floats).to(torch.float32)  # exact: every source format fits in fp32
    if dst in fp8:
        tdt, limit = fp8[dst]
        x = torch.where(torch.isnan(x), x, x.clamp(-limit, limit))  # satfinite
        return x.to(tdt).view(torch.uint8).numpy().reshape(data.shape)
    out = x.to(floats[dst])
    if floats[dst] is torch.bfloat16:
        return out.view(torch.int16).numpy().view(np.uint16).reshape(data.shape)
    return out.numpy().reshape(data.shape)


def install() -> None:
    """Patch Triton's interpreter builder (idempotent). A no-op where Triton is absent."""
    global _installed
    if _installed:
        return
    try:
        from triton.runtime import interpreter as ti
    except Exception:
        return
    import triton.language as tl

    fp8, floats = _tables()
    known = set(fp8) | set(floats)
    builder = ti.InterpreterBuilder
    orig_fp_to_fp = builder.create_fp_to_fp
    orig_cast = builder.cast_impl

    def _handled(src, dst) -> bool:
        if src not in known or dst not in known or src == dst:
            return False
        # fp8 on either side, or a narrowing to bf16 (the interpreter truncates; the GPU rounds to even)
        return src in fp8 or dst in fp8 or dst == tl.bfloat16

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        s, d = src.dtype.scalar, dst_type.scalar
        rtz = rounding_mode is not None and "RTZ" in str(rounding_mode)
        if not _handled(s, d) or rtz:
            return orig_fp_to_fp(self, src, dst_type, rounding_mode)
        return ti.TensorHandle(_convert(src.data, s, d, fp8, floats), d)

    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if not _handled(s, d):
            return orig_cast(self, src, dst_type)
        return ti.TensorHandle(_convert(src.data, s, d, fp8, floats), d)

    orig_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        sa, sb = a.dtype.scalar, b.dtype.scalar
        if sa not in fp8 and sb not in fp8:
            return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        # fp8 operands are widened exactly (the interpreter's own widening turns NaN codes into 480)
        fa = _to_torch(a.data, sa, fp8, floats).to(torch.float32).numpy()
        fb = _to_torch(b.data, sb, fp8, floats).to(torch.float32).numpy()
        return ti.TensorHandle(np.matmul(fa, fb, dtype=d.data.dtype) + d.data, d.dtype.scalar)

    builder.create_fp_to_fp = create_fp_to_fp
    builder.cast_impl = cast_impl
    builder.create_dot = create_dot
    _installed = True
