"""Files on the disk tier, read and written with O_DIRECT so the page cache holds nothing
we did not account for. Where the filesystem refuses O_DIRECT (tmpfs, some network mounts)
we fall back to buffered I/O, drop the pages we touched, and say so once."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from .aligned import align_down, align_up

_warned_fallback = False


def _open(path: Path, flags: int) -> tuple[int, bool]:
    global _warned_fallback
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this filesystem refuses O_DIRECT; anything else is real
                raise
    if not _warned_fallback:
        warnings.warn(f"O_DIRECT is not available for {path.parent}; using buffered I/O "
                      "(the OS page cache may hold offloaded data).", RuntimeWarning, stacklevel=3)
        _warned_fallback = True
    return os.open(path, flags), False


class BusyClock:
    """Seconds during which at least one disk request was in flight (the union of their
    spans, however many threads issue them): bytes moved over these seconds is the rate the
    disk gave the run while it was reading or writing, whatever a probe before said (a
    shared disk's rate drifts by 2x within minutes)."""

    def __init__(self):
        self.seconds = 0.0
        self._in_flight, self._since = 0, 0.0
        self._lock = threading.Lock()

    def __enter__(self):
        with self._lock:
            if not self._in_flight:
                self._since = time.perf_counter()
            self._in_flight += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._in_flight -= 1
            if not self._in_flight:
                self.seconds += time.perf_counter() - self._since

    def reset(self) -> None:
        with self._lock:
            self.seconds, self._since = 0.0, time.perf_counter()


class DiskUse(NamedTuple):
    """Bytes read and written on a disk, and the seconds it was busy with them (`BusyClock`)."""

    moved: int
    busy_seconds: float

    def since(self, earlier: DiskUse) -> DiskUse:
        return DiskUse(self.moved - earlier.moved, self.busy_seconds - earlier.busy_seconds)

    @property
    def rate(self) -> float:
        """Bytes per second while busy: the rate the disk gave (0 if it moved nothing)."""
        return self.moved / self.busy_seconds if self.busy_seconds else 0.0


class Traffic:
    """Bytes moved to and from disk files, as the I/O threads move them (whole aligned
    blocks), and the seconds the disk was busy with them (`clock`, which several Traffics
    of one disk share): what benchmarks divide to report the bandwidth a run achieved."""

    def __init__(self, clock: BusyClock | None = None):
        self.read = self.written = 0
        self.clock = clock or BusyClock()
        self._lock = threading.Lock()

    def add(self, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.read += read
            self.written += written

    def reset(self) -> None:
        with self._lock:
            self.read = self.written = 0
        self.clock.reset()


class DiskFile:
    """One file of fixed size. Offsets and lengths given to it need not be aligned; it reads
    and writes whole aligned blocks through the caller's page-aligned buffer, and counts
    them in `traffic` if given."""

    def __init__(self, path: Path, size: int, create: bool = True, readonly: bool = False,
                 traffic: Traffic | None = None):
        self.path = Path(path)
        self.size = size
        self.traffic = traffic
        self.fd = -1  # until open: a failed open leaves nothing to close
        flags = os.O_RDONLY if readonly else os.O_RDWR | (os.O_CREAT if create else 0)
        self.fd, self.direct = _open(self.path, flags)
        if create and not readonly and os.fstat(self.fd).st_size < align_up(size):
            os.ftruncate(self.fd, align_up(size))  # whole blocks, so aligned reads never run short

    def read_into(self, buf: torch.Tensor, start: int, end: int) -> None:
        """Fill buf[a:b] with file bytes [a, b), where [a, b) is [start, end) widened to blocks."""
        lo, hi = align_down(start), min(align_up(end), buf.numel())
        view = memoryview(buf.numpy())[lo:hi]
        with self._clock():
            got = os.preadv(self.fd, [view], lo)
        if got < min(end, self.size) - lo:
            raise OSError(f"short read from {self.path}: {got} bytes at offset {lo}, wanted {end - lo}")
        self._drop_cache(lo, hi)
        if self.traffic:
            self.traffic.add(read=got)

    def write_from(self, buf: torch.Tensor, start: int, end: int) -> None:
        """Write buf[a:b] to file bytes [a, b) ([start, end) widened to blocks). The caller
        guarantees buf holds correct bytes for the whole widened range."""
        lo, hi = align_down(start), min(align_up(end), buf.numel())
        view = memoryview(buf.numpy())[lo:hi]
        with self._clock():
            written = os.pwritev(self.fd, [view], lo)
        if written != hi - lo:
            raise OSError(f"short write to {self.path}: {written} of {hi - lo} bytes")
        self._drop_cache(lo, hi)
        if self.traffic:
            self.traffic.add(written=written)

    def _clock(self):
        return self.traffic.clock if self.traffic else contextlib.nullcontext()

    def _drop_cache(self, lo: int, hi: int) -> None:
        if not self.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()


def require_free_space(folder: Path, nbytes: int, what: str) -> None:
    """Refuse, before writing, to put `nbytes` of `what` in a folder whose disk lacks room."""
    from ..errors import ConfigError

    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise ConfigError(
            f"{what} needs {nbytes / 2**30:.2f} GiB in {folder}, but its disk has {free / 2**30:.2f} GiB free. "
            "Free space there, pass --offload-dir on a disk with room, or keep more in memory.")


def write_durably(path: Path, chunks, replace: bool = False) -> int:
    """Write `chunks` (bytes) to `path`, fsynced, its folder entry too; returns the bytes
    written. A new file by default (refused if it exists); with `replace`, through a
    temporary file renamed over `path`, so a reader sees the old file or the new one whole."""
    target = path.with_name(path.name + ".tmp") if replace else path
    size = 0
    with open(target, "wb" if replace else "xb") as f:
        for chunk in chunks:
            f.write(chunk)
            size += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    if replace:
        os.replace(target, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return size
