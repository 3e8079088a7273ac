"""``dualflow doctor``: preflight checks before a distributed run.

Builds on :func:`dualflow.utils.sysinfo.collect` (versions, devices, the CUDA library, backends) and adds
the driver and CUDA driver versions and the NVLink/P2P matrix from NVML, the open-file and locked-memory
limits and the size of /dev/shm (NCCL needs both), the launcher environment this process is in, and the
NCCL variables set. Every probe reports its failure as text: the command never crashes, with or
without GPUs. Exit status 1 when a check fails, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dualflow.launcher.env import detect_process
from dualflow.launcher.nvml import Nvml, as_text, topology_matrix, visible_handles

MIN_OPEN_FILES = 65536
MIN_SHM_BYTES = 1 << 30
_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_FR_", "TORCH_SYMM_MEM_", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")


@dataclass(frozen=True)
class Check:
    level: str  # ok | info | warn | fail
    subject: str
    message: str


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # a probe reports, it never fails the command
        return f"unavailable ({type(exc).__name__}: {exc})"


def _nvml_facts() -> dict[str, Any]:
    with Nvml() as nvml:
        if not nvml.available:
            return {"nvml": nvml.error}
        cuda = nvml.call("nvmlSystemGetCudaDriverVersion")
        visible = visible_handles(nvml)
        gpus = []
        for index, (physical, handle) in enumerate(visible):
            pci = nvml.call("nvmlDeviceGetPciInfo", handle)
            gpus.append({"index": index, "physical": physical, "name": as_text(nvml.call("nvmlDeviceGetName", handle)),
                         "uuid": as_text(nvml.call("nvmlDeviceGetUUID", handle)),
                         "bus_id": as_text(getattr(pci, "busId", None))})
        return {
            "nvml": "ok",
            "driver": as_text(nvml.call("nvmlSystemGetDriverVersion")),
            "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else None,
            "nvml_gpus": gpus,
            "topology": topology_matrix(nvml, [h for _, h in visible]),
        }


def _limit(which: int) -> list[int | None]:
    return [None if v == resource.RLIM_INFINITY else v for v in resource.getrlimit(which)]


def _limits() -> dict[str, Any]:
    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    return {
        "open_files": _limit(resource.RLIMIT_NOFILE),
        "locked_memory": _limit(resource.RLIMIT_MEMLOCK),
        "shm_bytes": shm.f_frsize * shm.f_blocks if shm else None,
        "infiniband": Path("/sys/class/infiniband").is_dir() and any(Path("/sys/class/infiniband").iterdir()),
    }


def _launcher(environ: Mapping[str, str]) -> str:
    p = detect_process(environ)
    return (f"{p.source}: rank {p.rank} of {p.world_size}, local rank {p.local_rank} of {p.local_world_size}, "
            f"{p.num_nodes} node(s)")


def checks(info: Mapping[str, Any]) -> list[Check]:
    """Verdicts on :func:`collect`'s facts, each with what to do about it."""
    out: list[Check] = []
    devices = info.get("devices")
    n_gpus = len(devices) if isinstance(devices, list) else 0
    backends = info.get("distributed_backends") or {}
    if n_gpus == 0:
        out.append(Check("info", "gpus", "no GPU visible: jobs run on the CPU with the gloo backend"))
    elif isinstance(backends, dict) and not backends.get("nccl"):
        out.append(Check("fail", "nccl", "GPUs are visible but this torch has no NCCL: install a CUDA build of torch"))
    else:
        out.append(Check("ok", "gpus", f"{n_gpus} GPU(s), NCCL {info.get('nccl')}"))
    if n_gpus and info.get("nvml") != "ok":
        out.append(Check("warn", "nvml", f"NVML unusable ({info.get('nvml')}): no NVLink matrix, no telemetry"))
    topo = info.get("topology")
    if isinstance(topo, list) and len(topo) > 1 and not any(c.startswith("NV") for row in topo for c in row):
        out.append(Check("info", "nvlink", "no NVLink between the visible GPUs: peer traffic goes over PCIe"))
    limits = info.get("limits")
    if isinstance(limits, dict):
        soft = limits["open_files"][0]
        if soft is not None and soft < MIN_OPEN_FILES:
            out.append(Check("warn", "open files", f"open-file limit {soft} < {MIN_OPEN_FILES}: raise it "
                             f"(`ulimit -n {MIN_OPEN_FILES}`, docker --ulimit nofile={MIN_OPEN_FILES})"))
        shm = limits["shm_bytes"]
        if shm is not None and shm < MIN_SHM_BYTES:
            out.append(Check("warn", "/dev/shm", f"/dev/shm is {shm / 2**20:.0f} MiB < 1 GiB: NCCL's intra-node "
                             "transport and DataLoader workers need more (docker --shm-size=16g or --ipc=host)"))
        if n_gpus and limits["infiniband"] and limits["locked_memory"][0] is not None:
            out.append(Check("warn", "memlock", "locked-memory limit is not unlimited on an InfiniBand machine: "
                             "GPUDirect RDMA needs `ulimit -l unlimited` (docker --ulimit memlock=-1)"))
    launcher = info.get("launcher", "")
    if str(launcher).startswith("unavailable"):
        out.append(Check("fail", "launcher", str(launcher)))
    nvls = (info.get("nccl_env") or {}).get("NCCL_NVLS_ENABLE")
    if nvls not in (None, "0"):
        out.append(Check("info", "nvls", f"NCCL_NVLS_ENABLE={nvls}: NVLink multicast on by your choice "
                         "(dualflow keeps it off by default)"))
    lib = info.get("cuda_library")
    if isinstance(lib, dict) and not lib.get("loadable"):
        out.append(Check("info", "libdualflow", f"CUDA library not loadable: {lib.get('reason')} "
                         "(fast comm kernels and CUTLASS GEMMs fall back to torch)"))
    return out


