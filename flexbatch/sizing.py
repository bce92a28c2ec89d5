"""Bytes: what a policy needs on each tier (weights, KV cache, activations, buffers).

Pure arithmetic over a model's config, its family's weight specs and a Policy, shared by the
engine (which checks a policy before allocating anything) and the planner (which searches
policies that fit). Measuring what a machine has is not here: see engine/memory.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .config import Policy
from .errors import ConfigError
from .kernels.packed import element_size, stored_bytes
from .kernels.quant import QuantConfig, quantized_row_bytes
from .models.family import Family
from .models.spec import ModelConfig
from .storage.tiers import Tier

GiB = 1 << 30
KV_IN_FLIGHT = 4  # (layer, GPU batch) caches whose buffers are held at once: computed, loading ahead, storing
# A decode step over the whole block (engine.schedule.block_schedule) reads this many caches
# ahead of the one attention is at, out of the same buffers: a read waits for a lagging store.
CACHES_READ_AHEAD = KV_IN_FLIGHT - 1
# Memory a run takes beyond its tensors: allocator arenas of the I/O threads, torch's
# temporaries and first-use caches. Measured growth beyond the tensors was 35-50 MiB.
RUNTIME_OVERHEAD = 64 << 20


@dataclass
class MemoryBudget:
    """Bytes flexbatch may use on the compute device and in host RAM. On a CPU-only machine
    both are the same RAM, and only `host_bytes` applies (to their sum)."""

    device_bytes: int
    host_bytes: int


@dataclass(frozen=True)
class KVRoute:
    """How the part of the KV cache kept off the compute device (host RAM, disk) reaches
    attention under a policy: the one decision the engine (which buffers it stages rows
    through), the sizing (which buffers it counts) and the planner (which link traffic it
    prices) all read."""

    gpu: bool  # the model computes on a GPU (else host and device are one RAM)
    compressed: bool  # rows are quantized: decoded where they live, the dense result moved
    cpu_attention: bool  # a plain cache on a GPU machine, attended on the CPU where it lives

    @property
    def rows_to_device(self) -> bool:
        """Off-device rows are copied as they are into device buffers every step."""
        return self.gpu and not self.compressed and not self.cpu_attention

    def segments(self, split: dict[Tier, int]) -> list[KVSegmentPlace]:
        """The layout of one (layer, GPU batch) cache whose sequences `split` puts on each
        tier: one segment per tier that holds any, in the order device, host, disk. On a
        CPU-only machine the device and host shares are one segment in the one RAM."""
        groups = [(Tier.DEVICE, split[Tier.DEVICE]), (Tier.HOST, split[Tier.HOST])] if self.gpu else \
            [(Tier.DEVICE, split[Tier.DEVICE] + split[Tier.HOST])]
        groups.append((Tier.DISK, split[Tier.DISK]))
        return [KVSegmentPlace(n, tier, tier is Tier.DEVICE or not self.cpu_attention) for tier, n in groups if n]


@dataclass(frozen=True)
class KVSegmentPlace:
    """One tier's share of a (layer, GPU batch) KV cache: consecutive sequences, where their
    rows live and where they are attended."""

    sequences: int
    home: Tier  # DEVICE: the compute device (a CPU-only machine's RAM); HOST: RAM beside a GPU; DISK
    on_device: bool  # attended on the compute device, else on the CPU where the rows are


def kv_route(policy: Policy, gpu: bool) -> KVRoute:
    """The route `policy` takes: CPU attention applies to a plain cache on a GPU machine (a
    compressed cache is decoded on the CPU and its dense rows cross to the GPU)."""
    return KVRoute(gpu, policy.compress_cache, gpu and policy.cpu_attention and not policy.compress_cache)


@dataclass
class MemoryPlan:
    """Bytes per purpose on the device and the host."""

    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)

    def add(self, on_device: bool, what: str, nbytes: int) -> None:
        target = self.device if on_device else self.host
        target[what] = target.get(what, 0) + int(nbytes)

    def merged(self) -> dict[str, int]:
        """Bytes per purpose over both tiers (a CPU-only machine's one memory)."""
        out = dict(self.device)
        for k, v in self.host.items():
            out[k] = out.get(k, 0) + v
        return out

    def _tiers(self, budget: MemoryBudget, unified: bool) -> list[tuple[str, dict[str, int], int]]:
        return [("memory", self.merged(), budget.host_bytes)] if unified else [
            ("GPU memory", self.device, budget.device_bytes), ("host memory", self.host, budget.host_bytes)]

    def fits(self, budget: MemoryBudget, unified: bool) -> bool:
        return all(sum(parts.values()) <= limit for _, parts, limit in self._tiers(budget, unified))

    def check(self, budget: MemoryBudget, unified: bool, hint: str) -> None:
        """Raise ConfigError naming the sizes if the plan exceeds the budget."""
        for label, parts, limit in self._tiers(budget, unified):
            need = sum(parts.values())
            if need > limit:
                largest_first = sorted(parts.items(), key=lambda kv: -kv[1])
                detail = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in largest_first if v)
                raise ConfigError(
                    f"this policy needs {need / GiB:.2f} GiB of {label} ({detail}) but the budget is "
                    f"{limit / GiB:.2f} GiB. {hint}"
                )


