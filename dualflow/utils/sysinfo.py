"""What this machine offers dualflow: versions, devices, the CUDA library, distributed backends.

:func:`collect` never raises: each probe that fails is reported as text. ``dualflow info`` prints it;
``dualflow doctor`` builds on it.
"""

from __future__ import annotations

import platform
from typing import Any


def _probe(fn) -> Any:
    try:
        return fn()
    except Exception as exc:  # a probe reports, it never fails the caller
        return f"unavailable ({type(exc).__name__}: {exc})"


def _nccl_version() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _triton_version() -> str:
    import triton

    return triton.__version__


def _devices() -> list[dict[str, Any]]:
    import torch

    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({
            "index": i,
            "name": p.name,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "sms": p.multi_processor_count,
            "capability": f"{p.major}.{p.minor}",
        })
    return out


def _backends() -> dict[str, bool]:
    import torch.distributed as dist

    if not dist.is_available():
        return {}
    return {
        "gloo": dist.is_gloo_available(),
        "nccl": dist.is_nccl_available(),
        "mpi": dist.is_mpi_available(),
        "ucc": getattr(dist, "is_ucc_available", lambda: False)(),
    }


def _cuda_library() -> dict[str, Any]:
    from dualflow import _cuda

    path = _cuda.library_path()
    info: dict[str, Any] = {"path": str(path) if path else None, "loadable": False}
    if path is None:
        info["reason"] = "not built (run `make build`; needs nvcc)"
        return info
    try:
        _cuda.load()
        info["loadable"] = True
        info["build"] = _cuda.build_info()
    except Exception as exc:
        info["reason"] = str(exc).splitlines()[0]
    return info


def collect() -> dict[str, Any]:
    """All facts as a JSON-serialisable dict."""
    import torch

    import dualflow

    return {
        "dualflow": dualflow.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _probe(_triton_version),
        "nccl": _probe(_nccl_version),
        "cuda_available": torch.cuda.is_available(),
        "devices": _probe(_devices),
        "cuda_library": _probe(_cuda_library),
        "distributed_backends": _probe(_backends),
    }


def render(info: dict[str, Any]) -> str:
    """Human-readable lines for :func:`collect`'s result."""
    lines = [
        f"dualflow     {info['dualflow']}",
        f"python       {info['python']} ({info['platform']})",
        f"torch        {info['torch']} (built with CUDA {info['torch_cuda'] or 'none: CPU build'})",
        f"triton       {info['triton']}",
        f"nccl         {info['nccl'] or 'n/a (no CUDA)'}",
    ]
    devices = info["devices"]
    if isinstance(devices, list) and devices:
        for d in devices:
            lines.append(
                f"gpu {d['index']}        {d['name']}, {d['memory_gib']} GiB, {d['sms']} SMs, sm_{d['capability']}"
            )
    elif isinstance(devices, list):
        lines.append("gpus         none: this is a CPU-only machine (gloo backend, Triton interpreter)")
    else:
        lines.append(f"gpus         {devices}")
    lib = info["cuda_library"]
    if isinstance(lib, dict) and lib.get("loadable"):
        lines.append(f"libdualflow  loadable: {lib['path']} ({lib.get('build', '')})")
    elif isinstance(lib, dict):
        lines.append(f"libdualflow  not loadable: {lib.get('reason')}")
    else:
        lines.append(f"libdualflow  {lib}")
    backends = info["distributed_backends"]
    if isinstance(backends, dict):
        lines.append("backends     " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in backends.items()))
    return "\n".join(lines)
