"""Group-wise asymmetric quantization (FlexGen's compression): the one implementation that
weights (`packed.py`) and the KV cache (`storage/kv_rows.py`) both use.

A tensor is cut into groups of `group_size` consecutive elements along `group_dim`; each
group keeps its minimum and its step (max - min) / (2^bits - 1), and every element becomes
round((x - min) / step), an integer in [0, 2^bits - 1]. 4-bit values are packed two per
byte (first of each pair in the high nibble). A dimension that is not a multiple of the
group size is padded by repeating its last element, which does not change any group's range.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 64
    group_dim: int = 0

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.group_size < 2 or self.group_size % 2:
            raise ConfigError(f"group_size must be an even number >= 2, got {self.group_size}")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1


@dataclass
class QuantizedTensor:
    """Packed integer data plus per-group minimum and step, and what is needed to undo it."""

    data: torch.Tensor  # uint8 [..., groups, packed group, ...]
    minimum: torch.Tensor  # [..., groups, 1, ...] in the original float dtype
    step: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    config: QuantConfig

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.minimum, self.step))


def group_levels(groups: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(levels uint8, minimum, step) of fp32 `groups` whose axis `dim` runs within a group;
    minimum and step keep that axis with size 1."""
    levels = (1 << bits) - 1
    minimum = groups.amin(dim=dim, keepdim=True)
    step = (groups.amax(dim=dim, keepdim=True) - minimum) / levels
    safe_step = torch.where(step > 0, step, torch.ones_like(step))  # constant groups: all zeros
    q = torch.clamp(torch.round((groups - minimum) / safe_step), 0, levels).to(torch.uint8)
    return q, minimum, step


def _grouped(x: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """x with group_dim split into (groups, group_size), padded by edge replication."""
    dim = cfg.group_dim % x.dim()
    size = x.shape[dim]
    pad = (-size) % cfg.group_size
    if pad:
        edge = x.narrow(dim, size - 1, 1)
        x = torch.cat([x, edge.expand(*x.shape[:dim], pad, *x.shape[dim + 1:])], dim=dim)
    groups = x.shape[dim] // cfg.group_size
    return x.reshape(*x.shape[:dim], groups, cfg.group_size, *x.shape[dim + 1:])


def quantize(x: torch.Tensor, cfg: QuantConfig = QuantConfig()) -> QuantizedTensor:
    inner = cfg.group_dim % x.dim() + 1  # the within-group axis
    q, minimum, step = group_levels(_grouped(x.float(), cfg), cfg.bits, inner)
    if cfg.bits == 4:
        q = pack_nibbles(q, inner)
    return QuantizedTensor(q, minimum.to(x.dtype), step.to(x.dtype), tuple(x.shape), x.dtype, cfg)


def dequantize(qt: QuantizedTensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    cfg = qt.config
    dim = cfg.group_dim % len(qt.shape)
    last = lambda t: t.movedim(dim + 1, -1)  # groups along the last axis, as dequantize_into takes them
    data, minimum, step = last(qt.data), last(qt.minimum.float()), last(qt.step.float())
    levels = torch.empty(*data.shape[:-1], cfg.group_size, dtype=torch.float32, device=data.device)
    x = dequantize_into(levels, data, minimum, step, cfg.bits).movedim(-1, dim + 1)
    x = x.reshape(*x.shape[:dim], -1, *x.shape[dim + 2:])
    return x.narrow(dim, 0, qt.shape[dim]).to(out_dtype or qt.dtype)


def dequantize_into(out: torch.Tensor, data: torch.Tensor, minimum: torch.Tensor, step: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """Groups along the last axis: data [..., group * bits / 8] uint8, minimum and step
    [..., 1] -> out [..., group] = level * step + minimum, in out's dtype.

    The levels are written straight into `out` and scaled in place: few passes, no
    temporaries (torch's bf16 addcmul is several times slower than mul_ then add_)."""
    if bits == 4:
        unpack_nibbles_into(out, data)
    else:
        out.copy_(data)
    return out.mul_(step).add_(minimum)


def pack_nibbles(q: torch.Tensor, dim: int) -> torch.Tensor:
    """Two 4-bit values per byte along `dim` (even length): first in the high nibble."""
    pairs = q.unflatten(dim, (-1, 2))
    return (pairs.select(dim + 1, 0) << 4) | pairs.select(dim + 1, 1)


def unpack_nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    high, low = packed >> 4, packed & 0x0F
    return torch.stack([high, low], dim=dim + 1).flatten(dim, dim + 1)


def unpack_nibbles_into(out: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """pack_nibbles undone along the last axis, written into `out` (any dtype)."""
    pairs = out.unflatten(-1, (-1, 2))
    pairs[..., 0] = packed >> 4
    pairs[..., 1] = packed & 0x0F
    return out


def row_group(length: int, cfg: QuantConfig) -> int:
    """The group size used for vectors of `length` elements: never longer than the vector."""
    return min(cfg.group_size, length + length % 2)


def quantized_row_bytes(length: int, cfg: QuantConfig, dtype: torch.dtype) -> int:
    """Bytes of one quantized vector of `length` elements: packed levels plus each group's
    minimum and step."""
    group = row_group(length, cfg)
    groups = -(-length // group)
    return groups * group * cfg.bits // 8 + 2 * groups * torch.empty((), dtype=dtype).element_size()
