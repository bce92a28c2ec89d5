"""The KV cache of one (layer, GPU batch), split by sequence between memory and disk.

Compute always sees K and V as [gbs, Hkv, capacity, D] tensors. Memory-resident sequences
keep that layout permanently. Disk-resident sequences live in token-major files
[capacity, n_disk, Hkv, D], so the first T tokens are one contiguous byte range (one read)
and a step's new tokens are a short range at the end (one small write). They are staged
through page-aligned buffers taken from a pool only while the block is in flight.
"""
from __future__ import annotations

import queue
from pathlib import Path

import torch

from ..storage.aligned import aligned_bytes, as_dtype
from ..storage.disk import DiskFile
from ..storage.kv_rows import RowCodec


class BufferPool:
    """A fixed set of equal, page-aligned buffers; `acquire` blocks until one is free."""

    def __init__(self, nbytes: int, count: int):
        self.nbytes = nbytes
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(aligned_bytes(nbytes))

    def acquire(self) -> torch.Tensor:
        return self._free.get()

    def release(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


class KVBlock:
    """K and V of `batch` sequences of one layer: the first `num_memory` in memory, the
    rest on disk."""

    def __init__(self, shape: tuple[int, int, int, int], num_memory: int, dtype: torch.dtype,
                 device: torch.device, disk_path: Path | None, pool: BufferPool | None):
        self.batch, self.heads, self.capacity, self.head_dim = shape
        self.num_memory, self.num_disk = num_memory, self.batch - num_memory
        self.dtype, self.device, self.pool = dtype, device, pool
        mem_shape = (num_memory, self.heads, self.capacity, self.head_dim)
        self.memory = [torch.empty(mem_shape, dtype=dtype, device=device) for _ in range(2)]
        self.files: list[DiskFile] = []
        self.codec = RowCodec(self.num_disk, self.heads, self.head_dim, dtype, None)
        self.row_bytes = self.codec.row_bytes
        if self.num_disk:
            self.files = [DiskFile(Path(f"{disk_path}.{kv}"), self.capacity * self.row_bytes) for kv in "kv"]
        self._staged: list[torch.Tensor] = []
        self._views: list[torch.Tensor] = []

    def staging_bytes(self) -> int:
        return self.capacity * self.row_bytes

    def _disk_view(self, buf: torch.Tensor) -> torch.Tensor:
        # token-major bytes viewed (not copied) as [n_disk, Hkv, capacity, D]
        return self.codec.decode(as_dtype(buf, torch.uint8, (self.capacity, self.row_bytes)))

    def load(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [gbs, Hkv, capacity, D] with tokens [0, length) filled."""
        if not self.num_disk:
            return self.memory[0], self.memory[1]
        self._staged = [self.pool.acquire(), self.pool.acquire()]
        if length:
            for file, buf in zip(self.files, self._staged):
                file.read_into(buf, 0, length * self.row_bytes)
        disk_views = [self._disk_view(b) for b in self._staged]
        if not self.num_memory:
            self._views = disk_views
        else:
            self._views = [torch.cat([m, d], dim=0) for m, d in zip(self.memory, disk_views)]
        return self._views[0], self._views[1]

    def store(self, start: int, end: int) -> None:
        """Persist tokens [start, end) written into the tensors `load` returned; release buffers."""
        if not self.num_disk:
            return
        if self.num_memory:
            for mem, disk, view in zip(self.memory, (self._disk_view(b) for b in self._staged), self._views):
                mem[:, :, start:end] = view[:self.num_memory, :, start:end]
                disk[:, :, start:end] = view[self.num_memory:, :, start:end]
        for file, buf in zip(self.files, self._staged):
            file.write_from(buf, start * self.row_bytes, end * self.row_bytes)
        for buf in self._staged:
            self.pool.release(buf)
        self._staged, self._views = [], []

    def close(self) -> None:
        for f in self.files:
            f.close()


class EncodedKVBlock:
    """K and V of `batch` sequences kept as quantized token rows (`RowCodec`): the first
    `num_memory` sequences in memory, the rest on disk.

    `load` decodes the first `length` tokens into dense working tensors that attention reads
    and this step's new tokens are written into; `store` quantizes those new tokens back into
    their home rows. The last `window` tokens of each sequence are also kept unquantized in a
    ring of rows (slot = position % window) on the same tier, and `load` takes them from
    there: attention leans on recent tokens most, and keeping a short window exact removes
    most of the accuracy cost of a 4-bit cache (the residual of KIVI, Liu et al. 2024).
    """

    def __init__(self, shape: tuple[int, int, int, int], num_memory: int, dtype: torch.dtype,
                 device: torch.device, disk_path: Path | None, pool: BufferPool | None, quant,
                 window: int = 0):
        self.batch, self.heads, self.capacity, self.head_dim = shape
        self.num_memory, self.num_disk = num_memory, self.batch - num_memory
        self.dtype, self.device, self.pool = dtype, device, pool
        self.window = min(window, self.capacity)
        m, d = num_memory, self.num_disk
        codec = lambda n, q: RowCodec(n, self.heads, self.head_dim, dtype, q)
        self.quantized = _TierRows(codec(m, quant), codec(d, quant), self.capacity, device, disk_path, "q")
        self.recent = _TierRows(codec(m, None), codec(d, None), self.window, device, disk_path, "w")
        self.row_bytes = self.quantized.disk_codec.row_bytes
        self._staged: list[torch.Tensor] = []
        self._ring: list[torch.Tensor] = []
        self._work: list[torch.Tensor] = []

    def staging_bytes(self) -> int:
        return self.capacity * self.row_bytes

    def load(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.batch, self.heads, self.capacity, self.head_dim)
        self._work = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2)]
        if self.num_disk:
            self._staged = [self.pool.acquire(), self.pool.acquire()]
            self._ring = [aligned_bytes(self.recent.disk_bytes) for _ in range(2)] if self.window else []
        exact_from = max(0, length - self.window)  # tokens [exact_from, length) come from the ring
        slots = torch.arange(exact_from, length) % max(self.window, 1)
        for kv, work in enumerate(self._work):
            # the whole prefix is read, so the block-aligned write in `store` writes back only valid bytes
            self.quantized.read(kv, self._staged, 0, length)
            self.quantized.decode_into(work, kv, self._staged, slice(0, exact_from), self.num_memory)
            if length > exact_from:
                self.recent.read(kv, self._ring, 0, self.window)
                self.recent.decode_into(work, kv, self._ring, slots, self.num_memory, exact_from)
        return self._work[0], self._work[1]

    def store(self, start: int, end: int) -> None:
        recent_from = max(start, end - self.window)
        slots = torch.arange(recent_from, end) % max(self.window, 1)
        for kv, work in enumerate(self._work):
            self.quantized.encode_from(work, kv, self._staged, slice(start, end), start, self.num_memory)
            self.quantized.write(kv, self._staged, start, end)
            if end > recent_from:
                self.recent.encode_from(work, kv, self._ring, slots, recent_from, self.num_memory)
                self.recent.write(kv, self._ring, 0, self.window)
        for buf in self._staged:
            self.pool.release(buf)
        self._staged, self._ring, self._work = [], [], []

    def close(self) -> None:
        self.quantized.close()
        self.recent.close()


class _TierRows:
    """`rows` token rows of K and of V in one encoding: memory-resident sequences' rows in
    tensors, disk-resident sequences' rows in files read into and written from buffers."""

    def __init__(self, memory_codec: RowCodec, disk_codec: RowCodec, rows: int, device: torch.device,
                 disk_path: Path | None, tag: str):
        self.memory_codec, self.disk_codec = memory_codec, disk_codec
        has_memory, has_disk = memory_codec.sequences > 0 and rows, disk_codec.sequences > 0 and rows
        self.memory = [torch.empty((rows, memory_codec.row_bytes), dtype=torch.uint8, device=device)
                       for _ in range(2)] if has_memory else []
        self.disk_bytes = rows * disk_codec.row_bytes
        self.files = [DiskFile(Path(f"{disk_path}.{tag}{kv}"), self.disk_bytes) for kv in "kv"] if has_disk else []
        self.rows = rows

    def _disk_rows(self, buf: torch.Tensor) -> torch.Tensor:
        return as_dtype(buf, torch.uint8, (self.rows, self.disk_codec.row_bytes))

    def read(self, kv: int, bufs: list[torch.Tensor], first: int, last: int) -> None:
        if self.files and last > first:
            self.files[kv].read_into(bufs[kv], first * self.disk_codec.row_bytes, last * self.disk_codec.row_bytes)

    def write(self, kv: int, bufs: list[torch.Tensor], first: int, last: int) -> None:
        if self.files and last > first:
            self.files[kv].write_from(bufs[kv], first * self.disk_codec.row_bytes, last * self.disk_codec.row_bytes)

    def decode_into(self, work: torch.Tensor, kv: int, bufs, index: slice | torch.Tensor, m: int,
                    at: int = 0) -> None:
        """work[:, :, at:at+count] = decoded rows `index` (memory sequences first); a slice
        reads rows in place, a tensor of ring slots gathers them."""
        count = _count(index)
        if not count:
            return
        span = slice(at, at + count)
        if self.memory:
            work[:m, :, span] = self.memory_codec.decode(self.memory[kv][index])
        if self.files:
            rows = self._disk_rows(bufs[kv])[index]
            work[m:, :, span] = self.disk_codec.decode(rows).to(work.device)

    def encode_from(self, work: torch.Tensor, kv: int, bufs, index: slice | torch.Tensor, at: int, m: int) -> None:
        """Rows `index` = encoded work[:, :, at:at+count]."""
        span = slice(at, at + _count(index))
        if self.memory:
            self.memory[kv][index] = self.memory_codec.encode(work[:m, :, span])
        if self.files:
            self._disk_rows(bufs[kv])[index] = self.disk_codec.encode(work[m:, :, span]).cpu()

    def close(self) -> None:
        for f in self.files:
            f.close()


def _count(index: slice | torch.Tensor) -> int:
    return index.stop - index.start if isinstance(index, slice) else len(index)
