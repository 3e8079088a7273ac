"""NVML queries that cannot fail a run: every call answers ``None`` instead of raising.

:class:`Nvml` is one NVML session (NVML counts its own initialisations, so sessions nest); the NVLink
matrix and :class:`GpuTelemetry` build on it. The pure helpers (:func:`visible_physical_indices`,
:func:`nvlink_counts`) hold the logic and are tested without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

# NVML topology levels -> nvidia-smi's labels (nearest first).
_TOPOLOGY = ((0, "PIX"), (10, "PIX"), (20, "PXB"), (30, "PHB"), (40, "NODE"), (50, "SYS"))


class Nvml:
    """An NVML session. ``call(name, *args)`` runs ``pynvml.<name>`` and returns ``None`` on any failure."""

    def __init__(self) -> None:
        self.error: str | None = None
        self._lib: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._lib = pynvml
        except Exception as exc:  # no driver, no library, no permission: all just mean "no NVML"
            self.error = f"{type(exc).__name__}: {exc}"

    @property
    def available(self) -> bool:
        return self._lib is not None

    def const(self, name: str, default: int | None = None) -> Any:
        return getattr(self._lib, name, default) if self._lib else default

    def call(self, name: str, *args: Any) -> Any:
        if self._lib is None:
            return None
        try:
            return getattr(self._lib, name)(*args)
        except Exception:
            return None

    def close(self) -> None:
        if self._lib is not None:
            self.call("nvmlShutdown")
            self._lib = None

    def __enter__(self) -> Nvml:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_text(value: Any) -> str | None:
    """pynvml answers bytes or str depending on its version; None stays None."""
    return value.decode() if isinstance(value, bytes) else None if value is None else str(value)


def normalize_bus_id(bus_id: str | bytes) -> tuple[int, int, str]:
    """``00000000:18:00.0`` and ``0000:18:00.0`` -> ``(0, 0x18, '00.0')`` (NVML pads the domain differently)."""
    parts = str(as_text(bus_id)).strip().lower().split(":")
    if len(parts) != 3:
        raise ValueError(f"bad PCI bus id {bus_id!r}: expected DOMAIN:BUS:DEVICE.FUNCTION")
    return int(parts[0], 16), int(parts[1], 16), parts[2]


def visible_physical_indices(cuda_visible_devices: str | None, uuids: Sequence[str]) -> list[int]:
    """Physical (NVML) indices of the GPUs CUDA exposes, in CUDA's order.

    ``CUDA_VISIBLE_DEVICES`` lists indices or (prefixes of) ``GPU-`` UUIDs; like CUDA, the list ends at
    the first entry that names no GPU, and unset means every GPU. MIG entries are not mapped.
    """
    if cuda_visible_devices is None:
        return list(range(len(uuids)))
    out: list[int] = []
    for token in (t.strip() for t in cuda_visible_devices.split(",")):
        if token.isdigit():
            index = int(token)
        else:
            matches = [i for i, u in enumerate(uuids) if token and u.lower().startswith(token.lower())]
            index = matches[0] if len(matches) == 1 else -1
        if not (0 <= index < len(uuids)) or index in out:
            break
        out.append(index)
    return out


def nvlink_counts(links: Sequence[Sequence[tuple[str, tuple[int, int, str] | None]]],
                  bus_ids: Sequence[tuple[int, int, str]]) -> list[list[int]]:
    """NVLinks between each pair of GPUs, from each GPU's active links.

    ``links[i]`` lists GPU i's active links as ``("gpu", remote_bus_id)`` or ``("switch", None)``. Two GPUs
    that both reach NVSwitches talk over min(their switch links), as ``nvidia-smi topo -m`` counts them.
    """
    n = len(bus_ids)
    index = {bus: i for i, bus in enumerate(bus_ids)}
    direct = [[0] * n for _ in range(n)]
    switch = [0] * n
    for i, gpu_links in enumerate(links):
        for kind, remote in gpu_links:
            if kind == "switch":
                switch[i] += 1
            elif remote in index:
                direct[i][index[remote]] += 1
    return [[0 if i == j else direct[i][j] + min(switch[i], switch[j]) for j in range(n)] for i in range(n)]


def _active_links(nvml: Nvml, handle: Any) -> list[tuple[str, tuple[int, int, str] | None]]:
    out: list[tuple[str, tuple[int, int, str] | None]] = []
    enabled = nvml.const("NVML_FEATURE_ENABLED", 1)
    switch_type = nvml.const("NVML_NVLINK_DEVICE_TYPE_SWITCH", 2)
    for link in range(nvml.const("NVML_NVLINK_MAX_LINKS", 18)):
        if nvml.call("nvmlDeviceGetNvLinkState", handle, link) != enabled:
            continue
        if nvml.call("nvmlDeviceGetNvLinkRemoteDeviceType", handle, link) == switch_type:
            out.append(("switch", None))
            continue
        pci = nvml.call("nvmlDeviceGetNvLinkRemotePciInfo", handle, link)
        try:
            out.append(("gpu", normalize_bus_id(pci.busId)))
        except (AttributeError, ValueError):
            continue
    return out


def torch_uuids() -> list[str] | None:
    """The UUIDs of the devices torch sees, in CUDA's order; None where torch cannot tell."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    except Exception:
        return None


