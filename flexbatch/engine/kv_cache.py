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
        self.row_bytes = self.num_disk * self.heads * self.head_dim * torch.empty((), dtype=dtype).element_size()
        if self.num_disk:
            self.files = [DiskFile(Path(f"{disk_path}.{kv}"), self.capacity * self.row_bytes) for kv in "kv"]
        self._staged: list[torch.Tensor] = []
        self._views: list[torch.Tensor] = []

    def staging_bytes(self) -> int:
        return self.capacity * self.row_bytes

    def _disk_view(self, buf: torch.Tensor) -> torch.Tensor:
        # token-major bytes viewed as [n_disk, Hkv, capacity, D]
        rows = as_dtype(buf, self.dtype, (self.capacity, self.num_disk, self.heads, self.head_dim))
        return rows.permute(1, 2, 0, 3)

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
    their home rows. Both tiers use the same row format, so a sequence gets the same values
    wherever it lives.
    """

    def __init__(self, shape: tuple[int, int, int, int], num_memory: int, dtype: torch.dtype,
                 device: torch.device, disk_path: Path | None, pool: BufferPool | None, quant):
        self.batch, self.heads, self.capacity, self.head_dim = shape
        self.num_memory, self.num_disk = num_memory, self.batch - num_memory
        self.dtype, self.device, self.pool = dtype, device, pool
        self.memory_codec = RowCodec(num_memory, self.heads, self.head_dim, dtype, quant)
        self.disk_codec = RowCodec(self.num_disk, self.heads, self.head_dim, dtype, quant)
        self.memory = [torch.empty((self.capacity, self.memory_codec.row_bytes), dtype=torch.uint8, device=device)
                       for _ in range(2)] if num_memory else []
        self.row_bytes = self.disk_codec.row_bytes
        self.files = [DiskFile(Path(f"{disk_path}.{kv}"), self.capacity * self.row_bytes)
                      for kv in "kv"] if self.num_disk else []
        self._staged: list[torch.Tensor] = []
        self._work: list[torch.Tensor] = []

    def staging_bytes(self) -> int:
        return self.capacity * self.row_bytes

    def _disk_rows(self, buf: torch.Tensor) -> torch.Tensor:
        return as_dtype(buf, torch.uint8, (self.capacity, self.row_bytes))

    def load(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.batch, self.heads, self.capacity, self.head_dim)
        self._work = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2)]
        m = self.num_memory
        if length:
            for work, rows in zip(self._work, self.memory):
                work[:m, :, :length] = self.memory_codec.decode(rows[:length])
        if self.num_disk:
            self._staged = [self.pool.acquire(), self.pool.acquire()]
            for work, file, buf in zip(self._work, self.files, self._staged):
                if length:
                    file.read_into(buf, 0, length * self.row_bytes)
                    work[m:, :, :length] = self.disk_codec.decode(self._disk_rows(buf)[:length]).to(self.device)
        return self._work[0], self._work[1]

    def store(self, start: int, end: int) -> None:
        m = self.num_memory
        for work, rows in zip(self._work, self.memory):
            rows[start:end] = self.memory_codec.encode(work[:m, :, start:end])
        for work, file, buf in zip(self._work, self.files, self._staged):
            self._disk_rows(buf)[start:end] = self.disk_codec.encode(work[m:, :, start:end]).cpu()
            file.write_from(buf, start * self.row_bytes, end * self.row_bytes)
        for buf in self._staged:
            self.pool.release(buf)
        self._staged, self._work = [], []

    def close(self) -> None:
        for f in self.files:
            f.close()
