"""Where a KV cache segment's token rows live, and how they reach attention.

Rows are token-major ([capacity, row_bytes] per K or V, `storage.kv_rows.RowCodec`): the
first T tokens are one contiguous range (one disk read, one copy) and a step's new tokens a
short range at the end (one small write). A `RowHome` keeps them in tensors (host RAM or
the compute device) or in two disk files staged through pooled page-aligned buffers; a
`RowSegment` turns them into the [n, Hkv, capacity, D] K and V attention reads:

- plain rows are viewed as they are, where they are, or copied once into a device buffer;
- quantized rows are decoded into a dense buffer on the compute device, their last
  `window` tokens taken from a ring of exact rows kept beside them (slot = position %
  window): attention leans on recent tokens most, and keeping a short window exact removes
  most of the accuracy cost of a 4-bit cache (the residual of KIVI, Liu et al. 2024).

Every buffer a load takes comes from a pool the block's caches share (`Staging` names what
for) and goes back when the store after it is done: nothing large is allocated per step.
"""
from __future__ import annotations

import enum
import queue

import torch

from ..storage.aligned import aligned_bytes, as_dtype
from ..storage.disk import DiskFile
from ..storage.kv_rows import RowCodec

CPU = torch.device("cpu")


class Staging(enum.Enum):
    """What a pooled buffer holds while a segment is loaded."""

    READ = "disk rows read into host RAM"
    TO_DEVICE = "plain rows copied to the compute device for attention"
    DENSE = "quantized rows decoded for attention"
    RING = "a disk segment's exact window rows read into host RAM"


class BufferPool:
    """A fixed set of equal byte buffers (page-aligned on the host, pinned when a GPU copies
    from them); `acquire` blocks until one is free."""

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


class RowHome:
    """`rows` token rows of K and of V, `row_bytes` each: in two tensors on `device`, or in two
    disk files (`files`) read into buffers from `pool` by `stage` and written back from them
    by `persist`."""

    def __init__(self, rows: int, row_bytes: int, device: torch.device, files: list[DiskFile] | None = None,
                 pool: BufferPool | None = None, pinned: bool = False):
        self.rows, self.row_bytes, self.files, self.pool = rows, row_bytes, files, pool
        nbytes = rows * row_bytes
        allocate = (lambda: aligned_bytes(nbytes, pinned)) if device.type == "cpu" else \
            (lambda: torch.empty(nbytes, dtype=torch.uint8, device=device))
        self._bufs = [] if files else [allocate() for _ in range(2)]

    def stage(self, first: int, last: int) -> list[torch.Tensor]:
        """K and V rows [rows, row_bytes], rows [first, last) as last persisted."""
        if self.files:
            self._bufs = [self.pool.acquire() for _ in range(2)]
            if last > first:
                for file, buf in zip(self.files, self._bufs):
                    file.read_into(buf, first * self.row_bytes, last * self.row_bytes)
        return [self.view(buf) for buf in self._bufs]

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        return as_dtype(buf, torch.uint8, (self.rows, self.row_bytes))

    def persist(self, first: int, last: int) -> None:
        """Write rows [first, last) of what `stage` returned to the files (the whole prefix
        was staged, so the block-aligned write writes back only valid bytes)."""
        if self.files and last > first:
            for file, buf in zip(self.files, self._bufs):
                file.write_from(buf, first * self.row_bytes, last * self.row_bytes)

    def release(self) -> None:
        if self.files:
            for buf in self._bufs:
                self.pool.release(buf)
            self._bufs = []

    def close(self) -> None:
        for f in self.files or []:
            f.close()


