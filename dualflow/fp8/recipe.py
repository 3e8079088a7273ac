"""``Fp8Recipe``: how a model is trained in FP8 (DeepSeek-V3's recipe by default)."""

from __future__ import annotations

import dataclasses
import fnmatch

from dualflow.fp8.gemm import BACKENDS
from dualflow.fp8.quant import BLOCK, QUANT_BACKENDS

WGRAD_BACKENDS = ("auto", "cutlass", "triton")


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
    """Settings of the FP8 linear layers.

    - ``block_size``: the tile edge of the scales and the FP32 promotion interval of the GEMMs (1x128 for
      activations and gradients, 128x128 for weights). The kernels implement 128 only; it is recorded here
      so that a checkpointed recipe says what it was trained with.
    - ``pow2_scales``: round every scale up to a power of two (exact as UE8M0).
    - ``high_precision``: ``fnmatch`` patterns of qualified module names that :func:`convert_to_fp8` leaves
      in high precision (embedding, output head, router/gate, normalization).
    - ``backend``: GEMM backend for :func:`dualflow.fp8.fp8_gemm` (a name, a comma list, or ``"auto"``).
    - ``quant_backend``: quantization backend (``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"``: see
      :func:`dualflow.fp8.quant.resolve_quant_backend`).
    - ``wgrad_backend``: the kernel of the routed experts' weight gradients (grouped along the tokens):
      ``"cutlass"``, ``"triton"``, or ``"auto"``: whichever of the two ``backend`` names first (CUTLASS's
      in the default order), Triton's where CUTLASS cannot run (:func:`dualflow.fp8.moe.wgrad_backend`).
    """

    block_size: int = BLOCK
    pow2_scales: bool = False
    high_precision: tuple[str, ...] = ("*embed*", "lm_head", "*.lm_head", "head", "*.head", "*router*", "gate",
                                       "*.gate", "*norm*")
    backend: str = "auto"
    quant_backend: str = "auto"
    wgrad_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size != BLOCK:
            raise ValueError(f"block_size must be {BLOCK} (the tile the FP8 kernels implement), got {self.block_size}")
        names = [s.strip() for s in self.backend.split(",")]
        if self.backend != "auto" and not all(n in BACKENDS for n in names):
            raise ValueError(f"backend must be 'auto', one of {BACKENDS} or a comma list of them, got {self.backend!r}")
        if self.quant_backend not in QUANT_BACKENDS:
            raise ValueError(f"quant_backend must be one of {QUANT_BACKENDS}, got {self.quant_backend!r}")
        if self.wgrad_backend not in WGRAD_BACKENDS:
            raise ValueError(f"wgrad_backend must be one of {WGRAD_BACKENDS}, got {self.wgrad_backend!r}")
        if isinstance(self.high_precision, str):
            raise TypeError("high_precision is a tuple of patterns; got a single string (write (pattern,))")

    def high_precision_match(self, name: str) -> str | None:
        """The first ``high_precision`` pattern that module name ``name`` matches, or None."""
        return next((p for p in self.high_precision if fnmatch.fnmatchcase(name, p)), None)
