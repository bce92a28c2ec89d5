"""The KV cache of one (layer, GPU batch), split by sequence over the tiers.

Each tier's sequences form one segment, and attention runs over each segment on the device
where its K and V are (`kernels.CacheSegments`), so nothing is concatenated:

- Resident: [n, Hkv, capacity, D] tensors that never move (the GPU's share, or on a CPU-only
  machine the whole in-memory share).
- Token rows (`TokenRows`): host-RAM or disk sequences kept token-major, [capacity, n, Hkv,
  D] as bytes, so the first T tokens are one contiguous range (one read, one copy) and a
  step's new tokens a short range at the end (one small write). They are viewed, not copied,
  as [n, Hkv, capacity, D]. On a GPU they are copied to pooled GPU buffers for attention,
  unless CPU attention is on: then attention runs on the CPU over them where they are.
"""
from __future__ import annotations

import queue
from pathlib import Path

import torch

from ..kernels.attention import CacheSegments
from ..storage.aligned import aligned_bytes, as_dtype
from ..storage.disk import DiskFile, Traffic
from ..storage.kv_rows import RowCodec
from ..storage.tiers import Tier

CPU = torch.device("cpu")


class BufferPool:
    """A fixed set of equal byte buffers (page-aligned on the host, pinned when a GPU is
    used); `acquire` blocks until one is free."""

    def __init__(self, nbytes: int, count: int, device: torch.device = CPU, pinned: bool = False):
        self.nbytes = nbytes
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            buf = aligned_bytes(nbytes, pinned) if device.type == "cpu" else \
                torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._free.put(buf)

    def acquire(self) -> torch.Tensor:
        return self._free.get()

    def release(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


class Resident:
    """K and V of n sequences that stay in one place."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
        self.kv = [torch.empty(shape, dtype=dtype, device=device) for _ in range(2)]

    def load(self, length: int) -> list[torch.Tensor]:
        return self.kv

    def store(self, start: int, end: int) -> None:
        pass

    def close(self) -> None:
        pass


class TokenRows:
    """K and V of n sequences as token-major rows in host RAM (`files` None) or in two disk
    files, attended on `attend` (the CPU or the GPU).

    Staging: rows on disk are read into a host buffer from `host_pool`; rows attended on a
    GPU are copied into a buffer from `device_pool`. A load takes the buffers it needs and
    the store after it gives them back.
    """

    def __init__(self, codec: RowCodec, capacity: int, attend: torch.device, files: list[DiskFile] | None,
                 host_pool: BufferPool | None, device_pool: BufferPool | None):
        self.codec, self.capacity, self.attend = codec, capacity, attend
        self.nbytes = capacity * codec.row_bytes
        self.files, self.host_pool, self.device_pool = files, host_pool, device_pool
        pinned = attend.type == "cuda"
        self.host = None if files else [aligned_bytes(self.nbytes, pinned) for _ in range(2)]
        self._host_staged: list[torch.Tensor] = []
        self._device_staged: list[torch.Tensor] = []

    def _view(self, buf: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(as_dtype(buf, torch.uint8, (self.capacity, self.codec.row_bytes)))

    def load(self, length: int) -> list[torch.Tensor]:
        """K, V [n, Hkv, capacity, D] views on the attention device, tokens [0, length) filled."""
        used = length * self.codec.row_bytes
        host = self.host
        if self.files:
            host = self._host_staged = [self.host_pool.acquire() for _ in range(2)]
            if used:
                for file, buf in zip(self.files, host):
                    file.read_into(buf, 0, used)
        if self.attend.type == "cpu":
            return [self._view(b) for b in host]
        self._device_staged = [self.device_pool.acquire() for _ in range(2)]
        for gpu, cpu in zip(self._device_staged, host):
            gpu[:used].copy_(cpu[:used], non_blocking=True)
        return [self._view(b) for b in self._device_staged]

    def store(self, start: int, end: int) -> None:
        """Persist tokens [start, end), written into what `load` returned; free the buffers."""
        lo, hi = start * self.codec.row_bytes, end * self.codec.row_bytes
        host = self._host_staged if self.files else self.host
        for gpu, cpu in zip(self._device_staged, host):
            cpu[lo:hi].copy_(gpu[lo:hi])  # blocking: the bytes are on the host before the write
        if self.files:
            for file, buf in zip(self.files, host):
                file.write_from(buf, lo, hi)
        self._give_back()

    def _give_back(self) -> None:
        for pool, bufs in ((self.host_pool, self._host_staged), (self.device_pool, self._device_staged)):
            for buf in bufs:
                pool.release(buf)
        self._host_staged, self._device_staged = [], []

    def close(self) -> None:
        for f in self.files or []:
            f.close()


class BatchKV:
    """K and V of one (layer, GPU batch): `split` sequences per tier, in that order
    (device, host, disk). `pools` holds the staging pools by name ("disk_host",
    "disk_device", "host_device"); host and disk rows are attended on `attend` (the compute
    device, or the CPU where they live: see sizing.KVRoute); disk I/O is counted in `traffic`."""

    def __init__(self, shape: tuple[int, int, int, int], split: dict[Tier, int], dtype: torch.dtype,
                 device: torch.device, disk_path: Path, pools: dict[str, BufferPool], attend: torch.device = CPU,
                 traffic: Traffic | None = None):
        _, heads, capacity, head_dim = shape
        self.device = device
        gpu = device.type == "cuda"
        resident = split[Tier.DEVICE] + (0 if gpu else split[Tier.HOST])
        rows = lambda n, files, host_pool, device_pool: TokenRows(
            RowCodec(n, heads, head_dim, dtype, None), capacity, attend, files, host_pool, device_pool)
        self.segments: list[Resident | TokenRows] = []
        if resident:
            self.segments.append(Resident((resident, heads, capacity, head_dim), dtype, device))
        if gpu and split[Tier.HOST]:
            self.segments.append(rows(split[Tier.HOST], None, None, pools.get("host_device")))
        if split[Tier.DISK]:
            codec_bytes = RowCodec(split[Tier.DISK], heads, head_dim, dtype, None).row_bytes * capacity
            files = [DiskFile(Path(f"{disk_path}.{kv}"), codec_bytes, traffic=traffic) for kv in "kv"]
            self.segments.append(rows(split[Tier.DISK], files, pools["disk_host"], pools.get("disk_device")))

    def load(self, length: int):
        """K, V for attention, tokens [0, length) filled: one tensor each when the cache is
        one segment on the compute device, else `CacheSegments`."""
        parts = [s.load(length) for s in self.segments]
        if len(parts) == 1 and parts[0][0].device.type == self.device.type:
            return parts[0][0], parts[0][1]
        return CacheSegments([p[0] for p in parts]), CacheSegments([p[1] for p in parts])

    def store(self, start: int, end: int) -> None:
        for s in self.segments:
            s.store(start, end)

    def close(self) -> None:
        for s in self.segments:
            s.close()


def staging_pools(splits: list[dict[Tier, int]], capacity: int, row_bytes, attend: torch.device,
                  count: int) -> dict[str, BufferPool]:
    """The staging pools for GPU batches' caches split over the tiers like `splits`, `count` buffers
    each, every buffer as large as the largest segment it stages; row_bytes(n) is the bytes
    of one token of n sequences. `attend`: where token rows are attended (a GPU: host and
    disk rows are copied there through device buffers, and host staging is pinned)."""
    gpu = attend.type == "cuda"
    largest = lambda tier: max((sp[tier] for sp in splits), default=0)
    pools = {}
    if largest(Tier.DISK):
        nbytes = row_bytes(largest(Tier.DISK)) * capacity
        pools["disk_host"] = BufferPool(nbytes, count, pinned=gpu)
        if gpu:
            pools["disk_device"] = BufferPool(nbytes, count, attend)
    if gpu and largest(Tier.HOST):
        pools["host_device"] = BufferPool(row_bytes(largest(Tier.HOST)) * capacity, count, attend)
    return pools
