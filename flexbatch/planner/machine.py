"""A kind of machine as the policy search sees it: which placement fractions it solves for,
the cost terms of one layer, and which memory each policy takes from which budget.

Two models implement it: `CpuModel` (cpu_model.py: one RAM tier and the disk) and
`GpuModel` (gpu_model.py: GPU memory, host RAM and the disk, with the link between them).
`machine_model` picks the one for a device.
"""
from __future__ import annotations

import abc
from dataclasses import replace

import numpy as np
import torch

from ..config import Policy
from ..models.family import Family
from ..models.spec import ModelConfig
from ..sizing import MemoryBudget, MemoryPlan
from .profile import ComputeRates, HardwareProfile
from .terms import LayerCosts, Workload


class MachineModel(abc.ABC):
    variables: tuple[str, ...]  # the Policy fields the search places, in this order
    device: torch.device  # where the model computes (a GPU adds copies of streamed weights)
    unified: bool  # device and host memory are one budget (a CPU-only machine)

    def __init__(self, profile: HardwareProfile):
        self.profile = profile

    @property
    @abc.abstractmethod
    def rates(self) -> ComputeRates:
        """The compute rates of the processor that runs the model."""

    @abc.abstractmethod
    def layer_costs(self, cfg: ModelConfig, family: Family, dtype: torch.dtype, policy: Policy,
                    work: Workload) -> LayerCosts:
        """One layer's cost terms for `policy`'s batch sizes, flags and compression."""

    @abc.abstractmethod
    def batch_sizes(self, dtype: torch.dtype, sizes: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """`sizes` split into GPU batch sizes worth trying first and those tried only when
        none of the first fits."""

    @abc.abstractmethod
    def variants(self, compression: dict) -> list[dict]:
        """Policy fields beyond the batch sizes that make one search case each."""

    def placement(self, policy: Policy) -> np.ndarray:
        """The policy's values of `variables`."""
        return np.array([getattr(policy, name) for name in self.variables])

    def with_placement(self, policy: Policy, x) -> Policy:
        return replace(policy, **dict(zip(self.variables, (float(v) for v in x))))

    def bounds(self, template: Policy) -> list[tuple[float, float]]:
        return [(0.0, 1.0)] * len(self.variables)

    def fraction_groups(self) -> list[tuple[int, ...]]:
        """Variables whose sum is at most 1 (one tensor's shares of several tiers)."""
        return []

    def memory_totals(self, plan: MemoryPlan) -> np.ndarray:
        """Bytes of `plan` against each budget (see `memory_limits`)."""
        device, host = sum(plan.device.values()), sum(plan.host.values())
        return np.array([device + host] if self.unified else [device, host], dtype=float)

    def memory_limits(self, budget: MemoryBudget) -> np.ndarray:
        return np.array([budget.host_bytes] if self.unified else [budget.device_bytes, budget.host_bytes],
                        dtype=float)

    def tier_reward(self, variable: str) -> float:
        """How much the search prefers a fraction on this tier when times tie."""
        return 1.0


def machine_model(profile: HardwareProfile, device: torch.device) -> MachineModel:
    """The model of this machine kind: with a GPU when `device` is one."""
    from .cpu_model import CpuModel
    from .gpu_model import GpuModel

    return GpuModel(profile) if device.type == "cuda" else CpuModel(profile)
