"""Policy search: enumerate (gpu_batch_size, num_gpu_batches) and the machine's variants (on
a GPU: whether the KV cache stays on it and where it is attended); for each, a linear
program picks the placement fractions of weights and KV cache that minimise the block's
time under the memory budgets (scipy's HiGHS). The best throughput wins. The machine
(`MachineModel`) supplies the cost terms and which memory counts against which budget."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.optimize import linprog

from ..config import Policy
from ..errors import ConfigError
from ..models.family import Family
from ..models.spec import ModelConfig
from ..sizing import GiB, MemoryBudget, MemoryPlan, block_capacity, run_memory
from .machine import MachineModel
from .terms import Workload, block_seconds, head_seconds

GPU_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
NUM_GPU_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16)
TIE_BREAK = 1e-4  # the share of the block's disk time worth trading for keeping data in memory
ON_DISK = dict(weights_device=0.0, weights_host=0.0, cache_device=0.0, cache_host=0.0)


@dataclass
class Candidate:
    policy: Policy
    throughput: float  # generated tokens per second, predicted
    prefill_seconds: float
    decode_seconds: float
    memory: MemoryPlan

    @property
    def memory_bytes(self) -> int:
        return sum(self.memory.host.values()) + sum(self.memory.device.values())


@dataclass
class Plan:
    best: Candidate
    runners_up: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why it chose what it did, for the user


def _memory_rows(cfg, family, dtype, machine: MachineModel, template: Policy, work, budget: MemoryBudget):
    """Memory constraints [slope per variable] . x <= limit, one per budget of the machine.
    Memory is linear in the placement (exactly, for fractions below 1), so each row comes
    from one plan per variable."""
    def totals(**fractions) -> np.ndarray:
        policy = replace(template, **{**ON_DISK, **fractions})
        return machine.memory_totals(_run_memory(cfg, family, dtype, machine, policy, work))

    base = totals()
    slopes = np.stack([totals(**{name: 1.0 - 1e-9}) - base for name in machine.variables], axis=1)
    return slopes, machine.memory_limits(budget) - base


def solve_fractions(cfg, family, dtype, machine: MachineModel, template: Policy, work, budget: MemoryBudget):
    """The placement x (`machine.variables`) minimising the block time of `template`'s batch
    sizes and flags within the budget; None if nothing fits. LP variables: x, then the
    per-layer prefill and decode times T_pre and T_gen."""
    costs = machine.layer_costs(cfg, family, dtype, template, work)
    n = len(machine.variables)
    rows, rhs = [], []
    for phase, col in (("pre", n), ("gen", n + 1)):
        lanes = costs.lanes(phase) if template.overlap else [costs.serial(phase)]
        for lane in lanes:  # lane(x) <= T: slopes . x - T <= -constant
            row = np.zeros(n + 2)
            row[:n], row[col] = lane[1:], -1.0
            rows.append(row)
            rhs.append(-lane[0])
    for slopes, limit in zip(*_memory_rows(cfg, family, dtype, machine, template, work, budget)):
        rows.append(np.concatenate([slopes, [0.0, 0.0]]))
        rhs.append(limit)
    for group in machine.fraction_groups():
        rows.append(np.array([1.0 if i in group else 0.0 for i in range(n + 2)]))
        rhs.append(1.0)
    result = linprog(c=_objective(machine, costs, cfg.num_layers, work.gen_len - 1), A_ub=np.array(rows),
                     b_ub=np.array(rhs), bounds=machine.bounds(template) + [(0, None)] * 2, method="highs")
    if result.status != 0:
        return None
    return tuple(_snap(float(np.clip(v, 0.0, 1.0))) for v in result.x[:n])


def _objective(machine: MachineModel, costs, layers: int, steps: int) -> list[float]:
    """Minimise the block's time. Among placements of equal time (compute-bound ones: the
    I/O hides under compute) prefer the one that keeps data on faster tiers: a tiny reward
    per fraction (`machine.tier_reward`) breaks the tie that way."""
    slowest = lambda phase: max(lane[0] for lane in costs.lanes(phase))  # everything on the slowest tier
    scale = TIE_BREAK * layers * (slowest("pre") + steps * slowest("gen"))
    return [-scale * machine.tier_reward(name) for name in machine.variables] + [layers, layers * steps]


def _snap(fraction: float) -> float:
    # Round down to 1e-6 so that the engine's own memory check sees no rounding excess.
    return float(np.floor(fraction * 1e6) / 1e6) + 0.0  # + 0.0: no negative zero


def _run_memory(cfg, family, dtype, machine: MachineModel, policy: Policy, work: Workload,
                rows: int | None = None) -> MemoryPlan:
    """The memory `policy` runs `work` in: `rows` sequences (its block by default), the KV
    cache of one such block per block in flight."""
    rows = policy.block_size if rows is None else rows
    return run_memory(cfg, family, policy, dtype, rows * work.blocks_in_flight,
                      block_capacity(work.prompt_len + work.gen_len), work.prompt_len, machine.device)


def evaluate(cfg, family, dtype, machine: MachineModel, policy: Policy, work: Workload) -> Candidate:
    """Predicted time and memory of a given policy (used for hand-picked policies too)."""
    costs = machine.layer_costs(cfg, family, dtype, policy, work)
    head = head_seconds(cfg, dtype, machine.rates, policy.gpu_batch_size, policy.block_size, work.gen_len)
    pre, gen = block_seconds(costs, cfg.num_layers, work.gen_len, machine.placement(policy), policy.overlap, head)
    memory = _run_memory(cfg, family, dtype, machine, policy, work)
    return Candidate(policy, policy.block_size * work.gen_len / (pre + gen), pre, gen, memory)


def search(cfg: ModelConfig, family: Family, dtype: torch.dtype, machine: MachineModel, work: Workload,
           budget: MemoryBudget, max_block: int | None = None, keep: int = 5,
           compression: dict | None = None, block_size: int | None = None,
           gpu_batch_size: int | None = None) -> Plan:
    """The best policy for `work` within `budget` on `machine`; `compression` holds the
    compress_* fields every candidate gets. GPU batch sizes the machine does not favour
    (`machine.batch_sizes`) are tried only when none it favours fits. `block_size` fixes
    the block (sequences generated together) and leaves the planner the split into GPU
    batches and the placement; `gpu_batch_size` with it fixes the split too."""
    compression = compression or {}
    efficient, small = machine.batch_sizes(dtype, GPU_BATCH_SIZES)
    if block_size is not None:
        efficient, small = _divisors(block_size), []
        if gpu_batch_size is not None:
            efficient = [gpu_batch_size] if gpu_batch_size in efficient else []
    templates = lambda sizes: _templates(machine, sizes, max_block, compression, block_size)
    candidates = _candidates(cfg, family, dtype, machine, work, budget, templates(efficient)) \
        or _candidates(cfg, family, dtype, machine, work, budget, templates(small))
    if not candidates:
        raise _infeasible(cfg, family, dtype, machine, work, budget, compression)
    candidates.sort(key=lambda c: (-c.throughput, c.memory_bytes))
    return Plan(candidates[0], candidates[1:keep])


def _divisors(block_size: int) -> list[int]:
    """GPU batch sizes that split a block of `block_size` into a searched number of batches."""
    return [g for g in range(1, block_size + 1) if block_size % g == 0 and block_size // g in NUM_GPU_BATCHES]


def _templates(machine: MachineModel, gpu_batch_sizes, max_block: int | None, compression: dict,
               block_size: int | None = None) -> list[Policy]:
    """The policies to place: every block shape up to max_block (or of exactly `block_size`
    sequences), in each of the machine's variants."""
    return [Policy(gpu_batch_size=gbs, num_gpu_batches=ngb, **variant, **compression)
            for gbs in gpu_batch_sizes for ngb in NUM_GPU_BATCHES for variant in machine.variants(compression)
            if _block_allowed(gbs * ngb, max_block, block_size)]


