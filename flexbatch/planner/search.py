"""Policy search: enumerate (gpu_batch_size, num_gpu_batches); for each, a linear program
picks the memory fractions of weights and KV cache that minimise the block's time under the
memory budget (scipy's HiGHS). The best throughput wins."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linprog

from ..config import Policy
from ..engine.memory import GiB, MemoryBudget, MemoryPlan, run_memory
from ..errors import ConfigError
from ..models.family import Family
from ..models.spec import ModelConfig
from .cost_model import Workload, block_seconds, head_seconds, layer_costs
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


def _memory_terms(cfg, family, dtype, gbs, ngb, work, compression) -> tuple[float, float, float]:
    """Memory as m0 + mw * w_mem + mc * c_mem bytes (exactly linear for fractions below 1)."""
    capacity = work.prompt_len + work.gen_len

    def total(w, c):
        policy = Policy(gpu_batch_size=gbs, num_gpu_batches=ngb, weights_device=w, cache_device=c, **compression)
        plan = run_memory(cfg, family, policy, dtype, gbs * ngb, capacity, work.prompt_len)
        return sum(plan.host.values()) + sum(plan.device.values())

    m0 = total(0.0, 0.0)
    return m0, total(1.0 - 1e-9, 0.0) - m0, total(0.0, 1.0 - 1e-9) - m0


def solve_fractions(cfg, family, dtype, hw, gbs, ngb, work, budget_bytes, overlap=True, compression=None):
    """(w_mem, c_mem) minimising the block time within the budget, or None if infeasible."""
    compression = compression or {}
    template = Policy(gpu_batch_size=gbs, num_gpu_batches=ngb, **compression)
    costs = layer_costs(cfg, family, dtype, hw, template, work)
    m0, mw, mc = _memory_terms(cfg, family, dtype, gbs, ngb, work, compression)
    layers, steps = cfg.num_layers, work.gen_len - 1
    # x = [w_mem, c_mem, T_pre, T_gen] (per-layer times)
    rows, rhs = [], []
    for io, comp, col in ((costs.io_pre, costs.comp_pre, 2), (costs.io_gen, costs.comp_gen, 3)):
        t = [0.0, 0.0, 0.0, 0.0]
        t[col] = -1.0  # each row: term(w, c) - T <= 0, i.e. slope_w * w + slope_c * c - T <= -constant
        if overlap:
            rows += [[io[1], io[2], *t[2:]], [comp[1], comp[2], *t[2:]]]
            rhs += [-io[0], -comp[0]]
        else:
            rows.append([io[1] + comp[1], io[2] + comp[2], *t[2:]])
            rhs.append(-io[0] - comp[0])
    rows.append([mw, mc, 0.0, 0.0])
    rhs.append(budget_bytes - m0)
    # Among placements of equal time (compute-bound ones: the I/O hides under compute), prefer
    # the one that keeps more in memory: a tiny reward per fraction breaks the tie that way.
    prefer_memory = -TIE_BREAK * layers * (costs.io_pre[0] + steps * costs.io_gen[0])
    result = linprog(c=[prefer_memory, prefer_memory, layers, layers * steps], A_ub=np.array(rows), b_ub=np.array(rhs),
                     bounds=[(0, 1), (0, 1), (0, None), (0, None)], method="highs")
    if result.status != 0:
        return None
    w, c = (float(np.clip(v, 0.0, 1.0)) for v in result.x[:2])
    return _snap(w), _snap(c), costs


def _snap(fraction: float) -> float:
    # Round down to 1e-6 so that the engine's own memory check sees no rounding excess.
    return float(np.floor(fraction * 1e6) / 1e6)


def evaluate(cfg, family, dtype, hw, policy: Policy, work: Workload) -> Candidate:
    """Predicted time and memory of a given policy (used for hand-picked policies too)."""
    costs = layer_costs(cfg, family, dtype, hw, policy, work)
    head = head_seconds(cfg, dtype, hw, policy.gpu_batch_size, policy.block_size, work.gen_len)
    w_mem = policy.weights_device + policy.weights_host
    c_mem = policy.cache_device + policy.cache_host
    pre, gen = block_seconds(costs, cfg.num_layers, work.gen_len, w_mem, c_mem, policy.overlap, head)
    memory = run_memory(cfg, family, policy, dtype, policy.block_size, work.prompt_len + work.gen_len,
                        work.prompt_len)
    return Candidate(policy, policy.block_size * work.gen_len / (pre + gen), pre, gen, memory)


def search(cfg: ModelConfig, family: Family, dtype: torch.dtype, hw: HardwareProfile, work: Workload,
           budget: MemoryBudget, max_block: int | None = None, keep: int = 5,
           compression: dict | None = None) -> Plan:
    """The best policy for `work` within `budget` on a CPU-only machine; `compression` holds
    the compress_* fields every candidate gets.

    GPU batch sizes at which decode matmuls run below MIN_MATMUL_EFFICIENCY of the machine's
    peak are tried only when no larger one fits: there, per-operation costs the model does
    not price (many small loads, stores and kernel calls per layer) dominate, and predictions
    were measured to be optimistic (8 x 8 sequences ran 32% below its prediction on the
    planner benchmark, while 64 x 1 was within 4%)."""
    compression = compression or {}
    peak = max(hw.matmul_flops.get(str(dtype).removeprefix("torch."), {0: 0.0}).values())
    efficient = [g for g in GPU_BATCH_SIZES if hw.flops(dtype, g) >= MIN_MATMUL_EFFICIENCY * peak]
    small = [g for g in GPU_BATCH_SIZES if g not in efficient]
    candidates = _candidates(cfg, family, dtype, hw, work, budget, max_block, compression, efficient) \
        or _candidates(cfg, family, dtype, hw, work, budget, max_block, compression, small)
    if not candidates:
        raise _infeasible(cfg, family, dtype, work, budget, compression)
    candidates.sort(key=lambda c: (-c.throughput, c.memory_bytes))
    return Plan(candidates[0], candidates[1:keep])


def _candidates(cfg, family, dtype, hw, work, budget, max_block, compression, gpu_batch_sizes) -> list[Candidate]:
    out = []
    for gbs in gpu_batch_sizes:
        for ngb in NUM_GPU_BATCHES:
            if max_block is not None and gbs * ngb > max(max_block, 1) and not (gbs == 1 and ngb == 1):
                continue
            solved = solve_fractions(cfg, family, dtype, hw, gbs, ngb, work, budget.host_bytes,
                                     compression=compression)
            if solved is None:
                continue
            w, c, _ = solved
            policy = Policy(gpu_batch_size=gbs, num_gpu_batches=ngb, weights_device=w, cache_device=c, **compression)
            candidate = evaluate(cfg, family, dtype, hw, policy, work)
            try:
                candidate.memory.check(budget, unified=True, hint="")
            except ConfigError:
                continue
            out.append(candidate)
    return out


def _infeasible(cfg, family, dtype, work, budget, compression) -> ConfigError:
    smallest = Policy(gpu_batch_size=1, num_gpu_batches=1, weights_device=0, cache_device=0, **compression)
    plan = run_memory(cfg, family, smallest, dtype, 1, work.prompt_len + work.gen_len, work.prompt_len)
    need = sum(plan.host.values()) + sum(plan.device.values())
    parts = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in plan.host.items() | plan.device.items() if v)
    return ConfigError(
        f"no policy fits: even one sequence with all weights and KV cache on disk needs {need / GiB:.2f} GiB "
        f"({parts}) but the budget is {budget.host_bytes / GiB:.2f} GiB, {max(need - budget.host_bytes, 0) / GiB:.2f} "
        "GiB short. Free memory or raise --cpu-memory, compress the KV cache and weights (--compress-cache, "
        "--compress-weight), or shorten the prompt and generation length.")
