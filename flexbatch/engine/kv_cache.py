"""The KV cache of one (layer, GPU batch): its sequences split over the tiers, one segment
per tier, laid out once per block by `sizing.KVRoute.segments` (where each share lives and
where it is attended).

Attention runs over each segment on the device where its K and V are
(`kernels.CacheSegments`), so nothing is concatenated:

- plain K and V kept on the compute device are [n, Hkv, capacity, D] tensors that never
  move (`DenseSegment`): the GPU's share, or on a CPU-only machine the whole in-memory share;
- everything else is token rows, plain or quantized (`kv_segments.RowSegment`): host RAM
  beside a GPU, disk, and a compressed cache on every tier.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..kernels.attention import CacheSegments
from ..kernels.packed import element_size
from ..kernels.quant import QuantConfig
from ..sizing import KVSegmentPlace
from ..storage.disk import DiskFile, Traffic
from ..storage.kv_rows import RowCodec
from ..storage.tiers import Tier
from .kv_segments import CPU, BufferPool, RowHome, RowSegment, Staging

PoolKey = tuple[Tier, Staging]


@dataclass(frozen=True)
class KVFormat:
    """How a block keeps K and V: one sequence's shape per layer, and its encoding."""

    heads: int
    head_dim: int
    capacity: int  # token slots per sequence
    dtype: torch.dtype
    quant: QuantConfig | None = None  # None: plain rows
    window: int = 0  # a quantized cache's last tokens also kept exact (0: none)

    def codec(self, sequences: int, exact: bool = False) -> RowCodec:
        return RowCodec(sequences, self.heads, self.head_dim, self.dtype, None if exact else self.quant)

    @property
    def ring_rows(self) -> int:
        return min(self.window, self.capacity) if self.quant is not None else 0


class DenseSegment:
    """Plain K and V of n sequences that stay where they are attended, on the compute device."""

    def __init__(self, sequences: int, fmt: KVFormat, device: torch.device):
        shape = (sequences, fmt.heads, fmt.capacity, fmt.head_dim)
        self.kv = [torch.empty(shape, dtype=fmt.dtype, device=device) for _ in range(2)]

    def load(self, length: int) -> list[torch.Tensor]:
        return self.kv

    def store(self, start: int, end: int) -> None:
        pass

    def close(self) -> None:
        pass


class BatchKV:
    """K and V of one (layer, GPU batch): a segment per place in `places` (consecutive
    sequences, in order), buffers from the block's `pools` (`block_pools`), disk segments in
    files named after `disk_path`, their I/O counted in `traffic`."""

    def __init__(self, places: list[KVSegmentPlace], fmt: KVFormat, device: torch.device, disk_path: Path,
                 pools: dict[PoolKey, BufferPool], traffic: Traffic | None = None):
        self.device = device
        self.segments = [_segment(place, fmt, device, disk_path, pools, traffic) for place in places]

    def load(self, length: int):
        """K, V for attention, tokens [0, length) filled: one tensor each when the cache is
        one segment on the compute device, else `CacheSegments`."""
        parts = [s.load(length) for s in self.segments]
        if len(parts) == 1 and parts[0][0].device.type == self.device.type:
            return parts[0][0], parts[0][1]
        return CacheSegments([p[0] for p in parts]), CacheSegments([p[1] for p in parts])

    def store(self, start: int, end: int) -> None:
        """Keep tokens [start, end), written into what `load` returned; free its buffers."""
        for s in self.segments:
            s.store(start, end)

    def close(self) -> None:
        for s in self.segments:
            s.close()


def _segment(place: KVSegmentPlace, fmt: KVFormat, device: torch.device, disk_path: Path,
             pools: dict[PoolKey, BufferPool], traffic: Traffic | None) -> DenseSegment | RowSegment:
    if fmt.quant is None and place.home is Tier.DEVICE:
        return DenseSegment(place.sequences, fmt, device)
    codec, tier = fmt.codec(place.sequences), place.home
    rows = lambda n, row_bytes, purpose, tag: RowHome(
        n, row_bytes, _home_device(place, device), _files(disk_path, tag, n * row_bytes, traffic, place),
        pools.get((tier, purpose)), pinned=_copied_raw(place, fmt, device))
    home = rows(fmt.capacity, codec.row_bytes, Staging.READ, "")
    ring = rows(fmt.ring_rows, fmt.codec(place.sequences, exact=True).row_bytes, Staging.RING, "w") \
        if fmt.ring_rows else None
    to_attend = pools.get((tier, Staging.DENSE if fmt.quant is not None else Staging.TO_DEVICE))
    return RowSegment(codec, home, device if place.on_device else CPU, to_attend, ring)


def _copied_raw(place: KVSegmentPlace, fmt: KVFormat, device: torch.device) -> bool:
    """Plain rows that live off the GPU and are copied to it as they are for attention
    (their host memory is pinned, so the copies run asynchronously)."""
    return device.type == "cuda" and fmt.quant is None and place.on_device and place.home is not Tier.DEVICE


def _home_device(place: KVSegmentPlace, device: torch.device) -> torch.device:
    return device if place.home is Tier.DEVICE else CPU


def _files(disk_path: Path, tag: str, nbytes: int, traffic: Traffic | None,
           place: KVSegmentPlace) -> list[DiskFile] | None:
    if place.home is not Tier.DISK:
        return None
    return [DiskFile(Path(f"{disk_path}.{tag}{kv}"), nbytes, traffic=traffic) for kv in "kv"]


def block_pools(layouts: list[list[KVSegmentPlace]], fmt: KVFormat, device: torch.device,
                count: int) -> dict[PoolKey, BufferPool]:
    """The buffers the caches of a block's GPU batches (laid out as `layouts`) share while
    loaded: `count` per (tier, purpose)."""
    return {key: BufferPool(nbytes, count, where, pinned)
            for key, (nbytes, where, pinned) in buffer_needs(layouts, fmt, device).items()}


def buffer_needs(layouts: list[list[KVSegmentPlace]], fmt: KVFormat,
                 device: torch.device) -> dict[PoolKey, tuple[int, torch.device, bool]]:
    """(tier, purpose) -> (bytes, device, pinned) of one buffer of each pool: as large as the
    largest segment it serves."""
    needs: dict[PoolKey, tuple[int, torch.device, bool]] = {}
    for places in layouts:
        for place in places:
            for key, (nbytes, where, pinned) in _segment_needs(place, fmt, device).items():
                needs[key] = (max(nbytes, needs.get(key, (0,))[0]), where, pinned)
    return needs


def _segment_needs(place: KVSegmentPlace, fmt: KVFormat, device: torch.device) -> dict:
    """(tier, purpose) -> (bytes, device, pinned) of the buffers one load of `place` takes."""
    tier, n = place.home, place.sequences
    rows_bytes = fmt.capacity * fmt.codec(n).row_bytes
    needs = {}
    copied_raw = _copied_raw(place, fmt, device)
    if tier is Tier.DISK:
        needs[tier, Staging.READ] = (rows_bytes, CPU, copied_raw)
        if fmt.ring_rows:
            needs[tier, Staging.RING] = (fmt.ring_rows * fmt.codec(n, exact=True).row_bytes, CPU, False)
    if fmt.quant is not None:
        dense = n * fmt.heads * fmt.capacity * fmt.head_dim * element_size(fmt.dtype)
        needs[tier, Staging.DENSE] = (dense, device if place.on_device else CPU, False)
    elif copied_raw:
        needs[tier, Staging.TO_DEVICE] = (rows_bytes, device, False)
    return needs
