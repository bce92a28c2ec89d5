"""Policy search: enumerate (gpu_batch_size, num_gpu_batches) and, on a GPU, whether the KV
cache stays on it and where it is attended; for each, a linear program picks the placement
fractions of weights and KV cache that minimise the block's time under the memory budgets
(scipy's HiGHS). The best throughput wins."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.optimize import linprog

from ..config import Policy
from ..engine.memory import GiB, MemoryBudget, MemoryPlan, run_memory
from ..errors import ConfigError
from ..models.family import Family
from ..models.spec import ModelConfig
from .cost_model import Workload, block_seconds, head_seconds, layer_costs
from .gpu_cost import gpu_layer_costs
from .hardware import HardwareProfile

GPU_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
NUM_GPU_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16)
MIN_MATMUL_EFFICIENCY = 0.5  # see `search`
TIE_BREAK = 1e-4  # the share of the block's disk time worth trading for keeping data in memory


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


def costs_for(cfg, family, dtype, hw, policy: Policy, work: Workload, gpu: bool):
    """The per-layer cost terms on this kind of machine (gpu_cost.py or cost_model.py)."""
    return (gpu_layer_costs if gpu else layer_costs)(cfg, family, dtype, hw, policy, work)


def _memory_rows(cfg, family, dtype, template: Policy, work, budget: MemoryBudget, gpu: bool):
    """Memory constraints [slope per variable] . x <= limit, one per budgeted tier: the GPU
    and host RAM, or on a CPU-only machine their sum. Memory is linear in the placement
    (exactly, for fractions below 1), so each row comes from one plan per variable."""
    capacity = work.prompt_len + work.gen_len
    names = ("weights_device", "weights_host", "cache_device", "cache_host") if gpu else \
        ("weights_device", "cache_device")
    device = torch.device("cuda" if gpu else "cpu")

    def tiers(**fractions) -> np.ndarray:
        on_disk = dict(weights_device=0.0, weights_host=0.0, cache_device=0.0, cache_host=0.0)
        policy = replace(template, **{**on_disk, **fractions})
        plan = run_memory(cfg, family, policy, dtype, policy.block_size, capacity, work.prompt_len, device)
        device_bytes, host_bytes = sum(plan.device.values()), sum(plan.host.values())
        return np.array([device_bytes, host_bytes] if gpu else [device_bytes + host_bytes], dtype=float)

    base = tiers()
    slopes = np.stack([tiers(**{name: 1.0 - 1e-9}) - base for name in names], axis=1)
    limits = np.array([budget.device_bytes, budget.host_bytes] if gpu else [budget.host_bytes], dtype=float)
    return slopes, limits - base


def solve_fractions(cfg, family, dtype, hw, template: Policy, work, budget: MemoryBudget, gpu: bool = False):
    """The placement x (`costs.variables`) minimising the block time of `template`'s batch
    sizes and flags within the budget, as (x, costs); None if nothing fits. Variables:
    x, then the per-layer prefill and decode times T_pre and T_gen."""
    costs = costs_for(cfg, family, dtype, hw, template, work, gpu)
    n = len(costs.variables)
    layers, steps = cfg.num_layers, work.gen_len - 1
    rows, rhs = [], []
    for phase, col in (("pre", n), ("gen", n + 1)):
        lanes = costs.lanes(phase) if template.overlap else [costs.serial(phase)]
        for lane in lanes:  # lane(x) <= T: slopes . x - T <= -constant
            row = np.zeros(n + 2)
            row[:n], row[col] = lane[1:], -1.0
            rows.append(row)
            rhs.append(-lane[0])
    mem_slopes, mem_limits = _memory_rows(cfg, family, dtype, template, work, budget, gpu)
    for slopes, limit in zip(mem_slopes, mem_limits):
        rows.append(np.concatenate([slopes, [0.0, 0.0]]))
        rhs.append(limit)
    for first in range(0, n, 2) if gpu else ():  # w_gpu + w_host <= 1, c_gpu + c_host <= 1
        rows.append(np.array([1.0 if i in (first, first + 1) else 0.0 for i in range(n + 2)]))
        rhs.append(1.0)
    result = linprog(c=_objective(costs, layers, steps), A_ub=np.array(rows), b_ub=np.array(rhs),
                     bounds=_bounds(template, gpu) + [(0, None)] * 2, method="highs")
    if result.status != 0:
        return None
    return tuple(_snap(float(np.clip(v, 0.0, 1.0))) for v in result.x[:n]), costs


def _bounds(template: Policy, gpu: bool) -> list[tuple[float, float]]:
    """Fraction bounds. On a GPU a template with cache_device 1 plans the KV cache all on the
    GPU, one with cache_device < 1 lets it leave (the engine's per-operation cost differs)."""
    if not gpu:
        return [(0, 1), (0, 1)]
    cache_pinned = template.cache_device == 1
    return [(0, 1), (0, 1), (1, 1) if cache_pinned else (0, 1), (0, 0) if cache_pinned else (0, 1)]


def _objective(costs, layers: int, steps: int) -> list[float]:
    """Minimise the block's time. Among placements of equal time (compute-bound ones: the
    I/O hides under compute) prefer the one that keeps data on faster tiers: a tiny reward
    per fraction, doubled for the GPU on a GPU machine, breaks the tie that way."""
    slowest = lambda phase: max(lane[0] for lane in costs.lanes(phase))  # everything on the slowest tier
    scale = TIE_BREAK * layers * (slowest("pre") + steps * slowest("gen"))
    rewards = [-scale * (2.0 if name.endswith("gpu") else 1.0) for name in costs.variables]
    return rewards + [layers, layers * steps]


def _snap(fraction: float) -> float:
    # Round down to 1e-6 so that the engine's own memory check sees no rounding excess.
    return float(np.floor(fraction * 1e6) / 1e6) + 0.0  # + 0.0: no negative zero


def _with_placement(policy: Policy, x: tuple[float, ...], gpu: bool) -> Policy:
    if gpu:
        w_gpu, w_host, c_gpu, c_host = x
        cpu_attention = policy.cpu_attention and c_gpu < 1  # nothing to attend on the CPU otherwise
        return replace(policy, weights_device=w_gpu, weights_host=w_host, cache_device=c_gpu, cache_host=c_host,
                       cpu_attention=cpu_attention)
    w_mem, c_mem = x
    return replace(policy, weights_device=w_mem, weights_host=0.0, cache_device=c_mem, cache_host=0.0)


def evaluate(cfg, family, dtype, hw, policy: Policy, work: Workload, gpu: bool = False) -> Candidate:
    """Predicted time and memory of a given policy (used for hand-picked policies too)."""
    costs = costs_for(cfg, family, dtype, hw, policy, work, gpu)
    rates = hw.gpu if gpu else hw
    head = head_seconds(cfg, dtype, rates, policy.gpu_batch_size, policy.block_size, work.gen_len)
    pre, gen = block_seconds(costs, cfg.num_layers, work.gen_len, costs.placement(policy), policy.overlap, head)
    memory = run_memory(cfg, family, policy, dtype, policy.block_size, work.prompt_len + work.gen_len,
                        work.prompt_len, torch.device("cuda" if gpu else "cpu"))
    return Candidate(policy, policy.block_size * work.gen_len / (pre + gen), pre, gen, memory)


def search(cfg: ModelConfig, family: Family, dtype: torch.dtype, hw: HardwareProfile, work: Workload,
           budget: MemoryBudget, max_block: int | None = None, keep: int = 5,
           compression: dict | None = None, gpu: bool = False, block_size: int | None = None) -> Plan:
    """The best policy for `work` within `budget`; `compression` holds the compress_* fields
    every candidate gets. With `gpu` the model has a GPU (the profile's `gpu` rates), and
    CPU attention is tried both ways.

    On a CPU, GPU batch sizes at which decode matmuls run below MIN_MATMUL_EFFICIENCY of the
    machine's peak are tried only when no larger one fits: there, per-operation costs the CPU
    model does not price (many small loads, stores and kernel calls per layer) dominate, and
    predictions were measured to be optimistic (8 x 8 sequences ran 32% below its prediction
    on the planner benchmark, while 64 x 1 was within 4%). The GPU model prices those costs
    (engine_probe.py), and a GPU's decode matmuls stay far below its peak at any batch that
    fits, so there every size is tried. `block_size` fixes the block (sequences generated
    together) and leaves the planner the split into GPU batches and the placement."""
    if gpu and hw.gpu is None:
        raise ConfigError("the hardware profile has no GPU measurements; run `flexbatch profile --force` on this "
                          "machine with the GPU visible.")
    if gpu:
        efficient, small = list(GPU_BATCH_SIZES), []
    else:
        peak = max(hw.flops(dtype, rows) for rows in (1 << p for p in range(14)))
        efficient = [g for g in GPU_BATCH_SIZES if hw.flops(dtype, g) >= MIN_MATMUL_EFFICIENCY * peak]
        small = [g for g in GPU_BATCH_SIZES if g not in efficient]
    if block_size is not None:
        efficient, small = _divisors(block_size), []
    templates = lambda sizes: _templates(sizes, max_block, compression or {}, gpu, block_size)
    candidates = _candidates(cfg, family, dtype, hw, work, budget, templates(efficient), gpu) \
        or _candidates(cfg, family, dtype, hw, work, budget, templates(small), gpu)
    if not candidates:
        raise _infeasible(cfg, family, dtype, work, budget, compression or {}, gpu)
    candidates.sort(key=lambda c: (-c.throughput, c.memory_bytes))
    return Plan(candidates[0], candidates[1:keep])


def _divisors(block_size: int) -> list[int]:
    """GPU batch sizes that split a block of `block_size` into a searched number of batches."""
    return [g for g in range(1, block_size + 1) if block_size % g == 0 and block_size // g in NUM_GPU_BATCHES]


def _templates(gpu_batch_sizes, max_block: int | None, compression: dict, gpu: bool,
               block_size: int | None = None) -> list[Policy]:
    """The policies to place: every block shape up to max_block (or of exactly `block_size`
    sequences); on a GPU each with its KV cache all on the GPU, and with it free to leave,
    attended on the GPU or (a plain cache) on the CPU."""
    if gpu:
        free = dict(cache_device=0.0, cache_host=0.0)
        attention = (False,) if compression.get("compress_cache") else (False, True)
        variants = [dict(cache_device=1.0)] + [dict(free, cpu_attention=flag) for flag in attention]
    else:
        variants = [{}]
    return [Policy(gpu_batch_size=gbs, num_gpu_batches=ngb, **variant, **compression)
            for gbs in gpu_batch_sizes for ngb in NUM_GPU_BATCHES for variant in variants
            if _block_allowed(gbs * ngb, max_block, block_size)]


def _block_allowed(block: int, max_block: int | None, block_size: int | None) -> bool:
    if block_size is not None:
        return block == block_size
    return max_block is None or block <= max(max_block, 1) or block == 1


def _candidates(cfg, family, dtype, hw, work, budget, templates: list[Policy], gpu: bool) -> list[Candidate]:
    out = {}
    for template in templates:
        solved = solve_fractions(cfg, family, dtype, hw, template, work, budget, gpu)
        if solved is None:
            continue
        policy = _with_placement(template, solved[0], gpu)
        candidate = evaluate(cfg, family, dtype, hw, policy, work, gpu)
        try:
            candidate.memory.check(budget, unified=not gpu, hint="")
        except ConfigError:
            continue
        out[policy] = candidate  # the CPU-attention variant of an all-GPU cache is the same policy
    return list(out.values())


def _infeasible(cfg, family, dtype, work, budget, compression, gpu: bool) -> ConfigError:
    smallest = Policy(gpu_batch_size=1, num_gpu_batches=1, weights_device=0, cache_device=0, **compression)
    plan = run_memory(cfg, family, smallest, dtype, 1, work.prompt_len + work.gen_len, work.prompt_len,
                      torch.device("cuda" if gpu else "cpu"))
    tiers = [("GPU memory", plan.device, budget.device_bytes, "--gpu-memory"),
             ("host memory", plan.host, budget.host_bytes, "--cpu-memory")] if gpu else \
        [("memory", plan.merged(), budget.host_bytes, "--cpu-memory")]
    label, parts, limit, flag = max(tiers, key=lambda tier: sum(tier[1].values()) - tier[2])
    need = sum(parts.values())
    detail = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in parts.items() if v)
    return ConfigError(
        f"no policy fits: even one sequence with all weights and KV cache on disk needs {need / GiB:.2f} GiB of "
        f"{label} ({detail}) but the budget is {limit / GiB:.2f} GiB, {max(need - limit, 0) / GiB:.2f} GiB short. "
        f"Free memory or raise {flag}, compress the KV cache and weights (--compress-cache, --compress-weight), "
        "or shorten the prompt and generation length.")