class RowSegment:
    """K and V of `codec.sequences` sequences as token rows in `home`, attended on `attend`.

    `load(length)` gives [n, Hkv, capacity, D] K and V with tokens [0, length) filled, on
    `attend`; the step writes its new tokens into them and `store(start, end)` keeps tokens
    [start, end) in the rows. Quantized rows need `dense` (pool of decode buffers on
    `attend`) and, with a window, `ring` (the exact rows); plain rows attended off their home
    need `to_attend` (pool of buffers on `attend`).
    """

    def __init__(self, codec: RowCodec, home: RowHome, attend: torch.device, to_attend: BufferPool | None = None,
                 ring: RowHome | None = None):
        self.codec, self.home, self.attend, self.to_attend, self.ring = codec, home, attend, to_attend, ring
        self.exact = RowCodec(codec.sequences, codec.heads, codec.head_dim, codec.dtype, None)
        self.window = ring.rows if ring else 0
        self._rows: list[torch.Tensor] = []
        self._ring: list[torch.Tensor] = []
        self._attended: list[torch.Tensor] = []  # buffers from `to_attend`

    def load(self, length: int) -> list[torch.Tensor]:
        self._rows = self.home.stage(0, length)
        if self.ring:
            self._ring = self.ring.stage(0, self.window)  # whole, as store writes back whole blocks of it
        if self.codec.quant is not None:
            return [t.permute(1, 2, 0, 3) for t in self._decode(length)]
        if self.to_attend is None:
            return [self.codec.decode(rows) for rows in self._rows]
        used = length * self.codec.row_bytes
        self._attended = [self.to_attend.acquire() for _ in range(2)]
        for there, rows in zip(self._attended, self._rows):
            there[:used].copy_(rows.view(-1)[:used], non_blocking=True)
        return [self.codec.decode(self.home.view(buf)) for buf in self._attended]

    def _decode(self, length: int) -> list[torch.Tensor]:
        """Dense token-major [capacity, n, Hkv, D] K and V: quantized rows up to the window,
        the window from the ring."""
        self._attended = [self.to_attend.acquire() for _ in range(2)]
        work = self._token_major()
        exact_from = max(0, length - self.window)
        for kv in range(2):
            if exact_from:
                self.codec.decode_rows_into(self._rows[kv][:exact_from], work[kv][:exact_from])
            for slots, positions in self._window_runs(exact_from, length):
                self.exact.decode_rows_into(self._ring[kv][slots], work[kv][positions])
        return work

    def _window_runs(self, start: int, end: int) -> list[tuple[slice, slice]]:
        """(ring slots, positions) of positions [start, end) in the window: one or two
        contiguous pairs, copied as such (no gathered temporary), none for an empty range."""
        runs, at = [], start
        for first, last in ring_runs(start, end, self.window) if end > start else []:
            runs.append((slice(first, last), slice(at, at + last - first)))
            at += last - first
        return runs

    def _token_major(self) -> list[torch.Tensor]:
        c = self.codec
        return [as_dtype(buf, c.dtype, (self.home.rows, c.sequences, c.heads, c.head_dim)) for buf in self._attended]

    def store(self, start: int, end: int) -> None:
        if self.codec.quant is not None:
            self._encode(start, end)
        else:
            lo, hi = start * self.codec.row_bytes, end * self.codec.row_bytes
            for there, rows in zip(self._attended, self._rows):
                rows.view(-1)[lo:hi].copy_(there[lo:hi])  # blocking: on the host before the write
        self.home.persist(start, end)
        if self._attended and self._attended[0].is_cuda:
            # what was just issued reads the attention buffers: finish it before they are reused
            torch.cuda.current_stream(self._attended[0].device).synchronize()
        for buf in self._attended:
            self.to_attend.release(buf)
        self._attended = []
        self.home.release()
        if self.ring:
            self.ring.release()

    def _encode(self, start: int, end: int) -> None:
        """Quantize tokens [start, end) into the rows, and their exact copy into the ring."""
        work = self._token_major()
        recent = self._window_runs(max(start, end - self.window), end)
        for kv in range(2):
            self.codec.encode_rows_into(work[kv][start:end], self._rows[kv][start:end])
            for slots, positions in recent:
                self.exact.encode_rows_into(work[kv][positions], self._ring[kv][slots])
        for slots, _ in recent:
            self.ring.persist(slots.start, slots.stop)

    def close(self) -> None:
        self.home.close()
        if self.ring:
            self.ring.close()


def ring_runs(start: int, end: int, window: int) -> list[tuple[int, int]]:
    """The ring slots of positions [start, end) (at most `window` of them) as contiguous
    ranges: one, or two where they wrap. A decode step writes back one slot, not the ring."""
    first, count = start % window, end - start
    if first + count <= window:
        return [(first, first + count)]
    return [(first, window), (0, first + count - window)]
