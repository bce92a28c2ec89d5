"""The offloading runner: the block schedule with weights and KV cache on tiers.

Implements the runner interface (runner.py), so the decoding loop does not change. Weights
stay in their `WeightHome`; each (layer, GPU batch) KV cache is a `BatchKV` (plain or
compressed, laid out over the tiers by `sizing.KVRoute.segments`); the `Executor` runs
each token step's schedule over them. It also runs compressed models whose weights and
cache all stay in memory: `InMemoryRunner` holds dense weights only, and here the packed
weights and quantized cache rows are native (with no I/O to overlap, the schedule just
computes).

A pipeline stage (pipeline.py) is an OffloadRunner over a range of the model's layers: it
embeds only if its range starts at layer 0, and its callers take the head's logits only
from the stage that ends the model. Its lanes (`lane`), blocks in flight at once, share
its weights, I/O threads and executor and keep KV caches of their own.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import accumulate, groupby
from pathlib import Path

import torch

from ..config import Policy
from ..kernels import DecodeKernel, KernelChoice
from ..kernels.attention import orthonormal
from ..kernels.packed import free_dense_buffers
from ..models.family import Family
from ..models.spec import ModelConfig
from ..sizing import (
    CACHES_READ_AHEAD,
    KV_IN_FLIGHT,
    MemoryBudget,
    kv_bytes_per_token,
    kv_route,
    layer_weight_bytes,
    run_memory,
    scoring_memory,
    weight_memory,
)
from ..storage.disk import DiskUse, Traffic, require_free_space
from ..storage.placement import split_sequences
from ..storage.tiers import Tier
from ..weights.source import TensorSource
from .executor import Executor, InlineIO
from .kv_cache import BatchKV, KVFormat, block_pools
from .memory import detect_budget
from .offload_steps import AdmitStep, BlockDecodeStep, PrefillOnlyStep, TokenStep, cache_parts
from .runner import Runner, family_recomputes_at, make_context, packed_context, shift_slots
from .scoring import PackedRows
from .streams import CopyStreams
from .token_scores import TokenScores, score_in_pieces, source_logprobs, target_logprobs
from .weight_home import WeightHome

FIT_HINT = ("Put more weights or KV cache on disk, lower gpu_batch_size or num_gpu_batches, "
            "or raise the budget (--cpu-memory / --gpu-memory).")


class OffloadRunner(Runner):
    def __init__(self, cfg: ModelConfig, family: Family, source: TensorSource, policy: Policy,
                 dtype: torch.dtype, device: torch.device, offload_dir: str | Path | None = None,
                 budget: MemoryBudget | None = None, kernels: KernelChoice = KernelChoice(),
                 layers: range | None = None, lanes: int = 1, decode: DecodeKernel | None = None):
        self.cfg, self.family, self.policy = cfg, family, policy
        self.dtype, self.device = dtype, device
        self.decode = decode if decode is not None and decode.handles(device, dtype, cfg.head_dim) else None
        self.layers = layers if layers is not None else range(cfg.num_layers)
        self.sized = replace(cfg, num_layers=len(self.layers))  # what memory and disk checks count
        self.lanes = lanes  # blocks in flight at once, each with its KV cache (`lane`)
        self.budget = budget or detect_budget(device)
        self.unified = device.type != "cuda"  # device and host are the same RAM
        self._own_dir = offload_dir is None
        self._owner = True  # a lane shares this runner's weights, threads and folder
        self.offload_dir = Path(offload_dir or tempfile.mkdtemp(prefix="flexbatch-offload-"))
        self.cache_dir = self.offload_dir / "cache"
        self._check_weights_fit()
        self._check_disk_room(len(self.layers) * self.policy.weights_disk
                              * layer_weight_bytes(cfg, family, dtype, policy.weight_quant), "the weights kept on disk")
        self.home = WeightHome(cfg, family, source, policy, dtype, device, self.offload_dir / "weights", kernels,
                               self.layers)
        # the next layer's weight load, the caches read ahead, a store
        self.io = ThreadPoolExecutor(max_workers=CACHES_READ_AHEAD + 2, thread_name_prefix="flexbatch-io")
        self.streams = CopyStreams(device)
        self.executor = Executor(self.home, self.io if policy.overlap else InlineIO(), self.streams, policy.overlap)
        self.kv: list[list[BatchKV]] = []  # [layer][GPU batch]
        self.step_seconds: list[float] = []  # wall time of each token step, for benchmarks
        self.step_disk: list[DiskUse] = []  # what each token step did on the disk
        self.admit_seconds: list[float] = []  # wall time of each admission (prompts' prefill)
        # KV cache bytes read from and written to disk (weights: home.traffic; one disk, one busy clock)
        self.kv_traffic = Traffic(self.home.traffic.clock)
        self.wait_seconds = 0.0  # time compute spent waiting for loads (I/O not hidden)
        self.kv_rotation = None  # a compressed cache is kept rotated (storage/kv_rows.py)
        if policy.compress_cache:
            self.kv_rotation = orthonormal(cfg.head_dim).to(device=device, dtype=dtype)

    def lane(self, index: int) -> "OffloadRunner":
        """Another block in flight on the same weights: a runner sharing this one's weight
        home, I/O threads and executor (one computes at a time), with its own KV cache."""
        lane = copy.copy(self)
        lane._owner, lane.kv, lane.pools = False, [], {}
        lane.cache_dir = self.offload_dir / f"cache-lane{index}"
        lane.step_seconds, lane.step_disk, lane.admit_seconds = [], [], []
        lane.kv_traffic = Traffic(self.home.traffic.clock)
        return lane

    # ---- memory ---------------------------------------------------------------------------
    def _check_weights_fit(self) -> None:
        plan = weight_memory(self.sized, self.family, self.policy, self.dtype, self.device)
        plan.check(self.budget, self.unified, FIT_HINT)

    def _check_disk_room(self, nbytes: float, what: str) -> None:
        if nbytes > 0:
            self.offload_dir.mkdir(parents=True, exist_ok=True)
            require_free_space(self.offload_dir, int(nbytes), what)

    # ---- batch lifecycle ------------------------------------------------------------------
    def gpu_batches(self, batch_size: int) -> list[slice]:
        gbs = self.policy.gpu_batch_size
        return [slice(s, min(s + gbs, batch_size)) for s in range(0, batch_size, gbs)]

    def admit_batches(self, rows: list[int]) -> list[slice]:
        """The GPU batches of an admission into block rows `rows` (ascending): runs of
        newcomers whose rows lie in one GPU batch of the block, so that each run's keys and
        values go to one cache as soon as they are computed, and no more than a GPU batch of
        them is ever held (`AdmitStep`)."""
        if any(a >= b for a, b in zip(rows, rows[1:])):
            raise ValueError(f"admitted rows must ascend, got {rows}")
        ends = list(accumulate(len(list(run)) for _, run in groupby(rows, lambda r: r // self.policy.gpu_batch_size)))
        return [slice(a, b) for a, b in zip([0, *ends], ends)]

    def begin(self, batch_size: int, capacity: int, prompt_width: int | None = None) -> None:
        # every lane's block is counted as this one's: they are alike
        plan = run_memory(self.sized, self.family, self.policy, self.dtype, batch_size * self.lanes, capacity,
                          prompt_width or capacity, self.device)
        plan.check(self.budget, self.unified, FIT_HINT)
        kv_bytes = kv_bytes_per_token(self.cfg, self.dtype, self.policy.cache_quant)
        self._check_disk_room(self.policy.cache_disk * batch_size * capacity * len(self.layers) * kv_bytes,
                              "the KV cache kept on disk")
        self.batches = self.gpu_batches(batch_size)
        fractions = {Tier.DEVICE: self.policy.cache_device, Tier.HOST: self.policy.cache_host,
                     Tier.DISK: self.policy.cache_disk}
        cache_dir = self.cache_dir
        shutil.rmtree(cache_dir, ignore_errors=True)  # a killed run's cache files: never read, never reused
        cache_dir.mkdir(parents=True, exist_ok=True)
        splits = [split_sequences(b.stop - b.start, fractions) for b in self.batches]
        layouts = [kv_route(self.policy, not self.unified).segments(split) for split in splits]
        fmt = KVFormat(self.cfg.num_kv_heads, self.cfg.head_dim, capacity, self.dtype, self.policy.cache_quant,
                       self.policy.cache_window)
        self.pools = block_pools(layouts, fmt, self.device, 2 * KV_IN_FLIGHT)
        self.kv = [[BatchKV(places, fmt, self.device, cache_dir / f"l{j}_b{k}", self.pools, self.kv_traffic)
                    for k, places in enumerate(layouts)] for j in range(len(self.layers))]

    def end(self) -> None:
        self.executor.drain()
        for layer in self.kv:
            for kv in layer:
                kv.close()
        self.kv, self.pools = [], {}
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def recomputes_at(self, length: int) -> bool:
        return family_recomputes_at(self.cfg, self.family, length)

    def close(self) -> None:
        self.end()
        if not self._owner:
            return
        self.io.shutdown(wait=True)
        self.home.close()
        free_dense_buffers()
        if self._own_dir:
            shutil.rmtree(self.offload_dir, ignore_errors=True)

    # ---- one token step -------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, key_valid: torch.Tensor, start: int,
             rows: list[int] | None = None) -> torch.Tensor:
        # every row is computed: GPU batches are fixed slices of the block
        began, disk = time.perf_counter(), disk_use([self])
        out = self.last_logits(self.step_hidden(self.step_inputs(input_ids), key_valid, start))
        self.step_seconds.append(time.perf_counter() - began)
        self.step_disk.append(disk_use([self]).since(disk))
        return out if rows is None else out[rows]

    @torch.inference_mode()
    def admit(self, rows: list[int], input_ids: torch.Tensor, key_valid: torch.Tensor, end: int,
              shared: int = 0) -> torch.Tensor:
        began = time.perf_counter()
        hidden = self.admit_hidden(rows, self.admit_inputs(input_ids, shared, rows), key_valid, end, shared)
        out = self.last_logits(hidden[1:] if shared else hidden)
        self.admit_seconds.append(time.perf_counter() - began)
        return out

    # ---- the parts a pipeline stage runs: inputs (ids on the first stage, else the previous
    # stage's hidden states) through this runner's layers, and the head on the last ----------
    def step_inputs(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        return [input_ids[b] for b in self.batches]

    def admit_inputs(self, input_ids: torch.Tensor, shared: int, rows: list[int]) -> list[torch.Tensor]:
        """One input per GPU batch of newcomers (`admit_batches`); with a `shared` prefix, one
        more, first: the prefix alone (`AdmitStep`)."""
        inputs = [input_ids[b, shared:] for b in self.admit_batches(rows)]
        return [input_ids[:1, :shared], *inputs] if shared else inputs

    @torch.inference_mode()
    def step_hidden(self, inputs: list[torch.Tensor], key_valid: torch.Tensor, start: int) -> list[torch.Tensor]:
        """Hidden states after this runner's layers, one tensor per GPU batch, of inputs [b, S]
        appended at cache slot `start`."""
        end = start + inputs[0].shape[1]
        if self._whole_block(inputs):
            ctx = make_context(self.cfg, self.family, key_valid, start, self.dtype, self.device,
                               self.policy.attn_sparsity, self.kv_rotation, self.decode)
            hidden = self._run([torch.cat(inputs)], [ctx], lambda h: BlockDecodeStep(self, h, ctx, start, end),
                               whole_block=True)
            return list(hidden[0].split([b.stop - b.start for b in self.batches]))
        ctxs = [make_context(self.cfg, self.family, key_valid[b], start, self.dtype, self.device,
                             self.policy.attn_sparsity, self.kv_rotation, self.decode)
                for b in self.batches]
        return self._run(inputs, ctxs, lambda h: TokenStep(self, h, ctxs, start, end))

    def _whole_block(self, inputs: list[torch.Tensor]) -> bool:
        """Whether a step computes each layer once for the whole block (`BlockDecodeStep`):
        decode steps of several GPU batches on a CPU, where a matmul over all the block's rows
        is faster than one per GPU batch. A GPU keeps one compute per GPU batch: its copy
        streams' ordering (streams.py) is not wired through a `BlockCaches`."""
        return self.unified and len(self.batches) > 1 and all(x.shape[1] == 1 for x in inputs)

    @torch.inference_mode()
    def admit_hidden(self, rows: list[int], inputs: list[torch.Tensor], key_valid: torch.Tensor, end: int,
                     shared: int = 0) -> list[torch.Tensor]:
        """`admit`'s hidden states after this runner's layers (`admit_inputs`' batches)."""
        ctxs = [make_context(self.cfg, self.family, key_valid[b], shared, self.dtype, self.device,
                             self.policy.attn_sparsity, self.kv_rotation, self.decode)
                for b in self.admit_batches(rows)]
        if shared:  # one more GPU batch, first in every layer: the prefix, whose keys the others copy
            ctxs.insert(0, make_context(self.cfg, self.family, torch.ones(1, shared, dtype=torch.bool), 0,
                                        self.dtype, self.device, kv_rotation=self.kv_rotation, decode=self.decode))
        return self._run(inputs, ctxs, lambda h: AdmitStep(self, h, ctxs, rows, end, shared))

    @torch.inference_mode()
    def last_logits(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """Logits [B, V] (the head's dtype) on the CPU of each row's last position (the model's last layer)."""
        return torch.cat([self.family.head(self.cfg, self.home.globals, h[:, -1:]).squeeze(1) for h in hidden]).cpu()

    @torch.inference_mode()
    def shift(self, offset: int, end: int) -> None:
        """Every (layer, GPU batch) cache loaded, moved and stored back whole: a shift comes
        once per `offset` steps, each of which loads the cache anyway."""
        for layer in self.kv:
            for kv in layer:
                for cache in kv.load(end):
                    for part in cache_parts(cache):
                        shift_slots(part, offset, end)
                kv.store(0, end - offset)

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor, key_valid: torch.Tensor, piece: int | None = None,
              top: int = 0) -> TokenScores:
        hidden_of = lambda ids, valid, start: torch.cat(self._hidden(ids, valid, start))
        logprobs_of = lambda h, targets: TokenScores.cat([
            target_logprobs(self.cfg, self.family, self.home.globals, h[b], targets[b], top) for b in self.batches], 0)
        return score_in_pieces(hidden_of, logprobs_of, input_ids, key_valid, piece)

    def most_scored_rows(self, width: int, limit: int) -> int:
        fits = lambda n: scoring_memory(self.sized, self.family, self.policy, self.dtype, n, width,
                                        self.device).fits(self.budget, self.unified)
        low, high = 0, limit  # fits(low); the memory grows with the rows
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        return low

    @torch.inference_mode()
    def score_packed(self, rows: PackedRows) -> TokenScores:
        """One block of packed rows through every layer (weights stream as in generation), with
        no KV cache: each layer's keys and values are used where computed and dropped."""
        batches = self.gpu_batches(rows.input_ids.shape[0])
        ctxs = [packed_context(self.cfg, self.family, rows.rows(b), self.dtype, self.device, self.decode)
                for b in batches]
        hidden = self._run([rows.input_ids[b] for b in batches], ctxs, lambda h: PrefillOnlyStep(self, h, ctxs, 0, 0))
        return TokenScores.cat([source_logprobs(self.cfg, self.family, self.home.globals, h, rows.rows(b))
                                for h, b in zip(hidden, batches)], 0)

    def _hidden(self, input_ids: torch.Tensor, key_valid: torch.Tensor, start: int) -> list[torch.Tensor]:
        return self.step_hidden(self.step_inputs(input_ids), key_valid, start)

    def _run(self, inputs: list[torch.Tensor], ctxs: list, work_of, whole_block: bool = False) -> list[torch.Tensor]:
        """Each GPU batch's inputs through this runner's layers (input ids are embedded
        first); work_of(hidden) is the step's cache and compute operations (a `StepWork`).
        `whole_block`: the one input is the whole block's, computed once per layer."""
        if self.layers.start == 0:
            hidden = [self.family.embed(self.cfg, self.home.globals, ids.to(self.device), ctx)
                      for ids, ctx in zip(inputs, ctxs)]
        else:
            hidden = [h.to(self.device, self.dtype) for h in inputs]
        batches = len(self.batches) if whole_block else len(inputs)
        self.wait_seconds += self.executor.run_step(work_of(hidden), len(self.layers), batches, whole_block)
        return hidden


def disk_use(runners: list[OffloadRunner]) -> DiskUse:
    """The offload disk's use so far by runners that share one weight home (a runner and its
    lanes): its weight reads and each one's KV cache traffic, all timed on the home's one
    busy clock."""
    weights = runners[0].home.traffic
    kv = sum(r.kv_traffic.read + r.kv_traffic.written for r in runners)
    return DiskUse(weights.read + kv, weights.clock.seconds)
