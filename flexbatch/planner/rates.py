"""Rates measured into tables, and the GPU's part of the hardware profile."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


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


def int_rows(tables: dict) -> dict[str, dict[int, float]]:
    """JSON keys are strings: the tables' row counts back to ints."""
    return {k: {int(r): float(f) for r, f in v.items()} for k, v in tables.items()}


@dataclass(frozen=True)
class GpuRates:
    """The GPU as the cost model sees it: its memory, the pinned host link both ways, and
    the same compute rates the CPU part of the profile has, measured on the GPU."""

    name: str
    memory_bytes: int
    host_to_gpu_bps: float
    gpu_to_host_bps: float
    matmul_flops: dict[str, dict[int, float]]
    attention_bps: float  # decode attention, K and V bytes per second
    kv_decode_bps: float  # compressed KV cache dequantized, bytes per second
    dequantize_params_per_s: dict[str, float] = field(default_factory=dict)
    # the CPU's attention over KV rows in host RAM (token-major, larger than any L3), bytes/s
    cpu_attention_bps: float = float("inf")
    # the engine's seconds per (layer, GPU batch) operation beyond bytes and FLOPs (engine_probe.py):
    # "compute", and what a KV cache off the GPU adds, "cache_load" or "cpu_attention"
    op_seconds: dict[str, float] = field(default_factory=dict)

    def flops(self, dtype: torch.dtype, rows: int, packed_bits: int | None = None) -> float | None:
        return table_rate(self.matmul_flops, dtype, rows, packed_bits)

    @classmethod
    def from_json(cls, data: dict) -> "GpuRates":
        return cls(**{**data, "matmul_flops": int_rows(data["matmul_flops"])})
