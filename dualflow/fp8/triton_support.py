"""Where the Triton FP8 kernels can run: an importable Triton and either a CUDA GPU of compute capability
8.9 or newer (FP8 ``tl.dot`` and E4M3 conversions: Ada, Hopper, Blackwell), or the CPU under Triton's
interpreter (``TRITON_INTERPRET=1``). On an older GPU the kernels would fail to compile; the quantizers
and GEMMs ask here first and fall through to their next backend.
"""

from __future__ import annotations

import os

import torch

MIN_CAPABILITY = (8, 9)


def device_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` compute capability of a CUDA device: the one query the check makes (a seam that
    the CPU tests replace to play an older GPU)."""
    return torch.cuda.get_device_capability(device)


def triton_unavailable_reason(device: torch.device | str, capability: tuple[int, int] | None = None) -> str | None:
    """None when the Triton FP8 kernels can run on ``device``, else why not. ``capability`` overrides the
    device's compute capability (default: :func:`device_capability`)."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        major, minor = capability if capability is not None else device_capability(device)
        if (major, minor) < MIN_CAPABILITY:
            return (f"the Triton FP8 kernels need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or "
                    f"newer (FP8 tensor cores: Ada, Hopper, Blackwell); {device} has {major}.{minor} "
                    f"(sm{major}{minor})")
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"the Triton kernels need CUDA tensors (got {device.type}; TRITON_INTERPRET=1 runs them on the CPU)"