def block_capacity(span: int, refills: bool = True) -> int:
    """KV cache slots per row of a block whose sequences need up to `span` tokens each. With
    refill (more requests than rows) an eighth more, at least 8: the room the block's clock
    runs on between two shifts of the cache (engine/generation.py). Attention reads every
    slot since the oldest sequence's first, so a shorter room reads less between shifts."""
    return span + max(8, span // 8) if refills else span


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, quant: QuantConfig | None = None) -> int:
    """K and V of one token of one sequence in one layer, as stored (compressed or not)."""
    if quant is None:
        return 2 * cfg.num_kv_heads * cfg.head_dim * element_size(dtype)
    return 2 * cfg.num_kv_heads * quantized_row_bytes(cfg.head_dim, quant, dtype)


def dense_window(policy: Policy, tokens: float) -> float:
    """Of a sequence's first `tokens` cached tokens, how many are also kept dense: a
    compressed cache's last cache_window (engine/kv_segments.py); none in a plain cache."""
    return min(policy.cache_window, tokens) if policy.compress_cache else 0


def kv_stored_bytes(cfg: ModelConfig, dtype: torch.dtype, policy: Policy, tokens: float) -> float:
    """Bytes a sequence's cache of `tokens` tokens takes in one layer as `policy` stores it, and
    decode reads back: a row per token (quantized in a compressed cache), plus a compressed
    cache's dense window, which repeats the last tokens exactly."""
    return tokens * kv_bytes_per_token(cfg, dtype, policy.cache_quant) \
        + dense_window(policy, tokens) * kv_bytes_per_token(cfg, dtype)


def working_bytes(cfg: ModelConfig, policy: Policy, dtype: torch.dtype, prompt_width: int, capacity: int) -> int:
    """Activations of the whole block and the temporaries of one layer compute: a GPU batch's
    prompts, or a decode step's whole block (on a CPU it computes all B rows at once)."""
    elt = torch.empty((), dtype=dtype).element_size()
    block, gbs = policy.block_size, policy.gpu_batch_size
    hidden = block * prompt_width * cfg.hidden_size * elt
    rows = max(gbs * prompt_width, block)
    temporaries = rows * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * elt
    scores = gbs * cfg.num_heads * prompt_width * capacity * 4
    logits = block * cfg.vocab_size * 4 * 2
    return hidden + temporaries + scores + logits


def layer_weight_bytes(cfg: ModelConfig, family: Family, dtype: torch.dtype,
                       quant: QuantConfig | None = None) -> int:
    """Bytes of one transformer layer's weights as stored (compressed or not)."""
    return sum(stored_bytes(s.shape, dtype, quant) for s in family.layer_specs(cfg))


def layer_params(cfg: ModelConfig, family: Family) -> int:
    return sum(s.numel() for s in family.layer_specs(cfg))


def active_layer_params(cfg: ModelConfig, family: Family) -> int:
    """Parameters one token multiplies by in one layer: all of them, except in a mixture of
    experts (there: the shared part and the top-k experts it is routed to)."""
    return family.active_layer_params(cfg) if family.active_layer_params else layer_params(cfg, family)


def global_weight_bytes(cfg: ModelConfig, family: Family, dtype: torch.dtype) -> int:
    """Embeddings, final norm and head (a tied head counted once); always kept in memory."""
    tied = set(family.tied_aliases(cfg))
    return sum(s.numel() for s in family.global_specs(cfg) if s.name not in tied) * element_size(dtype)


