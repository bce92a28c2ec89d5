"""The hardware profile: what the cost model knows about a machine, as plain data.

Measuring it is flexbatch/profiling/'s job; the planner only reads it, so a plan for a
machine can be made anywhere from its profile (a GPU's profile, too, without CUDA here).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..kernels import KernelChoice

INF = float("inf")


def table_rate(tables: dict[str, dict[int, float]], dtype: torch.dtype, rows: int,
               packed_bits: int | None = None) -> float | None:
    """FLOP/s for a matmul with `rows` rows from measured tables, linear between measured
    points (and proportional to rows below the first); `packed_bits` for the fused kernel on
    weights of that many bits (None where there is none)."""
    key = f"int{packed_bits}" if packed_bits else str(dtype).removeprefix("torch.")
    table = tables.get(key)
    if not table:
        if packed_bits:
            return None
        table = tables.get("float32") or next(iter(tables.values()))  # a GPU's table: bf16 for fp16 too
    points = sorted((int(k), v) for k, v in table.items())
    if rows <= points[0][0]:
        return points[0][1] * rows / points[0][0]
    for (r0, f0), (r1, f1) in zip(points, points[1:]):
        if rows <= r1:
            return f0 + (f1 - f0) * (rows - r0) / (r1 - r0)
    return points[-1][1]


@dataclass(frozen=True)
class ComputeRates:
    """How fast one processor (the CPU, or the GPU) does what the cost model prices."""

    # matmul FLOP/s by number of rows (interpolated in between): "bfloat16", "float32", and
    # "int4" for torch's fused kernel on 4-bit weights (absent where torch has none)
    matmul_flops: dict[str, dict[int, float]]
    # decode attention as the engine computes it (on a CPU, the C kernel that reads only the
    # keys each query sees): bytes of visible K and V per second, by compute dtype (as
    # matmul_flops: a CPU without fast bf16 attends ~9x faster in fp32)
    attention_bps: dict[str, float] = field(default_factory=dict)
    kv_decode_bps: float = INF  # a compressed KV cache dequantized, bytes of the compute dtype per second
    # compressed weights: parameters dequantized per second, by format ("int4", "int8")
    dequantize_params_per_s: dict[str, float] = field(default_factory=dict)
    # the attention of many queries per sequence (a prompt's, a decode step's shared prefix),
    # FLOP/s; None (a profile without it): priced at the matmul rate
    prompt_attention_flops: float | None = None

    def flops(self, dtype: torch.dtype, rows: int, packed_bits: int | None = None) -> float | None:
        """Measured FLOP/s for a matmul with `rows` rows (see `table_rate`)."""
        return table_rate(self.matmul_flops, dtype, rows, packed_bits)

    def scaled(self, factor: float) -> "ComputeRates":
        """These rates with every compute-bound one (matmuls, dequantization) times `factor`."""
        flops = {name: {rows: v * factor for rows, v in table.items()} for name, table in self.matmul_flops.items()}
        dequantize = {name: v * factor for name, v in self.dequantize_params_per_s.items()}
        prompt_attention = self.prompt_attention_flops and self.prompt_attention_flops * factor
        return ComputeRates(flops, self.attention_bps, self.kv_decode_bps, dequantize, prompt_attention)

    def attention_rate(self, dtype: torch.dtype) -> float:
        """Decode attention's bytes/s in `dtype`; without a measurement in it, float32's or
        the one there is (a GPU's, in its compute dtype); unpriced (INF) without any."""
        rates = self.attention_bps
        return rates.get(str(dtype).removeprefix("torch.")) or rates.get("float32") or next(iter(rates.values()), INF)

    def attention_seconds(self, dtype: torch.dtype, rows: int, flop: float) -> float:
        """Seconds of `flop` of many-query attention over `rows` query rows at a time."""
        return flop / (self.prompt_attention_flops or self.flops(dtype, rows))

    @classmethod
    def from_json(cls, data: dict) -> "ComputeRates":
        flops = {k: {int(r): float(f) for r, f in v.items()} for k, v in data["matmul_flops"].items()}
        return cls(**{**data, "matmul_flops": flops})


@dataclass(frozen=True)
class DiskRates:
    """The offload folder's disk, with O_DIRECT requests as the engine makes them."""

    read_bps: float
    write_bps: float
    read_busy_bps: float | None = None  # reads while the CPU multiplies on all cores (overlapped I/O)
    compute_share_during_reads: float = 1.0  # the share of matmul speed left while the disk reads
    # KV cache reads as decode makes them while the CPU multiplies: one large request per K or
    # V prefix of a (layer, GPU batch), one in flight (None: priced like weight reads)
    kv_read_busy_bps: float | None = None

    @property
    def kv_read_bps(self) -> float:
        """The rate decode's KV cache reads from disk are priced at."""
        return self.kv_read_busy_bps or self.read_busy_bps or self.read_bps

    def scaled(self, factor: float) -> "DiskRates":
        """These rates with every bandwidth times `factor` (a disk measured faster or slower now)."""
        scale = lambda v: v * factor if v else v
        return DiskRates(self.read_bps * factor, self.write_bps * factor, scale(self.read_busy_bps),
                         self.compute_share_during_reads, scale(self.kv_read_busy_bps))


@dataclass(frozen=True)
class GpuRates:
    """The GPU as the cost model sees it: its memory, the pinned host link both ways, its
    compute rates, and the CPU's attention over KV rows in host RAM beside it."""

    name: str
    memory_bytes: int
    host_to_gpu_bps: float
    gpu_to_host_bps: float
    compute: ComputeRates
    # the CPU's attention over KV rows in host RAM (token-major, larger than any L3), bytes/s
    cpu_attention_bps: float = INF
    # the engine's seconds per (layer, GPU batch) operation beyond bytes and FLOPs
    # (profiling/engine_probe.py): "compute", and what a KV cache off the GPU adds,
    # "cache_load" or "cpu_attention"
    op_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> "GpuRates":
        return cls(**{**data, "compute": ComputeRates.from_json(data["compute"])})


@dataclass(frozen=True)
class HardwareProfile:
    fingerprint: str  # the machine it was measured on (profiling.fingerprint)
    memory_bytes: int  # total host RAM
    cpu: ComputeRates
    disk: DiskRates
    gpu: GpuRates | None = None  # None without a GPU

    def kernel_choice(self, dtype: torch.dtype) -> KernelChoice:
        """Where the engine switches from the fused int4 kernel to dequantize + matmul, from
        the rates measured here: the trade the cost model prices (`weight_matmul_seconds`),
        so the engine and the planner decide alike from one measurement."""
        cpu = self.cpu
        if not cpu.matmul_flops.get("int4"):
            return KernelChoice()  # this torch has no fused kernel
        return KernelChoice.from_rates(lambda rows: cpu.flops(dtype, rows, 4), lambda rows: cpu.flops(dtype, rows),
                                       cpu.dequantize_params_per_s.get("int4", 0.0))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "HardwareProfile":
        gpu = GpuRates.from_json(data["gpu"]) if data.get("gpu") else None
        return cls(data["fingerprint"], data["memory_bytes"], ComputeRates.from_json(data["cpu"]),
                   DiskRates(**data["disk"]), gpu)