def _block_allowed(block: int, max_block: int | None, block_size: int | None) -> bool:
    if block_size is not None:
        return block == block_size
    return max_block is None or block <= max(max_block, 1) or block == 1


def _candidates(cfg, family, dtype, machine: MachineModel, work, budget, templates: list[Policy]) -> list[Candidate]:
    out = {}
    for template in templates:
        x = solve_fractions(cfg, family, dtype, machine, template, work, budget)
        if x is None:
            continue
        policy = machine.with_placement(template, x)
        candidate = evaluate(cfg, family, dtype, machine, policy, work)
        try:
            candidate.memory.check(budget, unified=machine.unified, hint="")
        except ConfigError:
            continue
        out[policy] = candidate  # the CPU-attention variant of an all-GPU cache is the same policy
    return list(out.values())


def _infeasible(cfg, family, dtype, machine: MachineModel, work, budget, compression) -> ConfigError:
    smallest = Policy(gpu_batch_size=1, num_gpu_batches=1, **ON_DISK, **compression)
    plan = _run_memory(cfg, family, dtype, machine, smallest, work, rows=1)
    tiers = [("memory", plan.merged(), budget.host_bytes, "--cpu-memory")] if machine.unified else \
        [("GPU memory", plan.device, budget.device_bytes, "--gpu-memory"),
         ("host memory", plan.host, budget.host_bytes, "--cpu-memory")]
    label, parts, limit, flag = max(tiers, key=lambda tier: sum(tier[1].values()) - tier[2])
    need = sum(parts.values())
    detail = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in parts.items() if v)
    return ConfigError(
        f"no policy fits: even one sequence with all weights and KV cache on disk needs {need / GiB:.2f} GiB of "
        f"{label} ({detail}) but the budget is {limit / GiB:.2f} GiB, {max(need - limit, 0) / GiB:.2f} GiB short. "
        f"Free memory or raise {flag}, compress the KV cache and weights (--compress-cache, --compress-weight), "
        "or shorten the prompt and generation length.")
