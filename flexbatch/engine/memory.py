"""What this machine has: the memory budget a run may use, detected before anything loads."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..sizing import GiB, MemoryBudget


def available_host_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def process_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def available_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_host_bytes()


def detect_budget(device: torch.device, device_bytes: int | None = None,
                  host_bytes: int | None = None) -> MemoryBudget:
    """The budget of a run: the given bytes, else what is free. A given host budget is for the
    whole process, so what the process already holds (Python, torch, the tokenizer) is taken
    off it."""
    if host_bytes is not None:
        host = host_bytes - process_rss_bytes()
        if host <= 0:
            raise ConfigError(
                f"the host memory budget of {host_bytes / GiB:.2f} GiB is already used by the running "
                f"process ({process_rss_bytes() / GiB:.2f} GiB before loading the model); raise it.")
    else:
        host = available_host_bytes()
    dev = device_bytes if device_bytes is not None else available_device_bytes(device)
    return MemoryBudget(dev, host)
