"""Token payloads as rows of bytes: what dispatch moves, independent of the backend moving it.

A payload is BF16/FP32 ``[T, H]`` or an FP8 pair ``(E4M3 [T, H], FP32 scales [T, H/128])`` as produced by
``dualflow.fp8`` (taken as plain tensors; this module does not import it). Backends move byte rows, so
FP8 never needs a collective that understands FP8 (gloo does not).
"""

from __future__ import annotations

import dataclasses

import torch

FP8_BLOCK = 128
FLOAT_DTYPES = (torch.bfloat16, torch.float32)
# Wire codes of the payload kinds, exchanged in the cross-rank agreement check.
KIND_CODES = {torch.bfloat16: 1, torch.float32: 2, torch.float8_e4m3fn: 3}


@dataclasses.dataclass(frozen=True, eq=False)
class Payload:
    """The tensors of one payload: ``data`` [T, H] and, for FP8, ``scales`` [T, H/128] float32."""

    data: torch.Tensor
    scales: torch.Tensor | None = None

    @property
    def is_fp8(self) -> bool:
        return self.scales is not None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.data] if self.scales is None else [self.data, self.scales]

    def byte_rows(self) -> list[torch.Tensor]:
        """Each tensor as contiguous ``[T, bytes_per_row]`` uint8 (a view when already contiguous)."""
        return [as_byte_rows(t) for t in self.tensors]

    def empty_like_rows(self, num_rows: int) -> Payload:
        """An uninitialised payload of the same kind with ``num_rows`` rows."""
        return Payload(*(t.new_empty((num_rows, t.shape[1])) for t in self.tensors))

    def output(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The user-facing form: a tensor, or the (fp8, scales) tuple."""
        return self.data if self.scales is None else (self.data, self.scales)


def check_payload(x: object, hidden: int) -> tuple[Payload | None, str]:
    """``(payload, "")`` when ``x`` is a valid payload of width ``hidden``, else ``(None, reason)``."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in FLOAT_DTYPES:
            return None, (f"x must be bfloat16 or float32 (or an FP8 (data, scales) tuple), got {x.dtype}; "
                          "convert it with x.to(torch.bfloat16)")
        if x.dim() != 2 or x.shape[1] != hidden:
            return None, f"x must be [num_tokens, hidden={hidden}], got shape {list(x.shape)}"
        return Payload(x), ""
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(t, torch.Tensor) for t in x):
        data, scales = x
        if data.dtype != torch.float8_e4m3fn:
            return None, f"FP8 payload data must be torch.float8_e4m3fn, got {data.dtype}"
        if scales.dtype != torch.float32:
            return None, f"FP8 payload scales must be float32, got {scales.dtype}"
        if hidden % FP8_BLOCK:
            return None, (f"FP8 payloads need hidden to be a multiple of {FP8_BLOCK} (one scale per "
                          f"{FP8_BLOCK} values), this buffer has hidden={hidden}; send bfloat16 instead")
        if data.dim() != 2 or data.shape[1] != hidden:
            return None, f"FP8 payload data must be [num_tokens, hidden={hidden}], got shape {list(data.shape)}"
        want = [data.shape[0], hidden // FP8_BLOCK]
        if list(scales.shape) != want:
            return None, (f"FP8 payload scales must be [num_tokens, hidden/{FP8_BLOCK}] = {want}, "
                          f"got {list(scales.shape)}")
        if scales.device != data.device:
            return None, f"FP8 payload data is on {data.device} but its scales are on {scales.device}"
        return Payload(data, scales), ""
    return None, (f"x must be a [num_tokens, hidden] tensor or an (fp8 data, float32 scales) tuple, got "
                  f"{type(x).__name__}")


def as_byte_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` [N, W] as ``[N, W * itemsize]`` uint8, sharing memory when ``t`` is contiguous."""
    t = t.contiguous()
    # Through 1-D: a contiguous [N, 1] tensor may have any stride on its last dim (torch.where makes
    # [0, 1] with strides (1, 0)), which view(dtype) refuses.
    return t.reshape(-1).view(torch.uint8).view(t.shape[0], t.shape[1] * t.element_size())


def from_byte_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`as_byte_rows`: uint8 ``[N, W * itemsize]`` (rows may be strided) -> ``[N, W]``."""
    return rows.contiguous().view(dtype)


class RowPacker:
    """Lays out several byte fields side by side in one ``[N, row_bytes]`` uint8 row, 16-byte aligned."""

    ALIGN = 16

    def __init__(self, widths: list[int]) -> None:
        self.widths = list(widths)
        self.offsets = []
        pos = 0
        for w in self.widths:
            self.offsets.append(pos)
            pos += -(-w // self.ALIGN) * self.ALIGN
        self.row_bytes = max(pos, self.ALIGN)

    def pack(self, fields: list[torch.Tensor], index: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``index`` (all rows when None) of the byte ``fields`` packed into one buffer."""
        n = fields[0].shape[0] if index is None else index.numel()
        out = torch.empty(n, self.row_bytes, dtype=torch.uint8, device=fields[0].device)
        for f, off, w in zip(fields, self.offsets, self.widths):
            out[:, off:off + w] = f if index is None else f.index_select(0, index)
        return out

    def unpack(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """Views ``[N, width]`` of each field in a packed buffer."""
        return [packed[:, off:off + w] for off, w in zip(self.offsets, self.widths)]