def _bare(uuid: str) -> str:
    return uuid.lower().removeprefix("gpu-")


def visible_handles(nvml: Nvml, cuda_visible_devices: str | None = None) -> list[tuple[int, Any]]:
    """(physical index, NVML handle) of each GPU CUDA shows this process, in CUDA's order.

    Matched by UUID when torch can list its devices (exact whatever ``CUDA_DEVICE_ORDER`` is), else by
    reading ``CUDA_VISIBLE_DEVICES`` (:func:`visible_physical_indices`).
    """
    count = nvml.call("nvmlDeviceGetCount") or 0
    handles = [nvml.call("nvmlDeviceGetHandleByIndex", i) for i in range(count)]
    uuids = [as_text(nvml.call("nvmlDeviceGetUUID", h)) or "" for h in handles]
    seen = torch_uuids() if cuda_visible_devices is None else None
    if seen is not None and all(_bare(u) in map(_bare, uuids) for u in seen):
        order = [[_bare(x) for x in uuids].index(_bare(u)) for u in seen]
    else:
        env = os.environ.get("CUDA_VISIBLE_DEVICES") if cuda_visible_devices is None else cuda_visible_devices
        order = visible_physical_indices(env, uuids)
    return [(i, handles[i]) for i in order if handles[i] is not None]


def topology_matrix(nvml: Nvml, handles: Sequence[Any]) -> list[list[str]]:
    """``nvidia-smi topo -m``-style cells: ``X`` on the diagonal, ``NV<links>``, else the PCIe/CPU path."""
    buses = []
    for h in handles:
        pci = nvml.call("nvmlDeviceGetPciInfo", h)
        try:
            buses.append(normalize_bus_id(pci.busId))
        except (AttributeError, ValueError):
            buses.append((-1, -1, str(len(buses))))
    counts = nvlink_counts([_active_links(nvml, h) for h in handles], buses)
    cells = []
    for i, hi in enumerate(handles):
        row = []
        for j, hj in enumerate(handles):
            if i == j:
                row.append("X")
            elif counts[i][j]:
                row.append(f"NV{counts[i][j]}")
            else:
                level = nvml.call("nvmlDeviceGetTopologyCommonAncestor", hi, hj)
                row.append(next((name for lvl, name in reversed(_TOPOLOGY) if level is not None and level >= lvl),
                                "?"))
        cells.append(row)
    return cells


class GpuTelemetry:
    """Temperature, power, utilisation, memory and SM clock of one GPU; :meth:`sample` never raises.

    ``device`` is the CUDA index this process sees (mapped through ``CUDA_VISIBLE_DEVICES``). Without
    NVML, or for a GPU NVML cannot query, samples are empty dicts.
    """

    def __init__(self, device: int = 0) -> None:
        self._nvml = Nvml()
        handles = visible_handles(self._nvml) if self._nvml.available else []
        self._handle = handles[device][1] if 0 <= device < len(handles) else None

    def sample(self) -> dict[str, float]:
        if self._handle is None:
            return {}
        nvml, h = self._nvml, self._handle
        out: dict[str, float] = {}
        for key, value in (
            ("temperature_c", nvml.call("nvmlDeviceGetTemperature", h, nvml.const("NVML_TEMPERATURE_GPU", 0))),
            ("power_w", _scaled(nvml.call("nvmlDeviceGetPowerUsage", h), 1e-3)),
            ("utilization_pct", getattr(nvml.call("nvmlDeviceGetUtilizationRates", h), "gpu", None)),
            ("memory_used_gib", _scaled(getattr(nvml.call("nvmlDeviceGetMemoryInfo", h), "used", None), 2**-30)),
            ("sm_clock_mhz", nvml.call("nvmlDeviceGetClockInfo", h, nvml.const("NVML_CLOCK_SM", 1))),
        ):
            if isinstance(value, int | float):
                out[key] = float(value)
        return out

    def close(self) -> None:
        self._nvml.close()


def _scaled(value: Any, factor: float) -> float | None:
    return value * factor if isinstance(value, int | float) else None
