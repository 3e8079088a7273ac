"""FP8 with fine-grained scaling: 1x128 / 128x128 quantization, block-scaled GEMMs, FP8 linear layers.

See docs/fp8.md. Importing this package loads torch only; Triton and the CUDA library are loaded when a
kernel of theirs first runs.
"""

from dualflow.fp8 import ops  # noqa: F401 (registers the torch.ops.dualflow operators)
from dualflow.fp8.convert import ConversionReport, convert_to_fp8
from dualflow.fp8.gemm import (
    BACKENDS,
    ENV_BACKEND,
    EXPERT_ALIGNMENT,
    BackendUnavailable,
    available_backends,
    fp8_gemm,
    fp8_grouped_gemm,
    resolve_backend,
)
from dualflow.fp8.groups import Fp8ErrorFlag
from dualflow.fp8.moe import fp8_grouped_mlp
from dualflow.fp8.nn import (
    Fp8GroupedLinear,
    Fp8Linear,
    Fp8WeightCache,
    Fp8WeightSnapshot,
    enable_fp8_snapshots,
    invalidate_fp8_caches,
    refresh_fp8_snapshots,
)
from dualflow.fp8.quant import (
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    dequantize,
    quantize_1x128,
    quantize_1x128_and_128x1,
    quantize_128x1,
    quantize_128x128,
    quantize_128x128_transposed,
)
from dualflow.fp8.recipe import Fp8Recipe

__all__ = [
    "BACKENDS",
    "BLOCK",
    "ENV_BACKEND",
    "EXPERT_ALIGNMENT",
    "FP8_DTYPE",
    "FP8_MAX",
    "BackendUnavailable",
    "ConversionReport",
    "Fp8ErrorFlag",
    "Fp8GroupedLinear",
    "Fp8Linear",
    "Fp8Recipe",
    "Fp8WeightCache",
    "Fp8WeightSnapshot",
    "available_backends",
    "convert_to_fp8",
    "dequantize",
    "enable_fp8_snapshots",
    "fp8_gemm",
    "fp8_grouped_gemm",
    "fp8_grouped_mlp",
    "invalidate_fp8_caches",
    "quantize_1x128",
    "quantize_1x128_and_128x1",
    "quantize_128x1",
    "quantize_128x128",
    "quantize_128x128_transposed",
    "refresh_fp8_snapshots",
    "resolve_backend",
]
