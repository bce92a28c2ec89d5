"""The three tiers of memory a tensor can live on."""
from __future__ import annotations

import enum


class Tier(enum.Enum):
    DEVICE = "device"  # the compute device's memory (GPU; on a CPU-only machine, RAM)
    HOST = "host"      # host RAM (the same memory as DEVICE on a CPU-only machine)
    DISK = "disk"      # files in the offload folder, read with O_DIRECT
