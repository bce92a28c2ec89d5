"""Choosing a policy: hardware profile, cost model (FlexGen's), linear-program search.

No torch.cuda is needed: the planner models a CPU-only machine (device and host are one RAM
tier, plus disk). GPU placement is not modelled yet: without a policy a GPU run keeps
everything on the GPU when it fits (`fits_on_gpu`), else the user is asked for a policy.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Policy
from ..engine.memory import GiB, MemoryBudget, run_memory
from ..errors import ConfigError
from ..models.family import Family
from ..models.spec import ModelConfig
from .cost_model import Workload
from .hardware import HardwareProfile, at_current_speed, load_or_measure
from .search import Candidate, Plan, evaluate, search

PLAN_HEADROOM = 64 << 20

__all__ = ["Candidate", "HardwareProfile", "Plan", "Workload", "at_current_speed", "evaluate", "fits_on_gpu",
           "hardware_profile", "plan_policy", "search"]


def hardware_profile(offload_dir: Path | None = None, force: bool = False, log=lambda msg: None,
                     disk_only: bool = False) -> HardwareProfile:
    from ..default_model import cache_dir

    folder = Path(offload_dir) if offload_dir else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return load_or_measure(cache_dir() / "hardware.json", folder, force=force, log=log, disk_only=disk_only)


def fits_on_gpu(cfg: ModelConfig, family: Family, dtype: torch.dtype, work: Workload, budget: MemoryBudget,
                batch_size: int) -> None:
    """Until the cost model covers GPUs, a GPU run without a policy keeps everything on the
    GPU: return if the weights, the KV cache of `batch_size` sequences and their activations
    fit its budget, else raise an error that names the sizes and a policy to start from."""
    policy = Policy(gpu_batch_size=batch_size)
    plan = run_memory(cfg, family, policy, dtype, batch_size, work.prompt_len + work.gen_len, work.prompt_len,
                      torch.device("cuda"))
    need = sum(plan.device.values())
    if need > budget.device_bytes:
        raise ConfigError(
            f"the model with a batch of {batch_size} sequences needs {need / GiB:.2f} GiB of GPU memory but the "
            f"budget is {budget.device_bytes / GiB:.2f} GiB, and the planner does not model GPUs yet. Give a "
            "policy, e.g. --percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 4 (weights in host "
            "RAM, streamed to the GPU layer by layer), or run on the CPU with --device cpu.")


def plan_policy(cfg: ModelConfig, family: Family, dtype: torch.dtype, device: torch.device, work: Workload,
                budget: MemoryBudget, max_block: int | None = None, offload_dir: Path | None = None,
                compression: dict | None = None, log=lambda msg: None) -> Plan:
    """The best policy for `work`; `compression` holds Policy's compress_* fields to plan with."""
    if device.type == "cuda":
        raise ConfigError("the planner does not model GPUs yet; give a policy (--percent and batch sizes), "
                          "or run without one to keep everything on the GPU.")
    # The engine checks the policy again once the model is open, when the process holds a
    # little more (tokenizer, file handles): plan with that much headroom.
    budget = MemoryBudget(budget.device_bytes, budget.host_bytes - PLAN_HEADROOM)
    hw = at_current_speed(hardware_profile(offload_dir, log=log), dtype)
    return search(cfg, family, dtype, hw, work, budget, max_block, compression=compression)
