"""Block-scaled FP8 GEMMs and their backends.

``fp8_gemm(a, a_scales, b, b_scales)`` computes ``a @ b.T`` from E4M3 operands:

- ``a[M, K]`` with 1x128 scales ``[M, ceil(K/128)]``;
- ``b[N, K]`` with 128x128 scales ``[ceil(N/128), ceil(K/128)]`` (forward and input gradient, BF16 out) or
  1x128 scales ``[N, ceil(K/128)]`` (weight gradient, FP32 out, optionally accumulated into an FP32 buffer).

The layout of ``b`` is read from its scales' shape. The two shapes coincide only when N == 1, where a
128x128 block and a 1x128 tile hold the same single row, so both readings compute the same numbers;
``b_block="128x128"`` or ``"1x128"`` states it explicitly anyway.

``fp8_grouped_gemm`` runs one such GEMM per group (MoE experts) against ``b[G, N, K]`` with 128x128
scales ``[G, ceil(N/128), ceil(K/128)]``, for two layouts of ``a``:

- contiguous: ``a[T, K]`` holds the rows of all groups back to back, group g owning rows
  ``group_offsets[g]:group_offsets[g+1]`` (int32/int64, G+1 entries, non-decreasing within [0, T]).
  Every backend takes any row counts, zero included; counts that are multiples of
  :data:`EXPERT_ALIGNMENT` (128, the row tile of the kernels) waste no row of a tile, so the MoE
  dispatch should pad each expert's rows to it. Output rows outside every group are unspecified.
- masked: ``a[G, M_max, K]`` with ``masked_m[g]`` (in [0, M_max]) valid rows per group; the other output
  rows are unspecified.

A malformed index is an error, never clipped silently (:mod:`dualflow.fp8.groups`). On the CPU it is
checked before anything runs. On the device it is checked by the kernels while they run, without a
host synchronisation, when ``errors=`` passes an :class:`~dualflow.fp8.groups.Fp8ErrorFlag` (they
record the first malformed group there and ``errors.check()`` raises it later); without one it is read
back and checked first, which synchronises. The reference backend reads the index on the host and
raises at once. No backend touches memory outside its operands whatever the index holds.

Backends (``backend=``): ``reference`` (dequantize 128 of K at a time and accumulate in FP32; any device;
the only block-scaled path on the CPU), ``triton``, ``torch`` (torch's block-scaled ``scaled_mm``;
sm90 with cuBLASLt >= 12.9; dense only) and ``cutlass`` (``dualflow.fp8.cutlass``; dense and contiguous
grouped). A single name is strict: it raises :class:`BackendUnavailable` with the reason when it cannot
run. A comma-separated list (``"cutlass,triton"``) takes the first entry that can. ``"auto"`` is the
value of the environment variable ``DUALFLOW_FP8_BACKEND`` when set, else ``AUTO_CUDA`` for CUDA tensors
and ``reference`` otherwise. ``AUTO_CUDA`` is the order measured fastest on an H100 (benchmarks/RESULTS.md):
torch's cuBLASLt block-scaled matmul for the dense GEMMs, then CUTLASS (within 0-16% of it, and the
fastest grouped GEMM, which torch lacks), then Triton (about half their throughput).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import os
from collections.abc import Callable
from typing import Literal

import torch

from dualflow.fp8.groups import Fp8ErrorFlag, check_on_host, record_on_device
from dualflow.fp8.quant import BLOCK, FP8_DTYPE, num_blocks
from dualflow.fp8.triton_support import triton_unavailable_reason
from dualflow.utils import nvtx

ENV_BACKEND = "DUALFLOW_FP8_BACKEND"
EXPERT_ALIGNMENT = 128
BACKENDS = ("reference", "triton", "torch", "cutlass")
AUTO_CUDA = "torch,cutlass,triton,reference"
OPS = ("dense", "contiguous", "masked")

BBlock = Literal["auto", "128x128", "1x128"]
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class BackendUnavailable(RuntimeError):
    """The requested GEMM backend cannot run here (the message says why and what to use instead)."""


# ----------------------------------------------------------------------------------------------------------
# reference backend
# ----------------------------------------------------------------------------------------------------------
def _ref_dense(a, a_scales, b, b_scales, out_dtype, accumulate_into, b_rowwise):
    m, k = a.shape
    n = b.shape[0]
    sb = b_scales if b_rowwise else b_scales.repeat_interleave(BLOCK, 0)[:n]  # [N, KB] either way
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for kb in range(num_blocks(k)):  # promotion to FP32 with the scales applied every 128 of K
        ks = slice(kb * BLOCK, min(k, (kb + 1) * BLOCK))
        acc += (a[:, ks].float() @ b[:, ks].float().T) * (a_scales[:, kb, None] * sb[None, :, kb])
    if accumulate_into is not None:
        return accumulate_into.add_(acc)
    return acc.to(out_dtype)


def _ref_contiguous(a, a_scales, b, b_scales, offsets, out_dtype, errors=None):
    # the index is read on the host here anyway: a malformed one raises at once, with or without `errors`
    bounds = offsets.tolist()
    check_on_host(bounds, "contiguous", a.shape[0])
    out = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    for g, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if hi > lo:
            out[lo:hi] = _ref_dense(a[lo:hi], a_scales[lo:hi], b[g], b_scales[g], out_dtype, None, False)
    return out


def _ref_masked(a, a_scales, b, b_scales, masked_m, out_dtype, errors=None):
    counts = masked_m.tolist()
    check_on_host(counts, "masked", a.shape[1])
    out = torch.zeros(*a.shape[:2], b.shape[1], dtype=out_dtype, device=a.device)
    for g, count in enumerate(counts):
        if count > 0:
            out[g, :count] = _ref_dense(a[g, :count], a_scales[g, :count], b[g], b_scales[g], out_dtype, None, False)
    return out


# ----------------------------------------------------------------------------------------------------------
# triton backend
# ----------------------------------------------------------------------------------------------------------
def _triton_reason(device: torch.device) -> str | None:
    return triton_unavailable_reason(device)


def _triton_dense(a, a_scales, b, b_scales, out_dtype, accumulate_into, b_rowwise):
    from dualflow.fp8.kernels import gemm as kernels

    out = accumulate_into if accumulate_into is not None else \
        torch.empty(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    return kernels.gemm(a, a_scales, b, b_scales, out, b_rowwise=b_rowwise, accumulate=accumulate_into is not None)


def _triton_contiguous(a, a_scales, b, b_scales, offsets, out_dtype, errors=None):
    from dualflow.fp8.kernels import gemm as kernels

    out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    return kernels.grouped_contiguous(a, a_scales, b, b_scales, offsets, out, errors)


def _triton_masked(a, a_scales, b, b_scales, masked_m, out_dtype, errors=None):
    from dualflow.fp8.kernels import gemm as kernels

    out = torch.empty(*a.shape[:2], b.shape[1], dtype=out_dtype, device=a.device)
    return kernels.grouped_masked(a, a_scales, b, b_scales, masked_m, out, errors)


# ----------------------------------------------------------------------------------------------------------
# torch backend (torch's block-scaled matmul, cuBLASLt)
# ----------------------------------------------------------------------------------------------------------
def _torch_reason(device: torch.device) -> str | None:
    from dualflow.fp8 import torch_scaled

    return torch_scaled.unavailable_reason(device)


def _torch_dense(a, a_scales, b, b_scales, out_dtype, accumulate_into, b_rowwise):
    from dualflow.fp8 import torch_scaled

    if accumulate_into is not None:
        return accumulate_into.add_(torch_scaled.gemm(a, a_scales, b, b_scales, torch.float32, b_rowwise))
    return torch_scaled.gemm(a, a_scales, b, b_scales, out_dtype, b_rowwise)


# ----------------------------------------------------------------------------------------------------------
# cutlass backend: dualflow.fp8.cutlass, loaded on first use
# ----------------------------------------------------------------------------------------------------------
def _cutlass_module():
    try:
        return importlib.import_module("dualflow.fp8.cutlass")
    except ModuleNotFoundError as exc:
        if exc.name != "dualflow.fp8.cutlass":
            raise
        return None


def _cutlass_reason(device: torch.device) -> str | None:
    mod = _cutlass_module()
    if mod is None:
        return "dualflow.fp8.cutlass is not part of this installation"
    if device.type != "cuda":
        return f"the CUTLASS GEMMs need CUDA tensors (got {device.type})"
    if not mod.is_available():
        return ("dualflow.fp8.cutlass.is_available() is False: libdualflow_cuda was built without the "
                "CUTLASS GEMMs or this GPU is not sm90 (`make build` on a Hopper machine)")
    return None


def _cutlass_dense(a, a_scales, b, b_scales, out_dtype, accumulate_into, b_rowwise):
    mod = _cutlass_module()
    if b_rowwise:
        out = mod.gemm_wgrad(a, a_scales, b, b_scales, accumulate_into, accumulate_into is not None)
        return out if accumulate_into is not None or out_dtype == torch.float32 else out.to(out_dtype)
    if accumulate_into is not None:
        return accumulate_into.add_(mod.gemm_fwd(a, a_scales, b, b_scales, torch.float32))
    return mod.gemm_fwd(a, a_scales, b, b_scales, out_dtype)


def _cutlass_contiguous(a, a_scales, b, b_scales, offsets, out_dtype, errors=None):
    return _cutlass_module().grouped_gemm_contiguous(a, a_scales, b, b_scales, offsets, out_dtype, errors=errors)


# ----------------------------------------------------------------------------------------------------------
# registry and resolution
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Backend:
    reason: Callable[[torch.device], str | None]  # None when usable on that device
    dense: Callable | None
    contiguous: Callable | None
    masked: Callable | None


_REGISTRY: dict[str, _Backend] = {
    "reference": _Backend(lambda device: None, _ref_dense, _ref_contiguous, _ref_masked),
    "triton": _Backend(_triton_reason, _triton_dense, _triton_contiguous, _triton_masked),
    "torch": _Backend(_torch_reason, _torch_dense, None, None),
    "cutlass": _Backend(_cutlass_reason, _cutlass_dense, _cutlass_contiguous, None),
}


def _why_not(name: str, device: torch.device, op: str) -> str | None:
    return _why_not_cached(name, device, op, os.environ.get("TRITON_INTERPRET", ""))


@functools.lru_cache(maxsize=256)
def _why_not_cached(name: str, device: torch.device, op: str, _interpret: str) -> str | None:
    # asked on every GEMM call: a backend's availability on a device does not change while the process
    # runs (the key holds the one environment variable it depends on)
    entry = _REGISTRY[name]
    if getattr(entry, op) is None:
        ops = [o for o in OPS if getattr(entry, o) is not None]
        return f"it has no {op} GEMM (it implements: {', '.join(ops)})"
    return entry.reason(device)


def backend_names(spec: str, device: torch.device | str) -> list[str]:
    """The backends ``spec`` lists for ``device``, in the order they are tried (``auto``: those of
    ``$DUALFLOW_FP8_BACKEND``, else the default order), whether or not they can run there."""
    return _parse(spec, torch.device(device))


def _parse(spec: str, device: torch.device) -> list[str]:
    return list(_parse_cached(spec, device.type, os.environ.get(ENV_BACKEND, "")))


@functools.lru_cache(maxsize=256)
def _parse_cached(spec: str, device_type: str, _env: str) -> tuple[str, ...]:
    if spec == "auto":
        spec = _env.strip() or (AUTO_CUDA if device_type == "cuda" else "reference")
        if spec == "auto":
            raise ValueError(f"{ENV_BACKEND}=auto would refer to itself; name backends from {BACKENDS}")
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in _REGISTRY]
    if not names or unknown:
        raise ValueError(f"unknown FP8 GEMM backend {spec!r}: expected 'auto', one of {BACKENDS} or a "
                         "comma-separated list of them (first usable wins)")
    return tuple(names)


def _candidates(backend: str, device: torch.device, op: str):
    """(name, None or why it cannot run) for the names ``backend`` lists, checked one at a time."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    for name in _parse(backend, device):
        yield name, _why_not(name, device, op)


