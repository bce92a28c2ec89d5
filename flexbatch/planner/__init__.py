"""Choosing a policy: hardware profile, cost model (FlexGen's), linear-program search.

No torch.cuda is needed: the planner models a CPU-only machine (device and host are one RAM
tier, plus disk). GPU placement is not modelled yet; give a policy explicitly there.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..engine.memory import MemoryBudget
from ..errors import ConfigError
from ..models.family import Family
from ..models.spec import ModelConfig
from .cost_model import Workload
from .hardware import HardwareProfile, at_current_speed, load_or_measure
from .search import Candidate, Plan, evaluate, search

PLAN_HEADROOM = 64 << 20

__all__ = ["Candidate", "HardwareProfile", "Plan", "Workload", "at_current_speed", "evaluate", "hardware_profile",
           "plan_policy", "search"]


def hardware_profile(offload_dir: Path | None = None, force: bool = False, log=lambda msg: None,
                     disk_only: bool = False) -> HardwareProfile:
    from ..default_model import cache_dir

    folder = Path(offload_dir) if offload_dir else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return load_or_measure(cache_dir() / "hardware.json", folder, force=force, log=log, disk_only=disk_only)


def plan_policy(cfg: ModelConfig, family: Family, dtype: torch.dtype, device: torch.device, work: Workload,
                budget: MemoryBudget, max_block: int | None = None, offload_dir: Path | None = None,
                compression: dict | None = None, log=lambda msg: None) -> Plan:
    """The best policy for `work`; `compression` holds Policy's compress_* fields to plan with."""
    if device.type == "cuda":
        raise ConfigError("the planner does not model GPUs yet; give a policy (--percent and batch sizes).")
    # The engine checks the policy again once the model is open, when the process holds a
    # little more (tokenizer, file handles): plan with that much headroom.
    budget = MemoryBudget(budget.device_bytes, budget.host_bytes - PLAN_HEADROOM)
    hw = at_current_speed(hardware_profile(offload_dir, log=log), dtype)
    return search(cfg, family, dtype, hw, work, budget, max_block, compression=compression)
