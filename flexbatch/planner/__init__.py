"""Choosing a policy: cost models (FlexGen's) over a hardware profile, and a linear-program
search. Pure arithmetic: measuring the profile is profiling/'s job.

Two machine models: a CPU-only machine (device and host are one RAM tier, plus disk;
cpu_model.py) and a machine with a GPU (GPU memory, pinned host RAM and disk, with the
host-GPU link and optional CPU attention; gpu_model.py). Planning for a GPU works from its
profile anywhere.
"""
from __future__ import annotations

import torch

from ..models.family import Family
from ..models.spec import ModelConfig
from ..sizing import MemoryBudget
from .cache_compression import IF_FASTER, kv_disk_bytes_per_step, plan_weighing_cache_compression
from .machine import MachineModel, machine_model
from .profile import ComputeRates, DiskRates, GpuRates, HardwareProfile
from .search import Candidate, Plan, evaluate, search
from .terms import Workload

PLAN_HEADROOM = 64 << 20
GPU_PLAN_SHARE = 0.9

__all__ = ["IF_FASTER", "Candidate", "ComputeRates", "DiskRates", "GpuRates", "HardwareProfile", "MachineModel", "Plan",
           "Workload", "evaluate", "machine_model", "plan_policy", "search"]


def plan_policy(cfg: ModelConfig, family: Family, dtype: torch.dtype, device: torch.device,
                profile: HardwareProfile, work: Workload, budget: MemoryBudget, max_block: int | None = None,
                compression: dict | None = None, block_size: int | None = None,
                gpu_batch_size: int | None = None) -> Plan:
    """The best policy for `work` on the machine `profile` describes; `compression` holds
    Policy's compress_* fields to plan with (compress_cache may be IF_FASTER: the planner
    decides; either way the plan's notes say why it is on or off); `block_size`, if given,
    is the block every candidate has (and `gpu_batch_size`, if also given, its split)."""
    # The engine checks the policy again once the model is open, when the process holds a
    # little more (tokenizer, file handles): plan with that much headroom. On a GPU the
    # caching allocator also rounds and fragments: plan for GPU_PLAN_SHARE of its budget.
    gpu = device.type == "cuda"
    device_bytes = int(budget.device_bytes * GPU_PLAN_SHARE) if gpu else budget.device_bytes
    budget = MemoryBudget(device_bytes, budget.host_bytes - PLAN_HEADROOM)
    machine = machine_model(profile, device)
    search_with = lambda settings: search(cfg, family, dtype, machine, work, budget, max_block,
                                          compression=settings, block_size=block_size,
                                          gpu_batch_size=gpu_batch_size)
    return plan_weighing_cache_compression(search_with, compression or {}, kv_disk_bytes_per_step(cfg, dtype, work))