def _unavailable(backend: str, device: torch.device, op: str, reasons: list[str]) -> BackendUnavailable:
    return BackendUnavailable(f"no FP8 GEMM backend of {backend!r} can run the {op} GEMM on {device}: "
                              + "; ".join(reasons)
                              + f". Pick another with backend=... or the environment variable {ENV_BACKEND}")


def resolve_backend(backend: str, device: torch.device | str, op: str = "dense") -> str:
    """The backend that ``backend`` (a name, a comma list or ``"auto"``) selects for ``op`` on ``device``."""
    device = torch.device(device)
    reasons = []
    for name, why in _candidates(backend, device, op):
        if why is None:
            return name
        reasons.append(f"{name}: {why}")
    raise _unavailable(backend, device, op, reasons)


def _run(backend: str, device: torch.device, op: str, *args) -> torch.Tensor:
    # a backend may also find out only when called that it cannot run this case (torch's scaled_mm
    # rejecting a shape, CUTLASS an alignment): the next one in the list then takes it
    reasons = []
    for name, why in _candidates(backend, device, op):
        if why is None:
            try:
                with nvtx.range(f"fp8_gemm.{op}.{name}"):
                    return getattr(_REGISTRY[name], op)(*args)
            except BackendUnavailable as exc:
                why = str(exc)
        reasons.append(f"{name}: {why}")
    raise _unavailable(backend, device, op, reasons)


