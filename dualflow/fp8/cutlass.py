"""CUTLASS block-scaled FP8 GEMMs for Hopper (sm90a): the ``cutlass`` backend of :mod:`dualflow.fp8.gemm`.

The kernels live in ``libdualflow_cuda`` (csrc/cutlass, C ABI in csrc/cutlass/gemm_api.h); this module
validates the arguments, converts the scale layouts, picks a tile configuration and launches through
ctypes on the current stream of the operands' device. See docs/cutlass.md.

- :func:`gemm_fwd`: ``a @ b.T``, ``a`` 1x128-scaled, ``b`` 128x128-scaled (forward, input gradient).
- :func:`gemm_wgrad`: ``a @ b.T`` with both operands 1x128-scaled along K, FP32 out, optionally added
  into ``out`` (weight gradient; K is the token dimension).
- :func:`grouped_gemm_contiguous`: one :func:`gemm_fwd` per group of contiguous rows of ``a`` (MoE experts).
- :func:`kgrouped_wgrad`: one :func:`gemm_wgrad` per group of contiguous columns (tokens) of ``a`` and ``b``,
  each into its own FP32 output (the experts' weight gradients).

Scales arrive in the FP8 engine's layouts (K-major: ``[rows, K/128]``). The kernels load A's scales
MN-major (``[K/128, rows]``, padded to 4 rows so that TMA can load them): :func:`scales_mn_major` and
:func:`grouped_scales_mn_major` convert them, inside every call (the grouped GEMM through the library's
one-kernel :func:`grouped_scales_mn_major_cuda`; the torch function is its reference).

Tile configurations are chosen by :func:`choose_config` or forced with ``config=`` or the environment
variable ``DUALFLOW_CUTLASS_CONFIG`` (comma-separated names; a call uses the first of its kind).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import os

import torch
import torch.nn.functional as F

from dualflow import _cuda
from dualflow.fp8.gemm import BackendUnavailable
from dualflow.fp8.groups import RECORD_SIZE, record_on_device
from dualflow.fp8.quant import BLOCK, FP8_DTYPE
from dualflow.utils import nvtx

ENV_CONFIG = "DUALFLOW_CUTLASS_CONFIG"
KINDS = ("fwd", "wgrad", "grouped", "kgrouped_wgrad")
DEFAULT_NUM_SMS = 132  # H100 / H200 SXM
_INT_MAX = 2**31 - 1


class CutlassUnsupported(BackendUnavailable, ValueError):
    """A well-formed problem the CUTLASS kernels do not run (K not a multiple of 128, unaligned rows, no
    sm90 device, ...); as a :class:`BackendUnavailable` it lets a backend list fall through to the next."""


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One compiled kernel instantiation (mirrors csrc/cutlass/configs.h; a test keeps them equal)."""

    name: str
    kind: str  # "fwd" (forward / input gradient), "wgrad", "grouped" or "kgrouped_wgrad"
    tile_m: int
    tile_n: int
    tile_k: int
    cluster_m: int
    cluster_n: int
    schedule: str  # "cooperative" (two consumer warp groups on one tile) or "pingpong" (one tile each)


CONFIGS: tuple[TileConfig, ...] = (
    TileConfig("fwd_128x128", "fwd", 128, 128, 128, 1, 2, "cooperative"),
    TileConfig("fwd_64x128", "fwd", 64, 128, 128, 1, 1, "pingpong"),
    TileConfig("wgrad_128x128", "wgrad", 128, 128, 128, 1, 1, "cooperative"),
    TileConfig("grouped_128x128", "grouped", 128, 128, 128, 1, 2, "cooperative"),
    TileConfig("grouped_64x128", "grouped", 64, 128, 128, 1, 1, "pingpong"),
    TileConfig("kgrouped_wgrad_128x128", "kgrouped_wgrad", 128, 128, 128, 1, 1, "cooperative"),
)
_BY_NAME = {c.name: c for c in CONFIGS}
_SCHEDULES = ("cooperative", "pingpong")


