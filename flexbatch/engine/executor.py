"""The offloading runner: executes the block schedule with weights and KV cache on tiers.

Implements the same begin/step/end interface as the in-memory runner, so the decoding loop
does not change. Loads and stores run on a small thread pool (disk reads release the GIL);
the main thread computes. On a GPU the I/O threads' copies run on their own CUDA streams,
ordered against compute as streams.py describes. A token step ends with a barrier on
outstanding stores, so the next step's loads always see this step's cache rows.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..config import Policy
from ..kernels import KernelChoice
from ..kernels.attention import CacheSegments, orthonormal
from ..kernels.linear import dequantize_for_block
from ..kernels.packed import PackedLinear, free_dense_buffers
from ..models.family import Family
from ..models.spec import ModelConfig
from ..storage.disk import require_free_space
from ..storage.kv_rows import RowCodec
from ..storage.placement import split_sequences
from ..storage.tiers import Tier
from ..weights.source import TensorSource
from .kv_cache import CPU, KVBlock, staging_pools
from .kv_encoded import EncodedKVBlock
from .memory import STAGING_BLOCKS, MemoryBudget, kv_bytes_per_token, layer_weight_bytes, run_memory, weight_memory
from .runner import make_context, score_in_pieces, target_logprobs
from .schedule import Op, token_schedule
from .streams import CopyStreams
from .weight_home import WeightHome

FIT_HINT = ("Put more weights or KV cache on disk, lower gpu_batch_size or num_gpu_batches, "
            "or raise the budget (--cpu-memory / --gpu-memory).")


class _Done:
    """A completed future, for the sequential mode."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


