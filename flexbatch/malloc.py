"""How the process's C heap (glibc's malloc) keeps freed memory: set once, when flexbatch is
imported, before torch or flexbatch start threads (an arena limit binds only threads that
allocate for the first time after it)."""
from __future__ import annotations

import ctypes
import functools

# glibc's malloc maps each block over 128 KiB on its own (a threshold it raises as such blocks
# are freed) and gives the heap's free top back to the system past twice that, so a step's
# temporaries of a few MiB are faulted in again, page by page, at every use (a softmax and
# matmul over 3 x 768 x 407 fp32 scores: 45,173 page faults in 20 runs, 1,805 with these kept).
MALLOC_MMAP_THRESHOLD = 32 << 20  # glibc's largest
MALLOC_TRIM_THRESHOLD = 128 << 20
# Each arena keeps up to MALLOC_TRIM_THRESHOLD freed, and glibc gives threads arenas of their
# own (up to 8 per core): the offloading runner's I/O threads, which decode and encode KV
# cache rows, then kept ~0.2 GB the memory plan does not count (OPT-1.3B, a compressed
# cache, 64 x 4 sequences: peak anonymous memory 1.58 GB, 1.39 GB with one arena). One arena
# bounds what freed memory the process keeps; its lock is rarely contended, since the hot
# loops allocate few, large blocks.
MALLOC_ARENAS = 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt's parameter numbers (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse freed blocks of up to 32 MiB and keep up to 128 MiB of freed
    heap, in one arena that threads allocating from now on share, for the whole process;
    False where there is no glibc (nothing changes then)."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)) and bool(mallopt(_M_ARENA_MAX, MALLOC_ARENAS))


@functools.cache
def _glibc(name: str):
    """The C library's function `name`, or None where the process has none (not glibc)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim; nothing elsewhere).

    Keeping freed blocks (above) lets a prompt's temporaries, of many sizes, fragment the
    heap: only its free top is trimmed, so pages freed below a live block stay the process's.
    A prefill of 256 prompts of 32 tokens (OPT-1.3B shape, fp32, weights and KV cache on
    disk) then held 1.9 GB of freed heap, its peak RSS 1.2 GB over the memory plan, and a
    2 GiB memory limit killed it; trimmed after each layer of each GPU batch, it stayed
    within the plan, for 7 ms a trim. Decode's temporaries grow by a token every step (on a
    CPU without the C attention kernel, attention's copies of each GPU batch's keys and
    values), so the blocks one step frees rarely fit the next: the same workload's decode
    (128 new tokens, 32 x 8 sequences), untrimmed, grew its heap from 241 to 366 MB in its
    first 60 steps, and one such run was killed by the 2 GiB limit with 2.08 GB of anonymous
    memory (a plan of 1.64 GB); trimmed once per layer of each step, a 16 x 16 run's heap
    stayed at 140-160 MB."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


def gives_back_freed_memory(fn):
    """`fn`, followed by `give_back_freed_memory()` however it ends: for one-off work (the
    hardware probes) whose freed temporaries would otherwise stay the process's for good,
    counted by a memory limit but by no memory plan."""
    @functools.wraps(fn)
    def trimmed(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            give_back_freed_memory()
    return trimmed
