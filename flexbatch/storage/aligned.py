"""Page-aligned host buffers, which O_DIRECT reads and writes require."""
from __future__ import annotations

import mmap

import torch

ALIGN = 4096
HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64 and most arm64 kernels


def align_up(n: int, alignment: int = ALIGN) -> int:
    return (n + alignment - 1) // alignment * alignment


def align_down(n: int, alignment: int = ALIGN) -> int:
    return n // alignment * alignment


def aligned_bytes(nbytes: int, pinned: bool = False) -> torch.Tensor:
    """A uint8 tensor of at least `nbytes` (rounded up to a page), page-aligned.

    Backed by an anonymous mmap, which is aligned by construction; the tensor keeps the
    mapping alive. From HUGE_PAGE up it starts on a huge page boundary and asks the kernel for
    huge pages (MADV_HUGEPAGE): a disk request into 4 KiB pages scattered in physical memory
    becomes hundreds of segments: a 2-core EPYC VM's disk read 4 MiB requests into such
    buffers at 0.6 GB/s, into huge pages at 3.0 GB/s (`benchmarks/disk_buffers_bench.py`).
    `pinned` (with CUDA present): page-locked memory instead, so copies to
    and from the GPU run asynchronously at full speed; it is cut at a page boundary out of a
    slightly larger pinned allocation. Allocate these once and reuse them: fresh host
    memory is slow to touch.
    """
    size = max(align_up(nbytes), ALIGN)
    if pinned and torch.cuda.is_available():
        raw = torch.empty(size + ALIGN, dtype=torch.uint8, pin_memory=True)
        skip = -raw.data_ptr() % ALIGN
        return raw[skip:skip + size]
    huge = size >= HUGE_PAGE
    # private, not shared: Python's default mapping is shmem, which the kernel backs with
    # huge pages only where shmem_enabled allows (rarely); private memory follows MADV_HUGEPAGE
    buffer = mmap.mmap(-1, size + (HUGE_PAGE if huge else 0), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    tensor = torch.frombuffer(buffer, dtype=torch.uint8)
    skip = -tensor.data_ptr() % HUGE_PAGE if huge else 0
    tensor = tensor[skip:skip + size]
    tensor._flexbatch_mmap = buffer  # keep the mapping referenced as long as the tensor
    return tensor


def as_dtype(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
    """View `prod(shape)` elements of `dtype` in a uint8 buffer starting at byte `offset`."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return buf[offset:offset + nbytes].view(dtype).view(shape)
