"""A compressed KV cache: K and V of one (layer, GPU batch) kept as quantized rows.

Resident sequences keep their rows in tensors (on a GPU: the device share there, the host
share in host RAM); disk-resident ones in token-major files staged through pooled
page-aligned buffers, like the plain cache (kv_cache.py). Rows are decoded where they live
and the dense result is moved to the compute device.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..kernels.packed import element_size
from ..storage.aligned import as_dtype
from ..storage.disk import DiskFile, Traffic
from ..storage.kv_rows import RowCodec
from ..storage.tiers import Tier
from .kv_cache import CPU, BufferPool


class EncodedBatchKV:
    """K and V of `batch` sequences kept as quantized token rows (`RowCodec`), split over
    the tiers as `split` says (in order: device, host, disk).

    `load` decodes the first `length` tokens into dense working tensors that attention reads
    and this step's new tokens are written into; `store` quantizes those new tokens back into
    their home rows. The last `window` tokens of each sequence are also kept unquantized in a
    ring of rows (slot = position % window) on the same tier, and `load` takes them from
    there: attention leans on recent tokens most, and keeping a short window exact removes
    most of the accuracy cost of a 4-bit cache (the residual of KIVI, Liu et al. 2024).

    The working tensors are token-major [capacity, batch, Hkv, D], viewed as [batch, Hkv,
    capacity, D], so a token's rows decode straight into one contiguous range. They and the
    disk group's staging buffers come from pools the block's caches share (`encoded_pools`,
    the plain cache's `staging_pools`), taken by `load` and given back by `store`: nothing
    large is allocated per step.
    """

    def __init__(self, shape: tuple[int, int, int, int], split: dict[Tier, int], dtype: torch.dtype,
                 device: torch.device, disk_path: Path | None, pools: dict[str, BufferPool], quant,
                 window: int = 0, traffic: Traffic | None = None):
        self.batch, self.heads, self.capacity, self.head_dim = shape
        self.num_disk = split[Tier.DISK]
        self.dtype, self.device, self.pools = dtype, device, pools
        self.window = min(window, self.capacity)
        codec = lambda n, q: RowCodec(n, self.heads, self.head_dim, dtype, q)
        homes = [(split[Tier.DEVICE], device), (split[Tier.HOST], CPU)] if device.type == "cuda" else \
            [(split[Tier.DEVICE] + split[Tier.HOST], device)]  # a CPU's device and host are one RAM
        groups = lambda q: [(codec(n, q), home) for n, home in homes]
        self.quantized = _TierRows(groups(quant), codec(self.num_disk, quant), self.capacity, disk_path, "q", traffic)
        self.recent = _TierRows(groups(None), codec(self.num_disk, None), self.window, disk_path, "w", traffic)
        self._staged: list[torch.Tensor] = []
        self._ring: list[torch.Tensor] = []
        self._work: list[torch.Tensor] = []

    def load(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._work = [self._take("dense") for _ in range(2)]
        if self.num_disk:
            self._staged = [self._take("disk_host") for _ in range(2)]
            self._ring = [self._take("ring") for _ in range(2)] if self.window else []
        exact_from = max(0, length - self.window)  # tokens [exact_from, length) come from the ring
        slots = torch.arange(exact_from, length) % max(self.window, 1)
        for kv, work in enumerate(self._token_major()):
            # the whole prefix is read, so the block-aligned write in `store` writes back only valid bytes
            self.quantized.read(kv, self._staged, 0, length)
            self.quantized.decode_into(work, kv, self._staged, slice(0, exact_from))
            if length > exact_from:
                self.recent.read(kv, self._ring, 0, self.window)
                self.recent.decode_into(work, kv, self._ring, slots, exact_from)
        k, v = (work.permute(1, 2, 0, 3) for work in self._token_major())
        return k, v

    def store(self, start: int, end: int) -> None:
        recent_from = max(start, end - self.window)
        slots = torch.arange(recent_from, end) % max(self.window, 1)
        for kv, work in enumerate(self._token_major()):
            self.quantized.encode_from(work, kv, self._staged, slice(start, end), start)
            self.quantized.write(kv, self._staged, start, end)
            if end > recent_from:
                self.recent.encode_from(work, kv, self._ring, slots, recent_from)
                for first, last in _ring_runs(recent_from, end, self.window):
                    self.recent.write(kv, self._ring, first, last)
        if self._work and self._work[0].is_cuda:
            # the encodes just issued read the work tensors: finish them before they are reused
            torch.cuda.current_stream(self.device).synchronize()
        for name, bufs in (("dense", self._work), ("disk_host", self._staged), ("ring", self._ring)):
            for buf in bufs:
                self.pools[name].release(buf)
        self._staged, self._ring, self._work = [], [], []

    def _take(self, name: str) -> torch.Tensor:
        return self.pools[name].acquire()

    def _token_major(self) -> list[torch.Tensor]:
        shape = (self.capacity, self.batch, self.heads, self.head_dim)
        return [as_dtype(buf, self.dtype, shape) for buf in self._work]

    def close(self) -> None:
        self.quantized.close()
        self.recent.close()


def encoded_pools(shapes: list[tuple[int, int, int, int]], splits: list[dict[Tier, int]], window: int,
                  dtype: torch.dtype, device: torch.device, count: int) -> dict[str, BufferPool]:
    """The pools compressed caches of GPU batches shaped `shapes` [n, Hkv, capacity, D] and
    split like `splits` share beside the staging pools: "dense" (a decoded K or V of the
    largest GPU batch, on the compute device) and, with a disk group and a window, "ring"
    (host buffers for its unquantized window rows); `count` buffers each."""
    dense = max(math.prod(shape) for shape in shapes) * element_size(dtype)
    pools = {"dense": BufferPool(dense, count, device)}
    ring_rows = max((split[Tier.DISK] * shape[1] * shape[3] for shape, split in zip(shapes, splits)), default=0)
    window = min(window, max(shape[2] for shape in shapes))
    if ring_rows and window:
        pools["ring"] = BufferPool(window * ring_rows * element_size(dtype), count)
    return pools


class _TierRows:
    """`rows` token rows of K and of V in one encoding, for consecutive groups of sequences:
    each resident group (`resident`: its codec and device, the GPU or host RAM) keeps its
    rows in tensors; the disk group's rows are in files read into and written from buffers."""

    def __init__(self, resident: list[tuple[RowCodec, torch.device]], disk_codec: RowCodec, rows: int,
                 disk_path: Path | None, tag: str, traffic: Traffic | None = None):
        self.resident = [(codec, [torch.empty((rows, codec.row_bytes), dtype=torch.uint8, device=device)
                                  for _ in range(2)]) for codec, device in resident if codec.sequences and rows]
        self.disk_codec = disk_codec
        self.disk_bytes = rows * disk_codec.row_bytes
        has_disk = disk_codec.sequences > 0 and rows
        self.files = [DiskFile(Path(f"{disk_path}.{tag}{kv}"), self.disk_bytes, traffic=traffic)
                      for kv in "kv"] if has_disk else []
        self.rows = rows

    def _disk_rows(self, buf: torch.Tensor) -> torch.Tensor:
        return as_dtype(buf, torch.uint8, (self.rows, self.disk_codec.row_bytes))

    def read(self, kv: int, bufs: list[torch.Tensor], first: int, last: int) -> None:
        if self.files and last > first:
            self.files[kv].read_into(bufs[kv], first * self.disk_codec.row_bytes, last * self.disk_codec.row_bytes)

    def write(self, kv: int, bufs: list[torch.Tensor], first: int, last: int) -> None:
        if self.files and last > first:
            self.files[kv].write_from(bufs[kv], first * self.disk_codec.row_bytes, last * self.disk_codec.row_bytes)

    def decode_into(self, work: torch.Tensor, kv: int, bufs, index: slice | torch.Tensor, at: int = 0) -> None:
        """work[at:at+count] = decoded rows `index` (work token-major [capacity, batch, Hkv,
        D], sequences in group order); a slice reads rows in place, a tensor of ring slots
        gathers them."""
        count = _count(index)
        if not count:
            return
        span, first = slice(at, at + count), 0
        for codec, tensors in self.resident:
            codec.decode_rows_into(tensors[kv][index], work[span, first:first + codec.sequences])
            first += codec.sequences
        if self.files:
            self.disk_codec.decode_rows_into(self._disk_rows(bufs[kv])[index], work[span, first:])

    def encode_from(self, work: torch.Tensor, kv: int, bufs, index: slice | torch.Tensor, at: int) -> None:
        """Rows `index` = encoded work[at:at+count] (token-major, as in `decode_into`)."""
        span, first = slice(at, at + _count(index)), 0
        for codec, tensors in self.resident:
            tensors[kv][index] = codec.encode_rows(work[span, first:first + codec.sequences]).to(tensors[kv].device)
            first += codec.sequences
        if self.files:
            self._disk_rows(bufs[kv])[index] = self.disk_codec.encode_rows(work[span, first:]).cpu()

    def close(self) -> None:
        for f in self.files:
            f.close()


def _ring_runs(start: int, end: int, window: int) -> list[tuple[int, int]]:
    """The ring slots of positions [start, end) (at most `window` of them) as contiguous
    ranges: one, or two where they wrap. A decode step writes back one slot, not the ring."""
    first, count = start % window, end - start
    if first + count <= window:
        return [(first, first + count)]
    return [(first, window), (0, first + count - window)]


def _count(index: slice | torch.Tensor) -> int:
    return index.stop - index.start if isinstance(index, slice) else len(index)