def collect(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every fact as a JSON-serialisable dict, with the verdicts under ``checks``."""
    from dualflow.utils import sysinfo

    environ = os.environ if environ is None else environ
    info = sysinfo.collect()
    nvml = _safe(_nvml_facts)
    info.update(nvml if isinstance(nvml, dict) else {"nvml": nvml})
    info["limits"] = _safe(_limits)
    info["launcher"] = _safe(lambda: _launcher(environ))
    info["nccl_env"] = {k: v for k, v in sorted(environ.items()) if k.startswith(_ENV_PREFIXES)}
    info["checks"] = [asdict(c) for c in checks(info)]
    return info


def _matrix_lines(info: Mapping[str, Any]) -> list[str]:
    topo, gpus = info.get("topology"), info.get("nvml_gpus")
    if not isinstance(topo, list) or not topo or not isinstance(gpus, list):
        return []
    width = max(5, *(len(c) for row in topo for c in row)) + 1
    lines = ["nvlink/p2p   " + " " * 14 + "".join(f"GPU{j}".rjust(width) for j in range(len(topo)))]
    for g, row in zip(gpus, topo):
        label = f"GPU{g['index']} (phys {g['physical']})"
        lines.append("             " + label.ljust(14) + "".join(c.rjust(width) for c in row))
    return lines


def render(info: Mapping[str, Any]) -> str:
    from dualflow.utils import sysinfo

    lines = [sysinfo.render(info)]
    if info.get("nvml") == "ok":
        lines.append(f"driver       {info.get('driver')} (CUDA driver {info.get('cuda_driver')})")
    else:
        lines.append(f"nvml         {info.get('nvml')}")
    lines += _matrix_lines(info)
    limits = info.get("limits")
    if isinstance(limits, dict):
        def fmt(pair: list[int | None]) -> str:
            return "/".join("unlimited" if v is None else str(v) for v in pair)

        shm = limits["shm_bytes"]
        lines.append(f"limits       open files {fmt(limits['open_files'])} (soft/hard), locked memory "
                     f"{fmt(limits['locked_memory'])}, /dev/shm "
                     f"{'absent' if shm is None else f'{shm / 2**30:.1f} GiB'}")
    else:
        lines.append(f"limits       {limits}")
    lines.append(f"launcher     {info.get('launcher')}")
    env = info.get("nccl_env") or {}
    lines.append("nccl env     " + (" ".join(f"{k}={v}" for k, v in env.items()) or "none set"))
    for c in info.get("checks", []):
        lines.append(f"[{c['level'].upper():>4}] {c['subject']}: {c['message']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the facts and checks as JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
    return 1 if any(c["level"] == "fail" for c in info["checks"]) else 0
