"""FlexGen's cost model (paper §4.3; the study's §5) on a CPU-only machine (gpu_cost.py has
the model for a machine with a GPU; both give terms to the same search).

Time of one block of B = gpu_batch_size * num_gpu_batches sequences, prompt s, n new tokens:

    T = L * T_pre + L * (n - 1) * T_gen                      (per-layer terms, L layers)
    T_pre = max(io_pre, comp_pre)   (sum instead of max without overlap)
    T_gen = max(io_gen, comp_gen)
    io_pre  = w_disk * W / R + c_disk * B * s * K / Wr
    io_gen  = w_disk * W / R + c_disk * B * t * K / R + c_disk * B * K / Wr,   t = s + n / 2
    comp_pre = B * s * 2 * P / Fw(gbs * s) + B * 2 * s^2 * C / F(gbs * s) + cpu_io * io_pre
    comp_gen = B * 2 * P / Fw(gbs) + B * t * Kd / A [+ B * t * Kd / Dq] + cpu_io * io_gen

W: one layer's weight bytes as stored, P: its parameters, K: KV bytes per token per layer as
stored, Kd: the same in the compute dtype, C: hidden size, R / Wr: disk read / write
bandwidth (R measured while the CPU computes when I/O overlaps compute), F(rows): measured
matmul FLOP/s at that many rows, Fw: the same with the weights as stored (compressed weights
cost the cheaper of the fused int4 kernel, measured, and one measured dequantization per
layer load plus dense matmuls).

Two terms go beyond FlexGen's, both measured by the profile because a CPU is not a GPU:
decode attention is bound by memory, not FLOPs, so it costs the cache's bytes over the
measured attention rate A (and, for a compressed cache, over the measured dequantization
rate Dq); and overlapped disk reads slow the matmuls on the same cores, so every second of
overlapped I/O adds cpu_io = (1 - f) seconds of compute, f being the measured share of
matmul speed left while the disk reads.

Throughput = B * n / T. On a CPU-only machine the device and host tiers are the same RAM, so
the placement variables are the memory fractions w_mem = 1 - w_disk and c_mem = 1 - c_disk.
Every term is linear in (w_mem, c_mem) for a fixed (gbs, num_gpu_batches): the search solves
a linear program over them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Policy
from ..engine.memory import kv_bytes_per_token, layer_params, layer_weight_bytes
from ..models.family import Family
from ..models.spec import ModelConfig
from .hardware import HardwareProfile


@dataclass(frozen=True)
class Workload:
    prompt_len: int
    gen_len: int


@dataclass(frozen=True)
class LayerCosts:
    """Per-layer time terms as `(constant, slope_w, slope_c)`: seconds at memory fractions
    (w_mem, c_mem) are constant + slope_w * w_mem + slope_c * c_mem."""

    io_pre: tuple[float, float, float]
    io_gen: tuple[float, float, float]
    comp_pre: tuple[float, float, float]
    comp_gen: tuple[float, float, float]
    variables = ("w_mem", "c_mem")

    def lanes(self, phase: str) -> list[tuple[float, float, float]]:
        """The terms that overlap ("pre" or "gen"): the layer takes the longest."""
        return [getattr(self, f"io_{phase}"), getattr(self, f"comp_{phase}")]

    def serial(self, phase: str) -> tuple[float, ...]:
        """The layer's time without overlap."""
        return tuple(a + b for a, b in zip(*self.lanes(phase)))

    @staticmethod
    def placement(policy: Policy) -> tuple[float, float]:
        return policy.weights_device + policy.weights_host, policy.cache_device + policy.cache_host


def term_value(term, x) -> float:
    """A term [constant, slope per variable] at placement x."""
    return float(term[0] + sum(slope * v for slope, v in zip(term[1:], x)))


