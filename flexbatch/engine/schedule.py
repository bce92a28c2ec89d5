"""FlexGen's zig-zag block schedule for one token step, as a list of operations.

The block's GPU batches all advance one token; the loop order is layer -> GPU batch, so a
layer's weights are loaded once per token and reused by every GPU batch. In the overlapped
order, loads are issued one unit of work ahead of the compute that needs them and stores
complete in the background; the executor waits on a load only when its compute starts.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Op:
    kind: str  # load_weight | load_cache | compute | store_cache
    layer: int
    batch: int | None = None  # None for weight loads


def sequential_schedule(num_layers: int, num_gpu_batches: int) -> list[Op]:
    """Each load right before its use: simple and easy to debug, no overlap."""
    ops = []
    for j in range(num_layers):
        ops.append(Op("load_weight", j))
        for k in range(num_gpu_batches):
            ops += [Op("load_cache", j, k), Op("compute", j, k), Op("store_cache", j, k)]
    return ops


def overlapped_schedule(num_layers: int, num_gpu_batches: int) -> list[Op]:
    """Issue the next layer's weights and the next GPU batch's cache before this compute."""
    units = [(j, k) for j in range(num_layers) for k in range(num_gpu_batches)]
    ops = [Op("load_weight", 0), Op("load_cache", 0, 0)]
    for n, (j, k) in enumerate(units):
        if k == 0 and j + 1 < num_layers:
            ops.append(Op("load_weight", j + 1))
        if n + 1 < len(units):
            ops.append(Op("load_cache", *units[n + 1]))
        ops += [Op("compute", j, k), Op("store_cache", j, k)]
    return ops


def token_schedule(num_layers: int, num_gpu_batches: int, overlap: bool) -> list[Op]:
    make = overlapped_schedule if overlap else sequential_schedule
    return make(num_layers, num_gpu_batches)