class OffloadRunner:
    def __init__(self, cfg: ModelConfig, family: Family, source: TensorSource, policy: Policy,
                 dtype: torch.dtype, device: torch.device, offload_dir: str | Path | None = None,
                 budget: MemoryBudget | None = None, kernels: KernelChoice = KernelChoice()):
        self.cfg, self.family, self.policy = cfg, family, policy
        self.dtype, self.device = dtype, device
        self.budget = budget or MemoryBudget.detect(device)
        self.unified = device.type != "cuda"  # device and host are the same RAM
        self._own_dir = offload_dir is None
        self.offload_dir = Path(offload_dir or tempfile.mkdtemp(prefix="flexbatch-offload-"))
        self._check_weights_fit()
        self._check_disk_room(self.cfg.num_layers * self.policy.weights_disk
                              * layer_weight_bytes(cfg, family, dtype, policy.weight_quant), "the weights kept on disk")
        self.home = WeightHome(cfg, family, source, policy, dtype, device, self.offload_dir / "weights", kernels)
        self.io = ThreadPoolExecutor(max_workers=3, thread_name_prefix="flexbatch-io")
        self.streams = CopyStreams(device)
        self.blocks: list[list[KVBlock]] = []
        self.trace: list[Op] | None = None  # set to a list to record executed operations
        self.step_seconds: list[float] = []  # wall time of each token step, for benchmarks
        self.wait_seconds = 0.0  # time compute spent waiting for loads (I/O not hidden)
        self.kv_rotation = None  # a compressed cache is kept rotated (storage/kv_rows.py)
        if policy.compress_cache:
            self.kv_rotation = orthonormal(cfg.head_dim).to(device=device, dtype=dtype)

    # ---- memory ---------------------------------------------------------------------------
    def _check_weights_fit(self) -> None:
        plan = weight_memory(self.cfg, self.family, self.policy, self.dtype, self.device)
        plan.check(self.budget, self.unified, FIT_HINT)

    def _check_disk_room(self, nbytes: float, what: str) -> None:
        if nbytes > 0:
            self.offload_dir.mkdir(parents=True, exist_ok=True)
            require_free_space(self.offload_dir, int(nbytes), what)

    # ---- batch lifecycle ------------------------------------------------------------------
    def gpu_batches(self, batch_size: int) -> list[slice]:
        gbs = self.policy.gpu_batch_size
        return [slice(s, min(s + gbs, batch_size)) for s in range(0, batch_size, gbs)]

    def begin(self, batch_size: int, capacity: int, prompt_width: int | None = None) -> None:
        plan = run_memory(self.cfg, self.family, self.policy, self.dtype, batch_size, capacity,
                          prompt_width or capacity, self.device)
        plan.check(self.budget, self.unified, FIT_HINT)
        kv_bytes = kv_bytes_per_token(self.cfg, self.dtype, self.policy.cache_quant)
        self._check_disk_room(self.policy.cache_disk * batch_size * capacity * self.cfg.num_layers * kv_bytes,
                              "the KV cache kept on disk")
        self.batches = self.gpu_batches(batch_size)
        fractions = {Tier.DEVICE: self.policy.cache_device, Tier.HOST: self.policy.cache_host,
                     Tier.DISK: self.policy.cache_disk}
        cache_dir = self.offload_dir / "cache"
        cache_dir.mkdir(parents=True, exist_ok=True)
        shapes = [(b.stop - b.start, self.cfg.num_kv_heads, capacity, self.cfg.head_dim) for b in self.batches]
        splits = [split_sequences(s[0], fractions) for s in shapes]
        quant = self.policy.cache_quant
        row_bytes = lambda n: RowCodec(n, self.cfg.num_kv_heads, self.cfg.head_dim, self.dtype, quant).row_bytes
        cpu_attention = self.policy.cpu_attention and not self.unified
        # where host and disk token rows are attended (a compressed cache decodes on its own)
        attend = CPU if cpu_attention or self.unified or quant is not None else self.device
        self.pools = staging_pools(splits, capacity, row_bytes, attend, 2 * STAGING_BLOCKS)

        def block(j: int, k: int, shape, split) -> KVBlock | EncodedKVBlock:
            path = cache_dir / f"l{j}_b{k}"
            if quant is None:
                return KVBlock(shape, split, self.dtype, self.device, path, self.pools, cpu_attention)
            return EncodedKVBlock(shape, split, self.dtype, self.device, path, self.pools.get("disk_host"), quant,
                                  self.policy.cache_window)

        self.blocks = [[block(j, k, shape, sp) for k, (shape, sp) in enumerate(zip(shapes, splits))]
                       for j in range(self.cfg.num_layers)]

    def end(self) -> None:
        for layer in self.blocks:
            for block in layer:
                block.close()
        self.blocks, self.pools = [], {}
        shutil.rmtree(self.offload_dir / "cache", ignore_errors=True)

    def close(self) -> None:
        self.end()
        self.io.shutdown(wait=True)
        self.home.close()
        free_dense_buffers()
        if self._own_dir:
            shutil.rmtree(self.offload_dir, ignore_errors=True)

    # ---- one token step -------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, key_valid: torch.Tensor, start: int) -> torch.Tensor:
        """Run the block schedule for one token step; return last-position logits [B, V]."""
        began = time.perf_counter()
        hidden = self._hidden(input_ids, key_valid, start)
        logits = [self.family.head(self.cfg, self.home.globals, h[:, -1:]).squeeze(1) for h in hidden]
        out = torch.cat(logits).cpu()
        self.step_seconds.append(time.perf_counter() - began)
        return out

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor, key_valid: torch.Tensor, piece: int | None = None) -> torch.Tensor:
        """Log-probability [B, S-1] of each token given the tokens before it."""
        hidden_of = lambda ids, valid, start: torch.cat(self._hidden(ids, valid, start))
        logprobs_of = lambda h, targets: torch.cat([
            target_logprobs(self.cfg, self.family, self.home.globals, h[b], targets[b]) for b in self.batches])
        return score_in_pieces(hidden_of, logprobs_of, input_ids, key_valid, piece)

    def _hidden(self, input_ids: torch.Tensor, key_valid: torch.Tensor, start: int) -> list[torch.Tensor]:
        """Final hidden states, one tensor per GPU batch, after appending input_ids at `start`."""
        ctxs = [make_context(self.cfg, self.family, key_valid[b], start, self.dtype, self.device,
                             self.policy.attn_sparsity, self.kv_rotation)
                for b in self.batches]
        hidden = [self.family.embed(self.cfg, self.home.globals, input_ids[b].to(self.device), ctx)
                  for b, ctx in zip(self.batches, ctxs)]
        self._run_schedule(hidden, ctxs, start, start + input_ids.shape[1])
        return hidden

    def _run_schedule(self, hidden, ctxs, start: int, end: int) -> None:
        run = self.streams.run  # loads and stores on I/O-side CUDA streams (see streams.py)
        submit = self.io.submit if self.policy.overlap else (lambda fn, *a, **kw: _Done(fn(*a, **kw)))
        weights: dict[int, Future] = {}
        caches: dict[tuple[int, int], Future] = {}
        stores: list = []
        rows = sum(h.shape[0] * h.shape[1] for h in hidden)  # token rows each layer multiplies this step
        for op in token_schedule(self.cfg.num_layers, len(self.batches), self.policy.overlap):
            if self.trace is not None:
                self.trace.append(op)
            j, k = op.layer, op.batch
            if op.kind == "load_weight":
                weights[j] = submit(run, self.home.load, j)
                weights.pop(j - 2, None)
            elif op.kind == "load_cache":
                caches[j, k] = submit(run, self.blocks[j][k].load, start)
            elif op.kind == "compute":
                waited = time.perf_counter()
                k_cache, v_cache = caches.pop((j, k)).result()
                layer_weights = weights[j].result()
                self.wait_seconds += time.perf_counter() - waited
                self.streams.claim(_tensors_of([k_cache, v_cache, *layer_weights.values()]))
                if k == 0:
                    dequantize_for_block(layer_weights.values(), rows)
                hidden[k] = self.family.layer(self.cfg, layer_weights, hidden[k], ctxs[k], k_cache, v_cache)
                if k == len(self.batches) - 1:
                    _drop_dense_copies(layer_weights)
            else:  # store_cache, after the compute that wrote the rows it stores
                stores.append(submit(run, self.blocks[j][k].store, start, end, after=self.streams.mark()))
        for future in stores:
            future.result()


def _tensors_of(values) -> list[torch.Tensor]:
    """The tensors inside loaded weights and caches (compressed weights hold two)."""
    out = []
    for v in values:
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
