"""Choosing a policy: hardware profile, cost model (FlexGen's), linear-program search.

Two machine models: a CPU-only machine (device and host are one RAM tier, plus disk;
cost_model.py) and a machine with a GPU (GPU memory, pinned host RAM and disk, with the
host-GPU link and optional CPU attention; gpu_cost.py). Only profiling a GPU needs CUDA;
planning for one works from its profile anywhere.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..engine.memory import MemoryBudget
from ..models.family import Family
from ..models.spec import ModelConfig
from .cost_model import Workload
from .hardware import HardwareProfile, at_current_speed, load_or_measure
from .search import Candidate, Plan, evaluate, search

PLAN_HEADROOM = 64 << 20
GPU_PLAN_SHARE = 0.9

__all__ = ["Candidate", "HardwareProfile", "Plan", "Workload", "at_current_speed", "evaluate",
           "hardware_profile", "plan_policy", "search"]


def hardware_profile(offload_dir: Path | None = None, force: bool = False, log=lambda msg: None,
                     disk_only: bool = False) -> HardwareProfile:
    from ..default_model import cache_dir

    folder = Path(offload_dir) if offload_dir else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return load_or_measure(cache_dir() / "hardware.json", folder, force=force, log=log, disk_only=disk_only)


def plan_policy(cfg: ModelConfig, family: Family, dtype: torch.dtype, device: torch.device, work: Workload,
                budget: MemoryBudget, max_block: int | None = None, offload_dir: Path | None = None,
                compression: dict | None = None, log=lambda msg: None, block_size: int | None = None) -> Plan:
    """The best policy for `work`; `compression` holds Policy's compress_* fields to plan with;
    `block_size`, if given, is the block every candidate has."""
    # The engine checks the policy again once the model is open, when the process holds a
    # little more (tokenizer, file handles): plan with that much headroom. On a GPU the
    # caching allocator also rounds and fragments: plan for GPU_PLAN_SHARE of its budget.
    gpu = device.type == "cuda"
    device_bytes = int(budget.device_bytes * GPU_PLAN_SHARE) if gpu else budget.device_bytes
    budget = MemoryBudget(device_bytes, budget.host_bytes - PLAN_HEADROOM)
    hw = at_current_speed(hardware_profile(offload_dir, log=log), dtype)
    return search(cfg, family, dtype, hw, work, budget, max_block, compression=compression, gpu=gpu,
                  block_size=block_size)
