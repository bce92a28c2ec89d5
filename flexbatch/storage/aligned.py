"""Page-aligned host buffers, which O_DIRECT reads and writes require."""
from __future__ import annotations

import mmap

import torch

ALIGN = 4096


def align_up(n: int, alignment: int = ALIGN) -> int:
    return (n + alignment - 1) // alignment * alignment


def align_down(n: int, alignment: int = ALIGN) -> int:
    return n // alignment * alignment


def aligned_bytes(nbytes: int, pinned: bool = False) -> torch.Tensor:
    """A uint8 tensor of at least `nbytes` (rounded up to a page), page-aligned.

    Backed by an anonymous mmap, which is aligned by construction; the tensor keeps the
    mapping alive. `pinned` (with CUDA present): page-locked memory instead, so copies to
    and from the GPU run asynchronously at full speed; it is cut at a page boundary out of a
    slightly larger pinned allocation. Allocate these once and reuse them: fresh host
    memory is slow to touch.
    """
    size = max(align_up(nbytes), ALIGN)
    if pinned and torch.cuda.is_available():
        raw = torch.empty(size + ALIGN, dtype=torch.uint8, pin_memory=True)
        skip = -raw.data_ptr() % ALIGN
        return raw[skip:skip + size]
    buffer = mmap.mmap(-1, size)
    tensor = torch.frombuffer(buffer, dtype=torch.uint8)
    tensor._flexbatch_mmap = buffer  # keep the mapping referenced as long as the tensor
    return tensor


def as_dtype(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
    """View `prod(shape)` elements of `dtype` in a uint8 buffer starting at byte `offset`."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return buf[offset:offset + nbytes].view(dtype).view(shape)
