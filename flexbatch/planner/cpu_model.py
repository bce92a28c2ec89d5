"""FlexGen's cost model (paper §4.3; the study's §5) on a CPU-only machine (gpu_model.py has
the model for a machine with a GPU; both are `MachineModel`s the same search uses).

Time of one block of B = gpu_batch_size * num_gpu_batches sequences, prompt s, n new tokens:

    T = L * T_pre + L * (n - 1) * T_gen                      (per-layer terms, L layers)
    T_pre = max(io_pre, comp_pre)   (sum instead of max without overlap)
    T_gen = max(io_gen, comp_gen)   (few GPU batches; with more, see the window below)
    io_pre  = w_disk * W / R + c_disk * B * s * K / Wr
    io_gen  = w_disk * W / R + c_disk * B * t * K / Rkv + c_disk * B * K / Wr,   t = s + n / 2
    (a compressed cache keeps its last cache_window tokens at Kd as well: sizing.kv_stored_bytes)
    comp_pre = B * s * 2 * P / Fw(gbs * s) + B * 2 * s^2 * C / Fa + cpu_io * io_pre
    comp_gen = B * 2 * P / Fw(B) + B * t * Kd / A [+ B * t * Kd / Dq] + cpu_io * io_gen
    T_gen = max(io_gen, comp_gen, window)   with n = num_gpu_batches > a GPU batches, where
    window = B * 2 * P / Fw(B) + attention * a / n + (n - a) / n * kv_in
             + cpu_io * (w_disk * W / R + kv_in * a / n),   kv_in = c_disk * B * t * K / Rkv
    (a decode step reads the GPU batches' caches a = CACHES_READ_AHEAD ahead of the one
    attention is at: only the first a overlap the matmuls; `attention_window`)

(with a prompt prefix of p tokens that every sequence shares, prefill computes it once and
each sequence's s - p others over it, terms.prefill_seconds; in memory a decode step reads
t - p tokens of each row and attends to the prefix once, `decode_attention_seconds`)

W: one layer's weight bytes as stored, P: its parameters, K: KV bytes per token per layer as
stored, Kd: the same in the compute dtype, C: the query heads times the head dim, Fa: the
measured attention rate of many queries per sequence (the matmul rate if not measured),
R / Wr: disk read / write bandwidth (R measured while the CPU computes when I/O overlaps
compute; Rkv the same for reads as decode makes them, one large request per K or V
prefix), F(rows): measured matmul FLOP/s at that many rows, Fw: the same with the weights
as stored (compressed weights cost the cheaper of the fused int4 kernel, measured, and one
measured dequantization per layer load plus dense matmuls).

A decode step multiplies the whole block by each weight at once (the engine computes each
layer once for all its GPU batches on a CPU), hence Fw(B); a prompt's rows go a GPU batch at
a time. Two terms go beyond FlexGen's, both measured by the profile because a CPU is not a GPU:
decode attention is bound by memory, not FLOPs, so it costs the cache's bytes over the
measured attention rate A of the engine's kernel (and, for a compressed cache, over the
measured dequantization rate Dq); and overlapped disk reads slow the matmuls on the same
cores, so every second of overlapped I/O adds cpu_io = (1 - f) seconds of compute, f being
the measured share of matmul speed left while the disk reads.

Throughput = B * n / T. On a CPU-only machine the device and host tiers are the same RAM, so
the placement variables are the Policy's `weights_device` and `cache_device` (what is in
memory; w_disk = 1 - weights_device, c_disk = 1 - cache_device, and the host shares stay 0).
Every term is linear in them for a fixed (gbs, num_gpu_batches): the search solves a linear
program over them.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..config import Policy
from ..models.family import Family
from ..models.spec import ModelConfig
from ..sizing import (
    CACHES_READ_AHEAD,
    active_layer_params,
    dense_window,
    kv_bytes_per_token,
    kv_stored_bytes,
    layer_params,
    layer_weight_bytes,
)
from .machine import MachineModel
from .profile import ComputeRates
from .terms import LayerCosts, Workload, prefill_seconds, weight_matmul_seconds

ONE, W_MEM, C_MEM = np.eye(3)
W_DISK, C_DISK = ONE - W_MEM, ONE - C_MEM
MIN_MATMUL_EFFICIENCY = 0.5  # see `CpuModel.batch_sizes`


class CpuModel(MachineModel):
    variables = ("weights_device", "cache_device")
    device = torch.device("cpu")
    unified = True

    @property
    def rates(self) -> ComputeRates:
        return self.profile.cpu

    def placement(self, policy: Policy) -> np.ndarray:
        # the device and host tiers are the same RAM here: both count as in memory
        return np.array([policy.weights_device + policy.weights_host, policy.cache_device + policy.cache_host])

    def with_placement(self, policy: Policy, x) -> Policy:
        w_mem, c_mem = (float(v) for v in x)
        return replace(policy, weights_device=w_mem, weights_host=0.0, cache_device=c_mem, cache_host=0.0)

    def batch_sizes(self, dtype: torch.dtype, sizes: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """GPU batch sizes at which a matmul of that many rows runs below
        MIN_MATMUL_EFFICIENCY of the machine's peak are tried only when no larger one fits:
        there, per-operation costs this model does not price (many small loads, stores and
        kernel calls per layer) dominate, and predictions were measured to be optimistic (8 x
        8 sequences ran 32% below its prediction on the planner benchmark, while 64 x 1 was
        within 4%; measured before decode steps multiplied the whole block at once)."""
        peak = max(self.rates.flops(dtype, rows) for rows in (1 << p for p in range(14)))
        efficient = [g for g in sizes if self.rates.flops(dtype, g) >= MIN_MATMUL_EFFICIENCY * peak]
        return efficient, [g for g in sizes if g not in efficient]

    def variants(self, compression: dict) -> list[dict]:
        return [{}]

    def layer_costs(self, cfg: ModelConfig, family: Family, dtype: torch.dtype, policy: Policy,
                    work: Workload) -> LayerCosts:
        """The per-layer terms for `policy`'s batch sizes; disk terms count bytes as stored
        (compressed weights and KV cache move fewer bytes)."""
        cpu, disk = self.profile.cpu, self.profile.disk
        gpu_batch_size, batch = policy.gpu_batch_size, policy.block_size
        s, n = work.prompt_len, work.gen_len
        t = s + n / 2
        weight = layer_weight_bytes(cfg, family, dtype, policy.weight_quant)
        params, active = layer_params(cfg, family), active_layer_params(cfg, family)
        kv, kv_dense = kv_bytes_per_token(cfg, dtype, policy.cache_quant), kv_bytes_per_token(cfg, dtype)
        read = disk.read_busy_bps if policy.overlap and disk.read_busy_bps else disk.read_bps
        # overlapped reads compete with compute for the cores (read_busy_bps)
        weight_io = weight * W_DISK / read
        # a compressed cache keeps each sequence's last cache_window tokens dense as well as
        # quantized: both are read, and the new token is written both ways
        stored = lambda tokens: kv_stored_bytes(cfg, dtype, policy, tokens)
        appended = kv + (kv_dense if dense_window(policy, t) else 0)
        io_pre = weight_io + batch * stored(s) * C_DISK / disk.write_bps
        kv_read = disk.kv_read_bps if policy.overlap else disk.read_bps
        cache_in = batch * stored(t) * C_DISK / kv_read
        io_gen = weight_io + cache_in + batch * appended * C_DISK / disk.write_bps
        bits = policy.compress_bits if policy.compress_weight else None
        attention = decode_attention_seconds(cfg, dtype, cpu, policy, work, kv_dense)
        if policy.compress_cache:
            attention += batch * (t - dense_window(policy, t)) * kv_dense / cpu.kv_decode_bps
        comp_pre = prefill_seconds(cpu, dtype, bits, params, active, cfg.attention_width, batch, gpu_batch_size, work,
                                   policy.all_in_memory("cpu"))
        # a decode step's matmuls take the whole block's rows at once (engine/offload_steps.py)
        matmuls = weight_matmul_seconds(cpu, dtype, bits, params, batch, batch, 1, active)
        io_cpu = (1 - disk.compute_share_during_reads) if policy.overlap else 0.0
        gen = {"io": io_gen, "compute": (matmuls + attention) * ONE + io_cpu * io_gen}
        if policy.num_gpu_batches > CACHES_READ_AHEAD:
            gen["attention_window"] = attention_window(matmuls, attention, cache_in, weight_io, io_cpu,
                                                       policy.num_gpu_batches)
        return LayerCosts(pre={"io": io_pre, "compute": comp_pre * ONE + io_cpu * io_pre}, gen=gen,
                          serial_lanes=("io", "compute"))


def attention_window(matmuls: float, attention: float, cache_in: np.ndarray, weight_io: np.ndarray,
                     io_cpu: float, num_gpu_batches: int) -> np.ndarray:
    """A decode layer over the whole block as the executor runs it (`BlockCaches`): the first
    a = CACHES_READ_AHEAD of its n GPU batches' caches are read during the matmuls (with the
    weights); each later one once attention reaches the one a before it, so (n - a) / n of
    the cache reads queue behind attention. On a disk slower than attention that window,
    not the longest lane, sets the pace (reading one cache ahead, 16 x 16 ran 28% below a
    prediction without it, 64 x 4 9% above)."""
    n, a = num_gpu_batches, CACHES_READ_AHEAD
    during_matmuls = weight_io + cache_in * a / n
    return (matmuls + attention * a / n) * ONE + io_cpu * during_matmuls + (n - a) / n * cache_in


def decode_attention_seconds(cfg: ModelConfig, dtype: torch.dtype, cpu: ComputeRates, policy: Policy, work: Workload,
                             kv_dense: int) -> float:
    """One layer's decode attention for the block: each row's cached keys and values read at
    the measured rate. With everything in memory, rows that share a prompt prefix attend to
    it once per step for all of them, as many-query attention (engine/runner.py), and read
    only the rest of their row; the offloading runner reads every row's copy of it."""
    in_memory = policy.all_in_memory("cpu")
    batch, t = policy.block_size, work.computed_prompt_len(True) + work.gen_len / 2
    shared = work.shared_prefix if in_memory else 0
    seconds = batch * (t - shared) * kv_dense / cpu.attention_rate(dtype)
    if shared:
        # each row's queries over the prefix: scores and weighted values
        seconds += cpu.attention_seconds(dtype, policy.gpu_batch_size, batch * 4 * shared * cfg.attention_width)
    return seconds

