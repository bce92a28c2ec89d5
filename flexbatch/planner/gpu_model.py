"""The cost model on a machine with a GPU: FlexGen's per-layer terms (paper §4.3; the study's
§5.3) for weights and KV cache over three tiers, GPU memory, host RAM and disk.

Placement variables x = the Policy's (weights_device, weights_host, cache_device, cache_host),
written w_gpu, w_host, c_gpu, c_host below; what is on neither is on disk: w_disk = 1 - w_gpu
- w_host, and w_off = 1 - w_gpu is what crosses the host-GPU link every layer load. Every term
is linear in x (planner/terms.py), so the search solves a linear program over x for each
(gpu_batch_size, num_gpu_batches).

Per layer and per block of B sequences (prompt s, t = s + n / 2 the mean context over the
generation, W / K the layer's weight bytes and one token's K and V bytes as stored, Kd the
same in the compute dtype, H / G the link to / from the GPU, R / Wr the disk):

    weight_load = W * w_disk / R + W * w_off / H          (disk then link, one I/O thread)
    cache_load  = B t K * c_disk / Rkv + B t K * c_off / H  (decode; CPU attention: disk part only)
    cache_store = B s K * (c_off / G + c_disk / Wr)        (prefill; decode: B K instead of B s K)

Rkv is the disk's rate for decode's own KV reads (one large request at a time while the
GPU computes: `DiskRates.kv_read_bps`). A compressed cache keeps each sequence's last
`cache_window` tokens dense as well: "t K" is then `sizing.kv_stored_bytes` (what is read),
a decode step appends a dense row too, and only the tokens before the window are decoded.
    disk        = every disk read and write above          (one disk)
    host_to_gpu / gpu_to_host = every link copy above      (one link each way)
    compute     = matmuls at the GPU's rate for its rows, prompt attention, decode attention
                  over the cache's bytes at the GPU's attention rate, or with CPU attention
                  the off-GPU part at the CPU's rate over host rows, plus the queries and
                  outputs that then cross the link

FlexGen's T = max(...) over its I/O directions and compute becomes a max over these lanes:
the loads, stores and compute run on their own threads and CUDA streams, each lane is a lower
bound on the layer's time, and the disk and the link are each shared by the lanes that use
them. Without overlap a layer takes the sum of the threads' lanes.

Beyond FlexGen: each (layer, GPU batch) operation costs the engine a measured time on the
compute thread (profiling/engine_probe.py: Python, kernel launches, waiting for a load and handing
results between threads; on a CPU the per-row matmul rates absorb it):

    compute += num_gpu_batches * (op_compute [+ op_cache_load or op_cpu_attention])

the second term when part of the KV cache is off the GPU (`cache_device` < 1: the search
plans "KV cache all on the GPU" as its own case, so the term stays constant in x). Measured
on an H100, a lane formulation fits better than adding it after the max: the copies keep
streaming while the compute thread does that work.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..config import Policy
from ..kernels.packed import element_size
from ..models.family import Family
from ..models.spec import ModelConfig
from ..sizing import (
    active_layer_params,
    dense_window,
    kv_bytes_per_token,
    kv_route,
    kv_stored_bytes,
    layer_params,
    layer_weight_bytes,
)
from .machine import MachineModel
from .profile import ComputeRates
from .terms import LayerCosts, Workload, prefill_seconds, weight_matmul_seconds

ONE, W_GPU, W_HOST, C_GPU, C_HOST = np.eye(5)
W_OFF, W_DISK = ONE - W_GPU, ONE - W_GPU - W_HOST
C_OFF, C_DISK = ONE - C_GPU, ONE - C_GPU - C_HOST
THREAD_LANES = ("weight_load", "cache_load", "cache_store", "compute")  # without overlap these run in turn


class GpuModel(MachineModel):
    variables = ("weights_device", "weights_host", "cache_device", "cache_host")
    device = torch.device("cuda")
    unified = False

    def __init__(self, profile):
        if profile.gpu is None:
            from ..errors import ConfigError

            raise ConfigError("the hardware profile has no GPU measurements; run `flexbatch profile --force` on "
                              "this machine with the GPU visible.")
        super().__init__(profile)

    @property
    def rates(self) -> ComputeRates:
        return self.profile.gpu.compute

    def batch_sizes(self, dtype: torch.dtype, sizes: tuple[int, ...]) -> tuple[list[int], list[int]]:
        # the per-operation costs are priced here, and a GPU's decode matmuls stay far below
        # its peak at any batch that fits: every size is worth trying
        return list(sizes), []

    def variants(self, compression: dict) -> list[dict]:
        """The KV cache all on the GPU, and free to leave it, attended on the GPU or (a plain
        cache) on the CPU: the engine's per-operation cost differs between them."""
        free = dict(cache_device=0.0, cache_host=0.0)
        attention = {kv_route(Policy(cpu_attention=flag, **compression), gpu=True).cpu_attention
                     for flag in (False, True)}
        return [dict(cache_device=1.0)] + [dict(free, cpu_attention=flag) for flag in sorted(attention)]

    def bounds(self, template: Policy) -> list[tuple[float, float]]:
        pinned = template.cache_device == 1  # the "KV cache all on the GPU" case
        return [(0.0, 1.0), (0.0, 1.0), (1.0, 1.0) if pinned else (0.0, 1.0), (0.0, 0.0) if pinned else (0.0, 1.0)]

    def fraction_groups(self) -> list[tuple[int, ...]]:
        return [(0, 1), (2, 3)]  # weights_device + weights_host <= 1, cache_device + cache_host <= 1

    def with_placement(self, policy: Policy, x) -> Policy:
        placed = super().with_placement(policy, x)
        # nothing is left to attend on the CPU when the whole KV cache is on the GPU
        return replace(placed, cpu_attention=placed.cpu_attention and placed.cache_device < 1)

    def tier_reward(self, variable: str) -> float:
        return 2.0 if variable.endswith("device") else 1.0

    def layer_costs(self, cfg: ModelConfig, family: Family, dtype: torch.dtype, policy: Policy,
                    work: Workload) -> LayerCosts:
        """The lanes of one layer for `policy`'s batch sizes, flags and compression."""
        gpu, disk = self.profile.gpu, self.profile.disk
        rates = gpu.compute
        B, gbs, s = policy.block_size, policy.gpu_batch_size, work.prompt_len
        t = s + work.gen_len / 2
        W = layer_weight_bytes(cfg, family, dtype, policy.weight_quant)
        K, Kd = kv_bytes_per_token(cfg, dtype, policy.cache_quant), kv_bytes_per_token(cfg, dtype)
        H, G, R, Wr = gpu.host_to_gpu_bps, gpu.gpu_to_host_bps, disk.read_bps, disk.write_bps
        cpu_attention = kv_route(policy, gpu=True).cpu_attention
        bits = policy.compress_bits if policy.compress_weight else None
        params, active = layer_params(cfg, family), active_layer_params(cfg, family)
        weight_in = {"disk": W * W_DISK / R, "link": W * W_OFF / H}
        operations = _operation_seconds(gpu.op_seconds, policy, cpu_attention)

        prompt_compute = prefill_seconds(rates, dtype, bits, params, active, cfg.attention_width, B, gbs, work,
                                         policy.all_in_memory("cuda"))
        # as stored: a compressed cache's quantized rows and its dense window (sizing.kv_stored_bytes),
        # read from disk at decode's own KV read rate, as the CPU model prices them
        stored = lambda tokens: B * kv_stored_bytes(cfg, dtype, policy, tokens)
        kv_read = disk.kv_read_bps if policy.overlap else R
        pre_store = {"disk": stored(s) * C_DISK / Wr, "link": stored(s) * C_OFF / G}
        pre = _lanes(weight_in, {}, pre_store, (prompt_compute + operations["pre"]) * ONE, {})

        attended = B * t * Kd
        if policy.compress_cache:  # rows decode where they live: on the GPU, or on the CPU and then cross dense
            decoded = B * (t - dense_window(policy, t)) * Kd  # the window is kept dense
            cache_in = {"disk": stored(t) * C_DISK / kv_read, "link": attended * C_OFF / H,
                        "decode": decoded * (C_GPU / rates.kv_decode_bps + C_OFF / self.profile.cpu.kv_decode_bps)}
        else:
            link = 0 * ONE if cpu_attention else stored(t) * C_OFF / H
            cache_in = {"disk": stored(t) * C_DISK / kv_read, "link": link}
        appended = B * (K + (Kd if dense_window(policy, t) else 0))  # the new token, also into the window
        gen_store = {"disk": appended * C_DISK / Wr, "link": appended * C_OFF / G}
        compute = (weight_matmul_seconds(rates, dtype, bits, params, B, gbs, 1, active) + operations["gen"]) * ONE
        crossing = {}
        if cpu_attention:
            # queries go to the CPU (keys and values are the stored rows) and outputs come back
            crossing = {"to_gpu": B * cfg.hidden_size * element_size(dtype) * C_OFF / H,
                        "to_host": B * cfg.hidden_size * element_size(dtype) * C_OFF / G}
            compute = compute + attended * (C_GPU / rates.attention_rate(dtype) + C_OFF / gpu.cpu_attention_bps) \
                + crossing["to_gpu"] + crossing["to_host"]
        else:
            compute = compute + attended * ONE / rates.attention_rate(dtype)
        gen = _lanes(weight_in, cache_in, gen_store, compute, crossing)
        return LayerCosts(pre, gen, THREAD_LANES)


