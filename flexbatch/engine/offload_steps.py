"""The offloading runner's token steps, as the executor runs them (`executor.StepWork`): for
each (layer, GPU batch), where its KV cache comes from, what computes over it, and where it
goes. A decode step loads and stores the block's caches (on a CPU, computing each layer once
for the whole block); an admission computes newcomers' prompts over fresh caches and writes
them into the block's rows; a scoring prefill keeps no cache."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..kernels.attention import CacheSegments
from ..kernels.linear import dequantize_for_block
from ..kernels.packed import PackedLinear
from ..malloc import give_back_freed_memory
from .weight_home import LayerLoad

if TYPE_CHECKING:
    from .offload_runner import OffloadRunner


class TokenStep:
    """One token step's cache and compute operations (the executor's `StepWork`): GPU batch
    k's hidden states [b, S, C] advance through layer j over the cache self.runner.kv[j][k]."""

    def __init__(self, runner: OffloadRunner, hidden: list[torch.Tensor], ctxs: list, start: int, end: int):
        self.runner, self.hidden, self.ctxs, self.start, self.end = runner, hidden, ctxs, start, end
        self.rows = sum(h.shape[0] * h.shape[1] for h in hidden)  # token rows each layer multiplies

    def load_cache(self, layer: int, batch: int):
        return self.runner.kv[layer][batch].load(self.start)

    def compute(self, layer: int, batch: int, loaded: LayerLoad, cache) -> None:
        k_cache, v_cache = cache
        self.runner.streams.claim(_tensors_of([k_cache, v_cache, *loaded.weights.values()]))
        self._advance(layer, batch, loaded, k_cache, v_cache)

    def _advance(self, layer: int, index: int, loaded: LayerLoad, k_cache, v_cache) -> None:
        """hidden[index] through `layer` over the given caches; the first of the step's
        computes of a layer dequantizes its weights for the block, the last drops them."""
        r, last = self.runner, index == len(self.hidden) - 1
        if index == 0:
            dequantize_for_block(loaded.weights.values(), self.rows)
        self.hidden[index] = r.family.layer(r.cfg, loaded.weights, self.hidden[index], self.ctxs[index],
                                            k_cache, v_cache, r.layers[layer])
        if last:
            _drop_dense_copies(loaded.weights)
        if self.hidden[index].shape[1] > 1 or last:
            # freed heap fragments (malloc.py): a prompt's temporaries come in many sizes, and a
            # decode step's grow by a token each step, so last step's freed blocks rarely fit
            give_back_freed_memory()

    def store_cache(self, layer: int, batch: int) -> None:
        self.runner.kv[layer][batch].store(self.start, self.end)


class BlockDecodeStep(TokenStep):
    """A decode step that computes each layer once for the whole block (the executor's
    `block_schedule`): every weight multiplies all B rows at once, which on a CPU runs far
    faster per row than B / gbs multiplies of gbs rows (fp32 [2048 x 8192] on 2 cores: 85
    GFLOP/s at 256 rows, 31 at 32), while attention still reads one GPU batch's cache at a
    time as the executor's `BlockCaches` streams them through memory. hidden: [[B, 1, C]]."""

    def __init__(self, runner: OffloadRunner, hidden: list[torch.Tensor], ctx, start: int, end: int):
        super().__init__(runner, hidden, [ctx], start, end)

    def compute(self, layer: int, batch: None, loaded: LayerLoad, cache) -> None:
        self._advance(layer, 0, loaded, cache, cache)  # the one hidden tensor: first and last


class PrefillOnlyStep(TokenStep):
    """A prefill that keeps no KV cache (scoring): nothing to load or store."""

    def load_cache(self, layer: int, batch: int):
        return None, None

    def store_cache(self, layer: int, batch: int) -> None:
        return None


class AdmitStep(TokenStep):
    """A prefill of prompts joining the block (`Runner.admit`): each (layer, GPU batch of the
    newcomers) attends over fresh cache tensors of its own, written into the block's cache as
    soon as it is computed (its newcomers' rows are in one of the block's GPU batches,
    `admit_batches`). With a `shared` prefix, GPU batch 0 is the prefix alone, kept until the
    layer's last GPU batch: the others copy its keys and values."""

    def __init__(self, runner: OffloadRunner, hidden: list[torch.Tensor], ctxs: list, rows: list[int], end: int,
                 shared: int):
        super().__init__(runner, hidden, ctxs, 0, end)
        self.shared, self.fresh = shared, {}
        self.first = 1 if shared else 0  # the first GPU batch of newcomers
        self.block_rows = [rows[b] for b in runner.admit_batches(rows)]  # per GPU batch of newcomers

    def load_cache(self, layer: int, batch: int):
        n, width = self.hidden[batch].shape[:2]
        if batch >= self.first:
            width += self.shared
        shape = (n, self.runner.cfg.num_kv_heads, width, self.runner.cfg.head_dim)
        fresh = [torch.empty(shape, dtype=self.runner.dtype, device=self.runner.device) for _ in range(2)]
        self.fresh[layer, batch] = fresh
        return fresh

    def compute(self, layer: int, batch: int, loaded: LayerLoad, cache) -> None:
        if self.shared and batch >= self.first:  # the prefix computed this layer first
            for kv in range(2):
                cache[kv][:, :, :self.shared] = self.fresh[layer, 0][kv]
        super().compute(layer, batch, loaded, cache)

    def store_cache(self, layer: int, batch: int) -> None:
        if batch < self.first:
            return  # the prefix: the newcomers' computes copy it
        if self.shared and batch == len(self.hidden) - 1:
            del self.fresh[layer, 0]  # every GPU batch of this layer has copied it
        new, rows = self.fresh.pop((layer, batch)), self.block_rows[batch - self.first]
        gbs = self.runner.policy.gpu_batch_size
        kv = self.runner.kv[layer][rows[0] // gbs]
        slots = slice(self.end - new[0].shape[2], self.end)
        caches = kv.load(self.end)
        for cache, values in zip(caches, new):
            _write_rows(cache, [(i, row % gbs) for i, row in enumerate(rows)], slots, values)
        kv.store(slots.start, slots.stop)


def cache_parts(cache) -> list[torch.Tensor]:
    """The tensors of a cache split in segments of consecutive sequences, or the cache itself."""
    return cache.parts if isinstance(cache, CacheSegments) else [cache]


def _write_rows(cache, rows: list[tuple[int, int]], slots: slice, values: torch.Tensor) -> None:
    """cache[local, :, slots] = values[i] for each (i, local) in rows, over a cache split in
    segments of consecutive sequences or not."""
    first = 0
    for part in cache_parts(cache):
        for i, local in rows:
            if first <= local < first + part.shape[0]:
                part[local - first, :, slots] = values[i].to(part.device)
        first += part.shape[0]


def _tensors_of(values) -> list[torch.Tensor]:
    """The tensors inside loaded weights and caches (compressed weights hold two)."""
    out = []
    for v in values:
        if v is None:  # no cache (a prefill that keeps none)
            continue
        if isinstance(v, PackedLinear):
            out += [v.data, v.scale_zero]
        elif isinstance(v, CacheSegments):
            out += v.parts
        else:
            out.append(v)
    return out


def _drop_dense_copies(layer_weights: dict) -> None:
    """Free the dequantized copies compressed weights made for this layer: the last GPU batch
    has used them, so at most one layer is held dense at a time."""
    for w in layer_weights.values():
        if isinstance(w, PackedLinear):
            w.release_dense()