def weight_memory(cfg: ModelConfig, family: Family, policy: Policy, dtype: torch.dtype,
                  device: torch.device = torch.device("cpu")) -> MemoryPlan:
    """Memory the weights of `policy` need: resident fractions plus the two layer read slots
    (and on a GPU the copies of streamed layers there: the one computing, the one loading,
    and the one just dropped that the allocator frees once its kernels have run)."""
    plan = MemoryPlan()
    plan.add(True, "embeddings and head", global_weight_bytes(cfg, family, dtype))
    per_layer = layer_weight_bytes(cfg, family, dtype, policy.weight_quant)
    plan.add(True, "weights", per_layer * cfg.num_layers * policy.weights_device)
    plan.add(False, "weights", per_layer * cfg.num_layers * policy.weights_host)
    if policy.weights_disk > 0:
        plan.add(False, "weight read buffers", 2 * per_layer * policy.weights_disk + 2 * 4096 * 32)
    if device.type == "cuda":
        plan.add(True, "streamed layer weights", 3 * per_layer * (1 - policy.weights_device))
    if policy.compress_weight:
        # large batches dequantize a layer once per load, freed after its last GPU batch
        plan.add(True, "dequantized layer weights", layer_params(cfg, family) * element_size(dtype))
    return plan


def scoring_memory(cfg: ModelConfig, family: Family, policy: Policy, dtype: torch.dtype, rows: int, width: int,
                   device: torch.device = torch.device("cpu")) -> MemoryPlan:
    """What one block of `rows` packed rows of `width` tokens needs when scored, a prefill pass
    that keeps no KV cache (engine/scoring.py): the weights, the block's activations (in GPU
    batches of the policy's size), the runtime."""
    plan = weight_memory(cfg, family, policy, dtype, device)
    gbs = max(1, min(policy.gpu_batch_size, rows))
    shaped = replace(policy, gpu_batch_size=gbs, num_gpu_batches=max(1, -(-rows // gbs)))
    plan.add(True, "activations and temporaries", working_bytes(cfg, shaped, dtype, width, width))
    plan.add(False, "runtime overhead", RUNTIME_OVERHEAD)
    return plan


def run_memory(cfg: ModelConfig, family: Family, policy: Policy, dtype: torch.dtype, batch_size: int,
               capacity: int, prompt_width: int, device: torch.device = torch.device("cpu")) -> MemoryPlan:
    """Everything a block of `batch_size` sequences of up to `capacity` tokens needs."""
    plan = weight_memory(cfg, family, policy, dtype, device)
    per_seq = kv_bytes_per_token(cfg, dtype, policy.cache_quant) * capacity * cfg.num_layers
    plan.add(True, "KV cache", per_seq * batch_size * policy.cache_device)
    plan.add(False, "KV cache", per_seq * batch_size * policy.cache_host)
    staging = KV_IN_FLIGHT * per_seq / cfg.num_layers * policy.gpu_batch_size  # caches in flight
    plan.add(False, "KV staging buffers", staging * policy.cache_disk)
    if kv_route(policy, device.type == "cuda").rows_to_device:
        # host and disk rows are attended on the GPU, copied into device buffers
        plan.add(True, "KV staging buffers", staging * (policy.cache_disk + policy.cache_host))
    if policy.compress_cache:
        # caches in flight are held dequantized for attention; each sequence keeps its
        # last cache_window tokens unquantized too
        dense = kv_bytes_per_token(cfg, dtype)
        plan.add(True, "dequantized KV in flight", KV_IN_FLIGHT * dense * capacity * policy.gpu_batch_size)
        window = min(policy.cache_window, capacity) * dense * cfg.num_layers * batch_size
        plan.add(True, "recent KV window", window * policy.cache_device)
        plan.add(False, "recent KV window", window * policy.cache_host)
        # a disk segment's window rows are read into host buffers too, like its quantized rows
        plan.add(False, "KV staging buffers", KV_IN_FLIGHT * window / cfg.num_layers / batch_size
                 * policy.gpu_batch_size * policy.cache_disk)
    plan.add(True, "activations and temporaries", working_bytes(cfg, policy, dtype, prompt_width, capacity))
    plan.add(False, "runtime overhead", RUNTIME_OVERHEAD)
    return plan