# ----------------------------------------------------------------------------------------------------------
# configuration choice (plain code, no library needed)
# ----------------------------------------------------------------------------------------------------------
def _names(kind: str) -> str:
    return ", ".join(c.name for c in CONFIGS if c.kind == kind)


def choose_config(kind: str, m: int, n: int, k: int, *, groups: int = 1, num_sms: int = DEFAULT_NUM_SMS) -> str:
    """The configuration the heuristic picks for an ``m x n x k`` problem of ``kind``.

    ``grouped``: ``m`` is the rows of all ``groups`` together. The 64-row ping-pong tile is taken when the
    mean rows per group is at most 64 (a 128-row tile would be half empty), or when 128x128 tiles would
    not fill half of the ``num_sms`` SMs (twice as many 64-row tiles spread the work). ``k`` does not
    change the choice: every configuration streams K in 128-wide steps.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if min(m, n, k) < 0 or groups < 1 or num_sms < 1:
        raise ValueError(f"m, n, k must be >= 0, groups and num_sms >= 1; got m={m} n={n} k={k} groups={groups} "
                         f"num_sms={num_sms}")
    if kind in ("wgrad", "kgrouped_wgrad"):
        return f"{kind}_128x128"
    rows = m / groups
    tiles_128 = groups * math.ceil(rows / 128) * math.ceil(n / 128)
    small = rows <= 64 or tiles_128 < num_sms // 2
    return f"{kind}_64x128" if small else f"{kind}_128x128"


def resolve_config(kind: str, m: int, n: int, k: int, config: str | None = None, *, groups: int = 1,
                   num_sms: int = DEFAULT_NUM_SMS) -> str:
    """``config`` if given, else the first name of ``kind`` in ``$DUALFLOW_CUTLASS_CONFIG``, else
    :func:`choose_config`; unknown names and names of another kind raise ``ValueError``."""
    if config is None:
        forced = [s.strip() for s in os.environ.get(ENV_CONFIG, "").split(",") if s.strip()]
        unknown = [s for s in forced if s not in _BY_NAME]
        if unknown:
            raise ValueError(f"{ENV_CONFIG} names unknown CUTLASS configuration(s) {unknown}; known: "
                             f"{', '.join(_BY_NAME)}")
        config = next((s for s in forced if _BY_NAME[s].kind == kind), None)
        if config is None:
            return choose_config(kind, m, n, k, groups=groups, num_sms=num_sms)
    if _BY_NAME.get(config) is None or _BY_NAME[config].kind != kind:
        raise ValueError(f"CUTLASS configuration {config!r} cannot run a {kind} GEMM; use one of: {_names(kind)}")
    return config


# ----------------------------------------------------------------------------------------------------------
# scale layouts (plain torch, any device)
# ----------------------------------------------------------------------------------------------------------
def scales_mn_major(scales: torch.Tensor) -> torch.Tensor:
    """``scales[R, KB]`` (the engine's K-major layout) -> contiguous ``[KB, R4]``, ``R4 = R`` rounded up to
    a multiple of 4, with ``out[kb, r] = scales[r, kb]`` and zeros in the padding rows.

    The layout the kernels load A's (and the weight gradient's B's) scales in: a tile's scales are
    contiguous and every K-step starts 16-byte aligned, as the scale TMA needs. One copy kernel.
    """
    rows = scales.shape[0]
    return F.pad(scales.t(), (0, -rows % 4)).contiguous()


def grouped_scales_mn_major(scales: torch.Tensor, group_offsets: torch.Tensor) -> torch.Tensor:
    """``scales[T, KB]`` of the contiguous grouped layout -> flat ``[T * KB]`` in which group g's scales
    are an MN-major block ``[KB, m_g]`` starting at element ``group_offsets[g] * KB``.

    The grouped kernel derives each group's scale layout from its row count, so the blocks are
    unpadded. Computed as one gather on the device (no host synchronisation); entries outside every
    group (offsets that do not cover ``[0, T)``) hold arbitrary scales of ``scales``.
    """
    rows, kb = scales.shape
    if rows * kb == 0:
        return scales.new_empty(0)
    groups = group_offsets.numel() - 1
    off = group_offsets.to(torch.int64)
    j = torch.arange(rows * kb, device=scales.device)
    g = torch.searchsorted(off[1:] * kb, j, right=True).clamp_(max=groups - 1)
    begin = off[g]
    size = (off[g + 1] - begin).clamp_(min=1)
    local = j - begin * kb
    src = (begin + local % size) * kb + local // size
    return scales.reshape(-1)[src.clamp_(0, rows * kb - 1)]


def grouped_scales_mn_major_cuda(scales: torch.Tensor, group_offsets: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_scales_mn_major` in one kernel of the library (the same elements, bit for bit;
    ``scales`` with any strides): what the grouped GEMM runs. The torch version is ~19 small kernels a call,
    which a training step of many grouped GEMMs felt (benchmarks/NOTES_gpu.md row 34)."""
    if scales.dim() != 2 or scales.dtype != torch.float32 or group_offsets.dtype not in (torch.int32, torch.int64) \
            or group_offsets.dim() != 1 or group_offsets.numel() < 2 or group_offsets.device != scales.device:
        raise ValueError(f"grouped_scales_mn_major_cuda takes FP32 scales [T, KB] and int32/int64 offsets of >= 2 "
                         f"entries on one device, got {scales.dtype} {tuple(scales.shape)} on {scales.device} and "
                         f"{group_offsets.dtype} {tuple(group_offsets.shape)} on {group_offsets.device}")
    return _grouped_scales_cuda(scales, group_offsets.contiguous())


def _grouped_scales_cuda(scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    # without the checks, for the grouped GEMM, which made them (offsets contiguous)
    rows, kb = scales.shape
    out = torch.empty(rows * kb, dtype=torch.float32, device=scales.device)
    if rows * kb == 0:
        return out
    _library()  # the argument types (cached)
    with torch.cuda.device(scales.device):  # the launch goes to the current device's context
        _cuda.call("dualflow_grouped_scales_mn_major", scales.data_ptr(), rows, kb, scales.stride(0),
                   scales.stride(1), offsets.data_ptr(), offsets.element_size(), offsets.numel() - 1, out.data_ptr(),
                   torch.cuda.current_stream(scales.device).cuda_stream)
    return out


def block_scales_to_rows(b_scales: torch.Tensor, n: int) -> torch.Tensor:
    """128x128 block scales ``[ceil(N/128), KB]`` -> the equal 1x128 tile scales ``[N, KB]``."""
    return b_scales.repeat_interleave(BLOCK, dim=0)[:n]


# ----------------------------------------------------------------------------------------------------------
# the library
# ----------------------------------------------------------------------------------------------------------
@functools.cache
def _library() -> ctypes.CDLL:
    lib = _cuda.load()
    if not hasattr(lib, "dualflow_cutlass_config_count"):
        raise _cuda.CudaLibraryError(
            f"{_cuda.library_path()} was built without the CUTLASS GEMMs (build info: {_cuda.build_info()}); "
            "`pip install nvidia-cutlass` (or pass -DDUALFLOW_CUTLASS_DIR=...) and rebuild with `make build`")
    c, i64, ptr = ctypes, ctypes.c_int64, ctypes.c_size_t
    lib.dualflow_cutlass_config_count.argtypes = [c.POINTER(c.c_int)]
    lib.dualflow_cutlass_config_info.argtypes = [c.c_int, c.c_char_p, c.c_size_t] + [c.POINTER(c.c_int)] * 7
    lib.dualflow_cutlass_workspace_size.argtypes = [c.c_char_p] + [i64] * 9 + [c.c_int, c.POINTER(c.c_size_t)]
    lib.dualflow_cutlass_gemm_fwd.argtypes = [c.c_char_p, i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ptr,
                                              i64, c.c_int, ptr, c.c_size_t, ptr]
    lib.dualflow_cutlass_gemm_wgrad.argtypes = [c.c_char_p, i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, ptr, i64,
                                                ptr, i64, c.c_int, c.c_int, ptr, c.c_size_t, ptr]
    lib.dualflow_cutlass_grouped_gemm.argtypes = [c.c_char_p, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, c.c_int,
                                                  ptr, ptr, c.c_int, ptr, c.c_size_t, ptr]
    lib.dualflow_grouped_scales_mn_major.argtypes = [ptr, i64, i64, i64, i64, ptr, c.c_int, i64, ptr, ptr]
    if hasattr(lib, "dualflow_cutlass_kgrouped_wgrad"):  # absent from libraries built before it existed
        lib.dualflow_cutlass_kgrouped_wgrad.argtypes = [c.c_char_p, i64, i64, i64, i64, ptr, i64, ptr, ptr, i64,
                                                        ptr, ptr, c.c_int, ptr, ptr, c.c_int, ptr, c.c_size_t, ptr]
    return lib


def library_configs() -> tuple[TileConfig, ...]:
    """The configurations compiled into the library, read through its C ABI (no GPU needed)."""
    _library()
    count = ctypes.c_int()
    _cuda.call("dualflow_cutlass_config_count", ctypes.byref(count))
    out = []
    for index in range(count.value):
        name = ctypes.create_string_buffer(64)
        vals = [ctypes.c_int() for _ in range(7)]
        _cuda.call("dualflow_cutlass_config_info", index, name, len(name), *map(ctypes.byref, vals))
        kind, tm, tn, tk, cm, cn, schedule = (v.value for v in vals)
        out.append(TileConfig(name.value.decode(), KINDS[kind], tm, tn, tk, cm, cn, _SCHEDULES[schedule]))
    return tuple(out)


def is_available() -> bool:
    """The library is built with the CUTLASS GEMMs and the current CUDA device is sm90 (Hopper)."""
    try:
        _library()
    except _cuda.CudaLibraryError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def workspace_size(config: str, m: int, n: int, k: int, *, groups: int = 1, lda: int | None = None,
                   ldb: int | None = None, ldd: int | None = None, num_sms: int = DEFAULT_NUM_SMS) -> int:
    """Device workspace bytes ``config`` needs for this problem; raises :class:`_cuda.CudaLibraryError` with
    the library's reason when the problem is not valid for it. Host only: runs without a GPU."""
    _library()
    lda, ldb, ldd = lda or k, ldb or k, ldd or n
    sfa_ld = sfb_ld = 0
    if _BY_NAME.get(config) is not None and _BY_NAME[config].kind != "grouped":
        sfa_ld, sfb_ld = _round4(m), _round4(n)
        if _BY_NAME[config].kind == "kgrouped_wgrad":  # exactly m and n (the library says why otherwise)
            sfa_ld, sfb_ld = m, n
    size = ctypes.c_size_t()
    _cuda.call("dualflow_cutlass_workspace_size", config.encode(), m, n, k, groups, lda, ldb, ldd, sfa_ld, sfb_ld,
               num_sms, ctypes.byref(size))
    return size.value


def _round4(x: int) -> int:
    return x + (-x % 4)


# ----------------------------------------------------------------------------------------------------------
# validation: everything is checked here, before the library (which checks again) and before any launch
# ----------------------------------------------------------------------------------------------------------
def _fp8_operand(name: str, t: torch.Tensor, dims: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != FP8_DTYPE or t.dim() != dims:
        got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a {dims}-D {FP8_DTYPE} tensor, got {got} "
                        "(quantize with dualflow.fp8.quantize_1x128 / quantize_128x128)")


def _fp32(name: str, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape:
        got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be float32 of shape {shape} ({what}), got {got}")


def _one_device(named: dict[str, torch.Tensor]) -> torch.device:
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        raise ValueError("all tensors must be on one device, got "
                         + ", ".join(f"{k} on {t.device}" for k, t in named.items()))
    return devices.pop()


def _require_sm90(device: torch.device) -> None:
    if device.type != "cuda":
        raise CutlassUnsupported(f"the CUTLASS GEMMs run on CUDA tensors, got tensors on {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability != (9, 0):
        raise CutlassUnsupported(f"the CUTLASS GEMMs are built for sm90a (Hopper); {device} is "
                                 f"sm{capability[0]}{capability[1]}")


def _wgrad_operands(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                    k_name: str) -> tuple[int, int, int]:
    """``(m, n, k)`` of weight-gradient operands ``a[M, K]``, ``b[N, K]``, both with 1x128 scales along K
    (``k_name`` says what K is called in the messages)."""
    _fp8_operand("a", a, 2)
    _fp8_operand("b", b, 2)
    (m, k), n = a.shape, b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"a is [M, {k_name}] = {tuple(a.shape)}, b must be [N, {k_name}] with the same {k_name}, "
                         f"got {tuple(b.shape)}")
    kb = math.ceil(k / BLOCK)
    _fp32("a_scales", a_scales, (m, kb), f"1x128 tiles of a[{m}, {k}] along {k_name}")
    _fp32("b_scales", b_scales, (n, kb), f"1x128 tiles of b[{n}, {k}] along {k_name}")
    return m, n, k


def _check_k(k: int) -> None:
    if k % BLOCK:
        raise CutlassUnsupported(f"K must be a multiple of {BLOCK} for the CUTLASS GEMMs (one scale per 128 of K "
                                 f"and one 128-wide K step), got K={k}; pad K or use the triton backend")


def _rows(name: str, t: torch.Tensor, min_ld: int) -> int:
    """Leading dimension of a row-major matrix the TMA can read: unit inner stride, 16-byte rows and base."""
    ld = t.stride(0) if t.shape[0] > 1 else min_ld
    row_bytes, base = ld * t.element_size(), t.data_ptr()
    if t.stride(1) != 1 or ld < min_ld or row_bytes % 16 or base % 16:
        raise CutlassUnsupported(
            f"{name} must have contiguous rows starting 16-byte aligned with a row stride of a multiple of 16 bytes "
            f"(TMA), got shape {tuple(t.shape)}, strides {t.stride()}, address {base:#x}; pass a contiguous tensor")
    return ld


def _sizes(**dims: int) -> None:
    big = {k: v for k, v in dims.items() if v > _INT_MAX}
    if big:
        raise CutlassUnsupported(f"the CUTLASS GEMMs take dimensions < 2^31, got {big}")


def _out_columns(n: int, dtype: torch.dtype) -> None:
    per_16 = 128 // torch.finfo(dtype).bits
    if n % per_16:
        raise CutlassUnsupported(f"N must be a multiple of {per_16} for a {dtype} output (16-byte rows for the TMA "
                                 f"store), got N={n}")


# ----------------------------------------------------------------------------------------------------------
# launches
# ----------------------------------------------------------------------------------------------------------
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch(function: str, device: torch.device, config: str, shape: tuple[int, ...], *args) -> None:
    """Asks the workspace size of ``shape`` = (m, n, k, groups, lda, ldb, ldd, sfa_ld, sfb_ld), allocates
    it from torch's caching allocator (stream-ordered: it is reused only after the kernel) and calls
    ``function(config, *args, sm_count, workspace, bytes, stream)`` on the device's current stream."""
    _library()
    num_sms = _num_sms(device)
    size = ctypes.c_size_t()
    _cuda.call("dualflow_cutlass_workspace_size", config.encode(), *shape, num_sms, ctypes.byref(size))
    with torch.cuda.device(device):
        workspace = torch.empty(size.value, dtype=torch.uint8, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream
        _cuda.call(function, config.encode(), *args, num_sms, workspace.data_ptr(), size.value, stream)


def gemm_fwd(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, config: str | None = None) -> torch.Tensor:
    """``a @ b.T``: ``a`` E4M3 ``[M, K]`` with 1x128 scales ``[M, K/128]``, ``b`` E4M3 ``[N, K]`` with
    128x128 scales ``[ceil(N/128), K/128]``; out ``[M, N]`` in ``out_dtype``.

    BF16 runs the forward kernels. FP32 (and FP16, cast from it) runs the weight-gradient kernel with
    ``b``'s block scales expanded to rows (:func:`block_scales_to_rows`); ``config`` then names a
    ``wgrad`` configuration.
    """
    _fp8_operand("a", a, 2)
    _fp8_operand("b", b, 2)
    (m, k), n = a.shape, b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"a is [M, K] = {tuple(a.shape)}, b must be [N, K] with the same K, got {tuple(b.shape)}")
    kb = math.ceil(k / BLOCK)
    _fp32("a_scales", a_scales, (m, kb), f"1x128 tiles of a[{m}, {k}]")
    _fp32("b_scales", b_scales, (math.ceil(n / BLOCK), kb), f"128x128 blocks of b[{n}, {k}]")
    if out_dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise TypeError(f"out_dtype must be torch.bfloat16, torch.float32 or torch.float16, got {out_dtype}")
    if out_dtype != torch.bfloat16:
        rows = block_scales_to_rows(b_scales, n)
        out = gemm_wgrad(a, a_scales, b, rows, config=config)
        return out if out_dtype == torch.float32 else out.to(out_dtype)
    device = _one_device({"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales})
    out = torch.empty(m, n, dtype=out_dtype, device=device)
    if m == 0 or n == 0 or k == 0:
        return out.zero_()
    _check_k(k)
    _sizes(M=m, N=n, K=k)
    _out_columns(n, out_dtype)
    lda, ldb = _rows("a", a, k), _rows("b", b, k)
    _require_sm90(device)
    config = resolve_config("fwd", m, n, k, config, num_sms=_num_sms(device))
    with nvtx.range(f"cutlass.gemm_fwd.{config}"):
        sfa = scales_mn_major(a_scales)
        sfb = b_scales.contiguous()
        _launch("dualflow_cutlass_gemm_fwd", device, config, (m, n, k, 1, lda, ldb, n, sfa.shape[1], 0),
                m, n, k, a.data_ptr(), lda, sfa.data_ptr(), sfa.shape[1], b.data_ptr(), ldb, sfb.data_ptr(),
                out.data_ptr(), n)
    return out


def gemm_wgrad(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
               out: torch.Tensor | None = None, accumulate: bool = False, config: str | None = None) -> torch.Tensor:
    """FP32 ``a @ b.T`` with both operands scaled 1x128 along K: ``a[M, K]``, ``a_scales[M, K/128]``,
    ``b[N, K]``, ``b_scales[N, K/128]`` (the weight gradient, K = tokens: ``quantize_128x1`` of the
    output gradient and of the input give these operands).

    Writes into ``out`` (FP32 ``[M, N]``) when given, adding to it with ``accumulate=True``; returns it.
    """
    m, n, k = _wgrad_operands(a, a_scales, b, b_scales, "K")
    named = {"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales}
    if out is not None:
        _fp32("out", out, (m, n), "the FP32 weight gradient")
        named["out"] = out
    elif accumulate:
        raise ValueError("accumulate=True adds into `out`: pass the FP32 [M, N] buffer to add to")
    device = _one_device(named)
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32, device=device)
    if m == 0 or n == 0 or k == 0:
        return out if accumulate else out.zero_()
    _check_k(k)
    _sizes(M=m, N=n, K=k)
    _out_columns(n, torch.float32)
    lda, ldb, ldd = _rows("a", a, k), _rows("b", b, k), _rows("out", out, n)
    _require_sm90(device)
    config = resolve_config("wgrad", m, n, k, config)
    with nvtx.range(f"cutlass.gemm_wgrad.{config}"):
        sfa, sfb = scales_mn_major(a_scales), scales_mn_major(b_scales)
        _launch("dualflow_cutlass_gemm_wgrad", device, config, (m, n, k, 1, lda, ldb, ldd, sfa.shape[1], sfb.shape[1]),
                m, n, k, a.data_ptr(), lda, sfa.data_ptr(), sfa.shape[1], b.data_ptr(), ldb, sfb.data_ptr(),
                sfb.shape[1], out.data_ptr(), ldd, int(accumulate))
    return out


def grouped_gemm_contiguous(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                            group_offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                            config: str | None = None, errors: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group ``a[lo:hi] @ b[g].T`` with ``lo, hi = group_offsets[g], group_offsets[g+1]``: ``a`` E4M3
    ``[T, K]`` with 1x128 scales ``[T, K/128]``, ``b`` E4M3 ``[G, N, K]`` with 128x128 scales
    ``[G, ceil(N/128), K/128]``, ``group_offsets`` int32/int64 ``[G+1]`` on the device; BF16 out ``[T, N]``.

    Groups may have any size, zero included. The offsets are read on the device only (no host
    synchronisation) and must be non-decreasing within ``[0, T]``. Malformed offsets cannot make the kernels
    access memory outside the operands (the argument kernel clamps them into ``[0, T]``, non-decreasing);
    they leave output rows unspecified, as are rows outside every group, and the first malformed group is
    written into ``errors`` when given (the int64 record of :class:`dualflow.fp8.groups.Fp8ErrorFlag`, on
    the operands' device; :func:`dualflow.fp8.fp8_grouped_gemm` passes its ``errors=`` flag's).
    """
    _fp8_operand("a", a, 2)
    _fp8_operand("b", b, 3)
    (t, k), (groups, n, k_b) = a.shape, b.shape
    if k_b != k:
        raise ValueError(f"a is [T, K] = {tuple(a.shape)}, b must be [G, N, K] with the same K, got {tuple(b.shape)}")
    kb = math.ceil(k / BLOCK)
    _fp32("a_scales", a_scales, (t, kb), f"1x128 tiles of a[{t}, {k}]")
    _fp32("b_scales", b_scales, (groups, math.ceil(n / BLOCK), kb), f"128x128 blocks of each b[g] [{n}, {k}]")
    if (not isinstance(group_offsets, torch.Tensor) or group_offsets.dtype not in (torch.int32, torch.int64)
            or tuple(group_offsets.shape) != (groups + 1,)):
        got = (f"{group_offsets.dtype} of shape {tuple(group_offsets.shape)}" if isinstance(group_offsets, torch.Tensor)
               else type(group_offsets).__name__)
        raise ValueError(f"group_offsets must be int32/int64 of shape ({groups + 1},) for G = {groups}, got {got}")
    if out_dtype != torch.bfloat16:
        raise CutlassUnsupported(f"the CUTLASS grouped GEMM writes torch.bfloat16, got out_dtype={out_dtype}")
    named = {"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales, "group_offsets": group_offsets}
    if errors is not None:
        if not isinstance(errors, torch.Tensor) or errors.dtype != torch.int64 or tuple(errors.shape) != (
                RECORD_SIZE,) or not errors.is_contiguous():
            got = (f"{errors.dtype} of shape {tuple(errors.shape)}" if isinstance(errors, torch.Tensor)
                   else type(errors).__name__)
            raise ValueError(f"errors must be a contiguous int64 tensor of shape ({RECORD_SIZE},) "
                             f"(Fp8ErrorFlag.record), got {got}")
        named["errors"] = errors
    device = _one_device(named)
    out = torch.empty(t, n, dtype=out_dtype, device=device)
    if t == 0 or n == 0 or groups == 0 or k == 0:
        if errors is not None:  # no kernel reads the offsets: check them with torch operations instead
            record_on_device(errors, group_offsets, "contiguous", t)
        return out.zero_() if k == 0 else out
    _check_k(k)
    _sizes(T=t, N=n, K=k, G=groups)
    _out_columns(n, out_dtype)
    for name, x in (("a", a), ("b", b)):
        if not x.is_contiguous() or x.data_ptr() % 16:
            raise CutlassUnsupported(f"{name} must be contiguous and 16-byte aligned for the grouped GEMM, got "
                                     f"strides {x.stride()} at address {x.data_ptr():#x}")
    _require_sm90(device)
    offsets = group_offsets.contiguous()
    config = resolve_config("grouped", t, n, k, config, groups=groups, num_sms=_num_sms(device))
    with nvtx.range(f"cutlass.grouped_gemm.{config}"):
        sfa = _grouped_scales_cuda(a_scales, offsets)
        sfb = b_scales.contiguous()
        _launch("dualflow_cutlass_grouped_gemm", device, config, (t, n, k, groups, k, k, n, 0, 0),
                t, n, k, groups, a.data_ptr(), sfa.data_ptr(), b.data_ptr(), sfb.data_ptr(), offsets.data_ptr(),
                offsets.element_size(), 0 if errors is None else errors.data_ptr(), out.data_ptr())
    return out


def kgrouped_wgrad(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                   group_offsets: torch.Tensor, config: str | None = None) -> torch.Tensor:
    """FP32 ``out[g] = a[:, lo:hi] @ b[:, lo:hi].T`` with ``lo, hi = group_offsets[g], group_offsets[g+1]``:
    ``a`` E4M3 ``[M, T]`` and ``b`` E4M3 ``[N, T]``, both with 1x128 scales along T (``[M, T/128]``,
    ``[N, T/128]``: the 128x1 quantization of the output gradient and of the input, tokens grouped by
    expert); ``out`` is ``[G, M, N]``, zero for a group without tokens.

    ``group_offsets`` (int32/int64 ``[G+1]``, on the device) must be multiples of 128, non-decreasing within
    ``[0, T]``: read on the device only (no host synchronisation), so they are not checked here. The kernel
    clamps and rounds them so that it never reads outside the operands; malformed ones leave groups of
    ``out`` unspecified.
    """
    m, n, t = _wgrad_operands(a, a_scales, b, b_scales, "T")
    if (not isinstance(group_offsets, torch.Tensor) or group_offsets.dtype not in (torch.int32, torch.int64)
            or group_offsets.dim() != 1 or group_offsets.numel() < 1):
        got = (f"{group_offsets.dtype} of shape {tuple(group_offsets.shape)}" if isinstance(group_offsets, torch.Tensor)
               else type(group_offsets).__name__)
        raise ValueError(f"group_offsets must be a 1-D int32/int64 tensor of G + 1 >= 1 entries, got {got}")
    groups = group_offsets.numel() - 1
    device = _one_device({"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales, "group_offsets": group_offsets})
    out = torch.empty(groups, m, n, dtype=torch.float32, device=device)
    if groups == 0 or m == 0 or n == 0:
        return out
    if t == 0:
        return out.zero_()
    _check_k(t)
    _sizes(M=m, N=n, T=t, G=groups)
    _out_columns(n, torch.float32)
    if m % 4 or n % 4:
        raise CutlassUnsupported(f"M and N must be multiples of 4 for the k-grouped weight gradient (16-byte "
                                 f"aligned scale blocks), got M={m}, N={n}")
    lda, ldb = _rows("a", a, t), _rows("b", b, t)
    _require_sm90(device)
    if not hasattr(_library(), "dualflow_cutlass_kgrouped_wgrad"):
        raise CutlassUnsupported(f"{_cuda.library_path()} predates the k-grouped weight gradient: rebuild it "
                                 "(`make build`)")
    offsets = group_offsets.contiguous()
    config = resolve_config("kgrouped_wgrad", m, n, t, config, groups=groups, num_sms=_num_sms(device))
    with nvtx.range(f"cutlass.kgrouped_wgrad.{config}"):
        # each group's scales an MN-major [T_g/128, M] block of [T/128, M] (M, N multiples of 4: no padding)
        sfa, sfb = scales_mn_major(a_scales), scales_mn_major(b_scales)
        _launch("dualflow_cutlass_kgrouped_wgrad", device, config, (m, n, t, groups, lda, ldb, n, m, n),
                m, n, t, groups, a.data_ptr(), lda, sfa.data_ptr(), b.data_ptr(), ldb, sfb.data_ptr(),
                offsets.data_ptr(), offsets.element_size(), 0, out.data_ptr())
    return out