def available_backends(device: torch.device | str, op: str = "dense") -> dict[str, str | None]:
    """For every backend: None if it can run ``op`` on ``device``, else the reason it cannot."""
    device = torch.device(device)
    return {name: _why_not(name, device, op) for name in BACKENDS}


# ----------------------------------------------------------------------------------------------------------
# public GEMMs
# ----------------------------------------------------------------------------------------------------------
def _check_operand(name: str, t: torch.Tensor, dims: int) -> None:
    if t.dtype != FP8_DTYPE or t.dim() != dims:
        raise TypeError(f"{name} must be a {dims}-D {FP8_DTYPE} tensor, got {t.dtype} of shape {tuple(t.shape)} "
                        "(quantize it with dualflow.fp8.quantize_1x128 / quantize_128x128)")


def _check_scales(name: str, s: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if s.dtype != torch.float32 or tuple(s.shape) != expected:
        raise ValueError(f"{name} must be float32 of shape {expected} ({what}), got {s.dtype} of shape "
                         f"{tuple(s.shape)}")


def _check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")


def _check_devices(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all operands must be on one device, got {sorted(map(str, devices))}")


def _b_rowwise(b_scales: torch.Tensor, n: int, kb: int, b_block: BBlock) -> bool:
    block_shape, row_shape = (num_blocks(n), kb), (n, kb)
    if b_block == "auto":
        if tuple(b_scales.shape) == row_shape:
            return True  # n == 1 reads either way with the same numbers
        _check_scales("b_scales", b_scales, block_shape, f"128x128 blocks of b[{n}, K]; or {row_shape} for 1x128")
        return False
    if b_block not in ("128x128", "1x128"):
        raise ValueError(f"b_block must be 'auto', '128x128' or '1x128', got {b_block!r}")
    rowwise = b_block == "1x128"
    _check_scales("b_scales", b_scales, row_shape if rowwise else block_shape, f"{b_block} scales of b[{n}, K]")
    return rowwise


def fp8_gemm(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, accumulate_into: torch.Tensor | None = None,
             backend: str = "auto", *, b_block: BBlock = "auto") -> torch.Tensor:
    """``a @ b.T`` of block-scaled E4M3 operands (see the module docstring for the layouts).

    With ``accumulate_into`` (an FP32 ``[M, N]`` tensor) the product is added to it in FP32 and it is
    returned; ``out_dtype`` is then not used.
    """
    _check_operand("a", a, 2)
    _check_operand("b", b, 2)
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"a is [M, K] = {tuple(a.shape)} and b must be [N, K] with the same K, got {tuple(b.shape)}")
    kb = num_blocks(k)
    _check_scales("a_scales", a_scales, (m, kb), f"1x128 tiles of a[{m}, {k}]")
    rowwise = _b_rowwise(b_scales, n, kb, b_block)
    _check_out_dtype(out_dtype)
    if accumulate_into is not None and (accumulate_into.dtype != torch.float32
                                        or tuple(accumulate_into.shape) != (m, n)):
        raise ValueError(f"accumulate_into must be float32 of shape {(m, n)}, got {accumulate_into.dtype} of "
                         f"shape {tuple(accumulate_into.shape)}")
    extra = (accumulate_into,) if accumulate_into is not None else ()
    _check_devices(a, a_scales, b, b_scales, *extra)
    if accumulate_into is not None:  # an operator returns no alias of an input: it mutates, this returns it
        torch.ops.dualflow.fp8_gemm_accumulate(a, a_scales, b, b_scales, accumulate_into, rowwise, backend)
        return accumulate_into
    return torch.ops.dualflow.fp8_gemm(a, a_scales, b, b_scales, out_dtype, rowwise, backend)


def run_dense(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
              out_dtype: torch.dtype, accumulate_into: torch.Tensor | None, b_rowwise: bool,
              backend: str) -> torch.Tensor:
    """The dense GEMM of validated operands (what the ``dualflow::fp8_gemm*`` operators run)."""
    m, n, k = a.shape[0], b.shape[0], a.shape[1]
    if m == 0 or n == 0 or k == 0:
        resolve_backend(backend, a.device, "dense")  # an impossible backend choice still fails
        return accumulate_into if accumulate_into is not None else torch.zeros(m, n, dtype=out_dtype, device=a.device)
    return _run(backend, a.device, "dense", a, a_scales, b, b_scales, out_dtype, accumulate_into, b_rowwise)


def run_dense_first(first: str | None, a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor,
                    b_scales: torch.Tensor, out_dtype: torch.dtype, b_rowwise: bool, backend: str) -> torch.Tensor:
    """:func:`run_dense` (no ``accumulate_into``) that calls backend ``first`` straight away, without
    resolving ``backend`` again: the FP8 layers resolve it once per device. Where ``first`` finds it
    cannot run this case, the whole of ``backend`` is tried as usual (``first`` included, so that the
    error lists every reason)."""
    if first is not None and a.shape[0] and b.shape[0] and a.shape[1]:
        try:
            with nvtx.range(f"fp8_gemm.dense.{first}"):
                return _REGISTRY[first].dense(a, a_scales, b, b_scales, out_dtype, None, b_rowwise)
        except BackendUnavailable:
            pass
    return run_dense(a, a_scales, b, b_scales, out_dtype, None, b_rowwise, backend)


def _group_index(index: torch.Tensor, name: str, device: torch.device,
                 errors: Fp8ErrorFlag | None) -> tuple[bool, torch.Tensor | None]:
    """(whether the index is read back and checked on the host, the record the kernels write a malformed
    group into): a host index, or one without a flag to record into, is checked before anything runs."""
    if index.device.type != "cpu" and index.device != device:
        raise ValueError(f"{name} must be on the operands' device ({device}) or on the CPU, got {index.device}")
    if errors is not None and (not isinstance(errors, Fp8ErrorFlag) or errors.device != device):
        got = f"one on {errors.device}" if isinstance(errors, Fp8ErrorFlag) else type(errors).__name__
        raise ValueError(f"errors must be an Fp8ErrorFlag on the operands' device ({device}), got {got}; make it "
                         f"with Fp8ErrorFlag({str(device)!r})")
    if index.device.type == "cpu" or errors is None:
        return True, None
    return False, errors.record


def run_grouped(op: str, a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                index: torch.Tensor, out_dtype: torch.dtype, backend: str, check: bool,
                record: torch.Tensor | None) -> torch.Tensor:
    """The grouped GEMM ``op`` of validated operands (what the ``dualflow::fp8_grouped_gemm_*`` operators
    run): the host check of the index when ``check`` (reading a device index back synchronises), the index
    moved to the operands' device, then the backend; ``record`` is the device error record or None."""
    bound = a.shape[0] if op == "contiguous" else a.shape[1]
    if check:
        check_on_host(index.tolist(), op, bound)
    # a host index goes up without waiting for the stream (CUDA stages pageable memory at once)
    index = index.to(a.device, non_blocking=True)
    n = b.shape[1]
    if a.numel() == 0 or n == 0:
        resolve_backend(backend, a.device, op)
        if record is not None:  # no kernel runs: check the device index with a few torch operations instead
            record_on_device(record, index, op, bound)
        return torch.zeros(*a.shape[:-1], n, dtype=out_dtype, device=a.device)
    return _run(backend, a.device, op, a, a_scales, b, b_scales, index, out_dtype, record)


def fp8_grouped_gemm(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, *,
                     group_offsets: torch.Tensor | None = None, masked_m: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
                     errors: Fp8ErrorFlag | None = None) -> torch.Tensor:
    """Per-group ``a_g @ b[g].T`` (MoE experts); pass ``group_offsets`` (contiguous) or ``masked_m`` (masked).

    Contiguous: ``a[T, K]``, ``a_scales[T, ceil(K/128)]``, out ``[T, N]``. Masked: ``a[G, M_max, K]``,
    ``a_scales[G, M_max, ceil(K/128)]``, out ``[G, M_max, N]``. ``b[G, N, K]`` with 128x128 scales
    ``[G, ceil(N/128), ceil(K/128)]`` in both.

    The index (on the operands' device or on the CPU) must be well formed: ``group_offsets``
    non-decreasing within ``[0, T]``, ``masked_m`` within ``[0, M_max]``. A CPU index is checked before
    anything runs (``ValueError`` naming the group and its values). A device index is checked by the
    kernels, without a host synchronisation, when ``errors`` (an :class:`Fp8ErrorFlag` on the device) is
    given: the call returns, the output rows are unspecified, and ``errors.check()`` raises the error
    later; without ``errors`` it is read back and checked first (a synchronisation).
    """
    if (group_offsets is None) == (masked_m is None):
        raise ValueError("pass exactly one of group_offsets (contiguous layout) or masked_m (masked layout)")
    op = "contiguous" if group_offsets is not None else "masked"
    _check_operand("a", a, 2 if op == "contiguous" else 3)
    _check_operand("b", b, 3)
    groups, n, k = b.shape
    if a.shape[-1] != k:
        raise ValueError(f"a's last dimension must equal b's K = {k} (b is [G, N, K] = {tuple(b.shape)}), "
                         f"got a of shape {tuple(a.shape)}")
    kb = num_blocks(k)
    _check_scales("a_scales", a_scales, (*a.shape[:-1], kb), "1x128 tiles of a")
    _check_scales("b_scales", b_scales, (groups, num_blocks(n), kb), "128x128 blocks of each b[g]")
    _check_out_dtype(out_dtype)
    index = group_offsets if group_offsets is not None else masked_m
    expected = (groups + 1,) if op == "contiguous" else (groups,)
    if index.dtype not in (torch.int32, torch.int64) or tuple(index.shape) != expected:
        raise ValueError(f"{'group_offsets' if op == 'contiguous' else 'masked_m'} must be int32/int64 of shape "
                         f"{expected} for G = {groups} groups, got {index.dtype} of shape {tuple(index.shape)}")
    if op == "masked" and a.shape[0] != groups:
        raise ValueError(f"masked layout: a must be [G={groups}, M_max, K], got {tuple(a.shape)}")
    _check_devices(a, a_scales, b, b_scales)
    check, record = _group_index(index, "group_offsets" if op == "contiguous" else "masked_m", a.device, errors)
    grouped = torch.ops.dualflow.fp8_grouped_gemm_contiguous if op == "contiguous" else \
        torch.ops.dualflow.fp8_grouped_gemm_masked
    return grouped(a, a_scales, b, b_scales, index, out_dtype, backend, check, record)