def layer_costs(cfg: ModelConfig, family: Family, dtype: torch.dtype, hw: HardwareProfile,
                policy: Policy, work: Workload) -> LayerCosts:
    """The per-layer terms for `policy`'s batch sizes; disk terms count bytes as stored
    (compressed weights and KV cache move fewer bytes)."""
    gpu_batch_size = policy.gpu_batch_size
    batch = policy.block_size
    s, n = work.prompt_len, work.gen_len
    t = s + n / 2
    weight = layer_weight_bytes(cfg, family, dtype, policy.weight_quant)
    params = layer_params(cfg, family)
    kv, kv_dense = kv_bytes_per_token(cfg, dtype, policy.cache_quant), kv_bytes_per_token(cfg, dtype)
    read, write = hw.disk_read_bps, hw.disk_write_bps
    if policy.overlap and hw.disk_read_busy_bps:
        read = hw.disk_read_busy_bps  # overlapped reads compete with compute for the cores
    # w_disk = 1 - w_mem: a disk term a * w_disk is a - a * w_mem
    weight_io = weight / read
    cache_pre = batch * s * kv / write
    cache_gen = batch * t * kv / read + batch * kv / write
    io_pre = (weight_io + cache_pre, -weight_io, -cache_pre)
    io_gen = (weight_io + cache_gen, -weight_io, -cache_gen)
    bits = policy.compress_bits if policy.compress_weight else None
    f_pre = hw.flops(dtype, gpu_batch_size * s)
    attention = batch * t * kv_dense / hw.attention_bps
    if policy.compress_cache:
        attention += batch * t * kv_dense / hw.kv_decode_bps
    comp_pre = weight_matmul_seconds(hw, dtype, bits, params, batch, gpu_batch_size, s) \
        + batch * 2 * s * s * cfg.hidden_size / f_pre
    comp_gen = weight_matmul_seconds(hw, dtype, bits, params, batch, gpu_batch_size, 1) + attention
    io_cpu = (1 - hw.compute_share_during_reads) if policy.overlap else 0.0
    return LayerCosts(
        io_pre=io_pre,
        io_gen=io_gen,
        comp_pre=(comp_pre + io_cpu * io_pre[0], io_cpu * io_pre[1], io_cpu * io_pre[2]),
        comp_gen=(comp_gen + io_cpu * io_gen[0], io_cpu * io_gen[1], io_cpu * io_gen[2]),
    )


def weight_matmul_seconds(hw: HardwareProfile, dtype: torch.dtype, bits: int | None, params: int, batch: int,
                          gpu_batch_size: int, rows_per_sequence: int) -> float:
    """One layer's weight matmuls for the whole block (`batch` sequences, `rows_per_sequence`
    token rows each, in GPU batches of gpu_batch_size). Compressed weights take the cheaper
    of the two ways the engine has: the fused int4 kernel per GPU batch, or one
    dequantization per layer load shared by every GPU batch, then dense matmuls."""
    flop = batch * rows_per_sequence * 2 * params
    rows = gpu_batch_size * rows_per_sequence
    dense = flop / hw.flops(dtype, rows)
    if not bits:
        return dense
    rate = hw.dequantize_params_per_s.get(f"int{bits}")
    dense += params / rate if rate else 0.0
    fused = hw.flops(dtype, rows, bits)
    return min(dense, flop / fused) if fused else dense


def head_seconds(cfg: ModelConfig, dtype: torch.dtype, rates, gpu_batch_size: int, batch: int,
                 gen_len: int) -> float:
    """The output projection runs once per generated token of every sequence (on the device
    whose `rates` are given: the profile's CPU part, or its GPU part)."""
    flops = batch * gen_len * 2 * cfg.vocab_size * cfg.hidden_size
    return flops / rates.flops(dtype, gpu_batch_size)


def block_seconds(costs, num_layers: int, gen_len: int, x, overlap: bool = True,
                  head: float = 0.0) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one block at placement x (`costs.variables`):
    a layer takes its longest lane when loads, stores and compute overlap, their sum if not."""

    def layer(phase: str) -> float:
        if overlap:
            return max(term_value(lane, x) for lane in costs.lanes(phase))
        return term_value(costs.serial(phase), x)

    return num_layers * layer("pre"), num_layers * (gen_len - 1) * layer("gen") + head