def _operation_seconds(measured: dict[str, float], policy: Policy, cpu_attention: bool) -> dict[str, float]:
    """The engine's per-operation seconds of one layer, by phase (see the module's docstring)."""
    per_op = measured.get("compute", 0.0)
    decode = per_op
    if policy.cache_device < 1:
        decode += measured.get("cpu_attention" if cpu_attention else "cache_load", 0.0)
    return {"pre": policy.num_gpu_batches * per_op, "gen": policy.num_gpu_batches * decode}


def _lanes(weight_in: dict, cache_in: dict, store: dict, compute: np.ndarray, crossing: dict) -> dict:
    """Each lane's seconds from the parts of one phase (all arrays over ONE and the variables)."""
    zero = 0 * ONE
    cache_load = cache_in.get("disk", zero) + cache_in.get("link", zero) + cache_in.get("decode", zero)
    return {
        "weight_load": weight_in["disk"] + weight_in["link"],
        "cache_load": cache_load,
        "cache_store": store["disk"] + store["link"],
        "compute": compute,
        "disk": weight_in["disk"] + cache_in.get("disk", zero) + store["disk"],
        "host_to_gpu": weight_in["link"] + cache_in.get("link", zero) + crossing.get("to_gpu", zero),
        "gpu_to_host": store["link"] + crossing.get("to_host", zero),
    }
