"""The compute device and its facts that choose defaults: which device, which dtype, the CPU."""
from __future__ import annotations

import ctypes
import functools

import torch

from .errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is visible; use --device cpu.")
    return torch.device(name)


# glibc's malloc maps each block over 128 KiB on its own (a threshold it raises as such blocks
# are freed) and gives the heap's free top back to the system past twice that, so a step's
# temporaries of a few MiB are faulted in again, page by page, at every use (a softmax and
# matmul over 3 x 768 x 407 fp32 scores: 45,173 page faults in 20 runs, 1,805 with these kept).
MALLOC_MMAP_THRESHOLD = 32 << 20  # glibc's largest
MALLOC_TRIM_THRESHOLD = 128 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse freed blocks of up to 32 MiB and keep up to 128 MiB of freed
    heap, for the whole process; False where there is no glibc (nothing changes then)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor() or platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX or AVX-512 BF16 units (bf16 matmul is then several times fp32)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
