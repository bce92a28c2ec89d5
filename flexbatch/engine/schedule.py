"""FlexGen's zig-zag block schedule for one token step, as a list of operations.

The block's GPU batches all advance one token; the loop order is layer -> GPU batch, so a
layer's weights are loaded once per token and reused by every GPU batch. In the overlapped
order, loads are issued one unit of work ahead of the compute that needs them and stores
complete in the background; the executor waits on a load only when its compute starts.
The overlapped order also reaches across token steps: during the last layer it loads the
next step's first layer (an Op with `token` 1), so the next step starts with its weights
already read and the time between steps (sampling, the next call) hides that read too.

A decode step on a CPU computes each layer once for the whole block (`block_schedule`): its
weight matmuls run over every row at once, and attention reaches the GPU batches' caches one
after another (`Executor`'s `BlockCaches` loads and stores them as it goes).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ..sizing import CACHES_READ_AHEAD


class OpKind(enum.Enum):
    LOAD_WEIGHT = "load_weight"
    LOAD_CACHE = "load_cache"
    COMPUTE = "compute"
    STORE_CACHE = "store_cache"
    ATTEND = "attend"  # recorded only: attention over one GPU batch's cache in a block compute


@dataclass(frozen=True)
class Op:
    kind: OpKind
    layer: int
    batch: int | None = None  # None for weight loads and a compute of the whole block
    token: int = 0  # 0: this token step; 1: a weight load for the next one


def sequential_schedule(num_layers: int, num_gpu_batches: int) -> list[Op]:
    """Each load right before its use: simple and easy to debug, no overlap."""
    ops = []
    for j in range(num_layers):
        ops.append(Op(OpKind.LOAD_WEIGHT, j))
        for k in range(num_gpu_batches):
            ops += [Op(OpKind.LOAD_CACHE, j, k), Op(OpKind.COMPUTE, j, k), Op(OpKind.STORE_CACHE, j, k)]
    return ops


def overlapped_schedule(num_layers: int, num_gpu_batches: int, first_layer_loaded: bool = False) -> list[Op]:
    """Issue the next layer's weights (after the last layer: the next token's first) and the
    next GPU batch's cache before this compute. `first_layer_loaded`: the previous step
    already loaded this step's first layer."""
    units = [(j, k) for j in range(num_layers) for k in range(num_gpu_batches)]
    ops = [] if first_layer_loaded else [Op(OpKind.LOAD_WEIGHT, 0)]
    ops.append(Op(OpKind.LOAD_CACHE, 0, 0))
    for n, (j, k) in enumerate(units):
        if k == 0:
            ops.append(Op(OpKind.LOAD_WEIGHT, j + 1) if j + 1 < num_layers else Op(OpKind.LOAD_WEIGHT, 0, token=1))
        if n + 1 < len(units):
            ops.append(Op(OpKind.LOAD_CACHE, *units[n + 1]))
        ops += [Op(OpKind.COMPUTE, j, k), Op(OpKind.STORE_CACHE, j, k)]
    return ops


def block_cache(position: int, num_gpu_batches: int) -> tuple[int, int]:
    """The (layer, GPU batch) of a whole-block step's `position`-th cache, in the order its
    attention reaches them: layer by layer, GPU batch by GPU batch."""
    return divmod(position, num_gpu_batches)


def block_schedule(num_layers: int, num_gpu_batches: int, overlap: bool, first_layer_loaded: bool = False) -> list[Op]:
    """One compute per layer for the whole block; its caches are loaded and stored as its
    attention reaches them. Overlapped, the next layer's weights (after the last layer: the
    next token's first) load during this layer, and the first CACHES_READ_AHEAD caches before
    the first compute."""
    if not overlap:
        return [op for j in range(num_layers) for op in (Op(OpKind.LOAD_WEIGHT, j), Op(OpKind.COMPUTE, j))]
    ops = [] if first_layer_loaded else [Op(OpKind.LOAD_WEIGHT, 0)]
    ahead = min(CACHES_READ_AHEAD, num_layers * num_gpu_batches)
    ops += [Op(OpKind.LOAD_CACHE, *block_cache(p, num_gpu_batches)) for p in range(ahead)]
    for j in range(num_layers):
        ops.append(Op(OpKind.LOAD_WEIGHT, j + 1) if j + 1 < num_layers else Op(OpKind.LOAD_WEIGHT, 0, token=1))
        ops.append(Op(OpKind.COMPUTE, j))
    return ops


def token_schedule(num_layers: int, num_gpu_batches: int, overlap: bool, first_layer_loaded: bool = False,
                   whole_block: bool = False) -> list[Op]:
    """`whole_block`: one compute per layer (`block_schedule`), else one per (layer, GPU batch)."""
    if whole_block:
        return block_schedule(num_layers, num_gpu_batches, overlap, first_layer_loaded)
    if overlap:
        return overlapped_schedule(num_layers, num_gpu_batches, first_layer_loaded)
    return sequential_schedule(num_layers, num_gpu_batches)


def token_schedules(num_layers: int, num_gpu_batches: int, overlap: bool, num_tokens: int) -> list[list[Op]]:
    """The schedules of `num_tokens` consecutive token steps, as the executor runs them."""
    out = []
    for i in range(num_tokens):
        out.append(token_schedule(num_layers, num_gpu_batches, overlap, first_layer_loaded=overlap and i > 0))
    return out
