"""What one (layer, GPU batch) operation of the engine costs beyond its bytes and FLOPs.

On a GPU the block schedule's per-operation work (Python, kernel launches, a load's wait
for its copies, handing a result between threads) is not hidden by bandwidth the way it is
on a CPU: on an H100, 32 x 8 sequences streaming their KV cache from host RAM took 30% longer
than 64 x 4 moving the same bytes. The cost model charges it per operation; this probe
measures it by running the real engine on a tiny model, whose bytes and FLOPs are negligible,
so what is left is the per-operation time.
"""
from __future__ import annotations

import statistics
import tempfile
import time

import torch

from ..config import Policy
from ..models import get_family
from ..models.spec import ModelConfig, config_from_hf_dict

TINY = {"model_type": "opt", "vocab_size": 128, "hidden_size": 64, "ffn_dim": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "max_position_embeddings": 256}
BATCHES = 8  # GPU batches of one sequence each: many operations, few bytes
PROMPT, STEPS = 8, 12


class RandomSource:
    """A TensorSource of random tensors with the shapes a config implies (no file)."""

    def __init__(self, cfg: ModelConfig):
        family = get_family(cfg)
        shapes = {s.name: s.shape for s in family.global_specs(cfg)}
        for j in range(cfg.num_layers):
            shapes.update({family.layer_prefix(j) + s.name: s.shape for s in family.layer_specs(cfg)})
        self._shapes = shapes

    def names(self) -> set[str]:
        return set(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str) -> torch.Tensor:
        return torch.randn(self._shapes[name]) * 0.02


def operation_seconds(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Seconds per (layer, GPU batch) of a decode step: "compute" with everything on the
    device, and what a KV cache in host RAM adds to it, attended on the device
    ("cache_load") or on the CPU ("cpu_attention")."""
    cfg = config_from_hf_dict(TINY)
    on_host = dict(cache_device=0.0, cache_host=1.0)
    policies = {"compute": Policy(gpu_batch_size=1, num_gpu_batches=BATCHES),
                "cache_load": Policy(gpu_batch_size=1, num_gpu_batches=BATCHES, **on_host),
                "cpu_attention": Policy(gpu_batch_size=1, num_gpu_batches=BATCHES, cpu_attention=True, **on_host)}
    per_op = {name: _decode_step_seconds(cfg, policy, device, dtype) / (cfg.num_layers * BATCHES)
              for name, policy in policies.items()}
    compute = per_op.pop("compute")
    return {"compute": compute, **{name: max(0.0, seconds - compute) for name, seconds in per_op.items()}}


def _decode_step_seconds(cfg: ModelConfig, policy: Policy, device: torch.device, dtype: torch.dtype) -> float:
    """The median wall time of a decode step of the offloading engine."""
    from ..engine.offload_runner import OffloadRunner

    capacity = PROMPT + STEPS + 1
    with tempfile.TemporaryDirectory(prefix="flexbatch-probe-") as folder:
        runner = OffloadRunner(cfg, get_family(cfg), RandomSource(cfg), policy, dtype, device, folder)
        try:
            runner.begin(BATCHES, capacity, PROMPT)
            ids = torch.randint(0, cfg.vocab_size, (BATCHES, PROMPT))
            valid = torch.ones(BATCHES, capacity, dtype=torch.bool)
            runner.step(ids, valid[:, :PROMPT], 0)
            times = []
            for position in range(PROMPT, PROMPT + STEPS):
                start = time.perf_counter()
                runner.step(ids[:, :1], valid[:, :position + 1], position)  # returns logits on the host: synced
                times.append(time.perf_counter() - start)
        finally:
            runner.close()
    return statistics.median(times)
