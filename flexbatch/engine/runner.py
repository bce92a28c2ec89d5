"""The runner interface, and the runner that keeps every weight in memory.

A runner owns the KV cache of the block it is generating. The generation loop calls
`begin`, `admit`, `step`, `shift` and `end`; scoring `begin`, `score` and `end` (or
`score_packed`, which keeps no cache),
and the LLM `close`s it, so the offloading runner (offload_runner.py) replaces this one
without changing them.
"""
from __future__ import annotations

import abc

import torch

from ..kernels import DecodeKernel
from ..models import ops
from ..models.family import Family
from ..models.ops import SharedPrefix, StepContext
from ..models.spec import ModelConfig
from ..weights.loader import ModelWeights
from .scoring import PackedRows
from .token_scores import TokenScores, score_in_pieces, source_logprobs, target_logprobs

# Tokens per forward pass of a prefill: larger passes' activations spill out of the CPU's
# caches, smaller ones lose to per-pass costs (the default model, bf16, 2 cores: a 64 x 200
# token admission 1.35x faster in passes of 4096 than at once; 1.1x slower in passes of 1024).
PREFILL_TOKENS = 4096


def make_context(cfg: ModelConfig, family: Family, key_valid: torch.Tensor, start: int,
                 dtype: torch.dtype, device: torch.device, attn_keep: float = 1.0,
                 kv_rotation: torch.Tensor | None = None, decode: DecodeKernel | None = None,
                 rows: list[int] | None = None) -> StepContext:
    """The context of a step appending at `start` over keys key_valid [B, T]; `rows`: the
    cache rows of those B sequences, if not rows 0..B-1 (a decode step with `decode`)."""
    key_positions = ops.positions_from_mask(key_valid, 0).to(device)
    # The first valid key of any row, or `start` if earlier: a padding query sees only itself
    first_valid = int(key_valid.any(0).int().argmax())
    ctx = StepContext(
        positions=key_positions[:, start:],
        start=start,
        key_positions=key_positions,
        first_key=min(first_valid, start),
        attn_mask=ops.attention_mask(key_valid, start, dtype, cfg.sliding_window).to(device),
        attn_keep=attn_keep,
        kv_rotation=kv_rotation,
        decode=decode,
        rows=None if rows is None else torch.tensor(rows, dtype=torch.long),
    )
    family.prepare_step(cfg, ctx, dtype)
    return ctx


def packed_context(cfg: ModelConfig, family: Family, rows: PackedRows, dtype: torch.dtype,
                   device: torch.device, decode: DecodeKernel | None = None) -> StepContext:
    """The context of a prefill over packed rows (engine/scoring.py), with no cache before it."""
    positions = rows.positions.to(device)
    mask = ops.segment_mask(rows.positions, rows.groups, rows.segments, dtype, cfg.sliding_window)
    ctx = StepContext(positions=positions, start=0, key_positions=positions, attn_mask=mask.to(device),
                      decode=decode)
    family.prepare_step(cfg, ctx, dtype)
    return ctx


class Runner(abc.ABC):
    """Forward steps over one batch at a time, with the batch's KV cache."""

    # the C kernels (attention of decode steps and of prompts, the greedy pick), where they run
    decode: DecodeKernel | None = None

    @abc.abstractmethod
    def begin(self, batch_size: int, capacity: int, prompt_width: int | None = None) -> None:
        """Start a batch of `batch_size` sequences of up to `capacity` tokens (KV cache slots)."""

    @abc.abstractmethod
    def step(self, input_ids: torch.Tensor, key_valid: torch.Tensor, start: int,
             rows: list[int] | None = None) -> torch.Tensor:
        """Append input_ids [B, S] at cache slot `start`; return last-position logits [B, V]
        in the head's dtype (`Family.head`), or with `rows` (ascending) only those rows'
        [len(rows), V]: the other rows hold no sequence, and a runner that can leaves them out
        of the step."""

    @abc.abstractmethod
    def admit(self, rows: list[int], input_ids: torch.Tensor, key_valid: torch.Tensor, end: int,
              shared: int = 0) -> torch.Tensor:
        """Prefill prompts input_ids [n, W] (key_valid [n, W]) on their own and place their
        keys and values in cache slots [end - W, end) of block rows `rows` (ascending); return their
        last-position logits [n, V] (as `step`'s). Other rows' caches are unchanged. The first
        `shared` columns are the same tokens in every row, computed once."""

    def prefilled_tokens(self, key_valid: torch.Tensor, shared: int) -> int:
        """How many token positions `admit` computes for prompts laid out as key_valid [n, W]
        with a `shared` prefix: the prefix once, and every row's columns after it."""
        return key_valid.numel() - (key_valid.shape[0] - 1) * shared

    @abc.abstractmethod
    def shift(self, offset: int, end: int) -> None:
        """Move cache slots [offset, end) of every row to [0, end - offset)."""

    @abc.abstractmethod
    def score(self, input_ids: torch.Tensor, key_valid: torch.Tensor, piece: int | None = None,
              top: int = 0) -> TokenScores:
        """Scores [B, S-1] of each token given the tokens before it (between begin and end),
        with the `top` most likely tokens at each position."""

    def score_packed(self, rows: PackedRows) -> TokenScores:
        """Scores [B, T] of rows.targets: one prefill pass, no KV cache kept, no begin/end."""
        raise NotImplementedError(f"{type(self).__name__} does not score packed rows")

    def most_scored_rows(self, width: int, limit: int) -> int:
        """How many packed rows of `width` tokens (at most `limit`) one `score_packed` block
        may hold within the runner's memory budget; 0 if not even one. A runner whose weights
        are all in memory gains nothing from wider blocks: about PREFILL_TOKENS tokens, so that
        scoring's activations stay small (the default model, 1,024-token rows, batch size 64:
        blocks of 4 rows took 77 s and 1.5 GB, blocks of 64 took 89 s and 2.4 GB)."""
        return max(1, min(limit, PREFILL_TOKENS // width))

    @abc.abstractmethod
    def end(self) -> None:
        """Free the batch's KV cache."""

    def recomputes_at(self, length: int) -> bool:
        """Whether a sequence growing to `length` tokens must be computed again whole: its
        family computes every position differently from that length on (Phi-3's LongRoPE
        switches to its long factors, and transformers then recomputes the cache)."""
        return False

    def close(self) -> None:
        """Release everything the runner holds (files, threads); it is not used again."""
        self.end()


def family_recomputes_at(cfg: ModelConfig, family: Family, length: int) -> bool:
    """`Runner.recomputes_at` for a model of `family`: where its length group changes."""
    group = family.length_group
    return group is not None and group(cfg, length - 1) != group(cfg, length)


class InMemoryRunner(Runner):
    """decode: the C kernels (kernels/native.py): decode attention that reads only what each
    row sees (decode steps then compute the rows in flight alone), and prompts' attention;
    None: PyTorch's attention over every row."""

    def __init__(self, cfg: ModelConfig, family: Family, weights: ModelWeights,
                 dtype: torch.dtype, device: torch.device, decode: DecodeKernel | None = None):
        self.cfg, self.family, self.weights = cfg, family, weights
        self.dtype, self.device = dtype, device
        self.decode = decode if decode is not None and decode.handles(device, dtype, cfg.head_dim) else None
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._prefix: tuple[tuple[int, ...], list] | None = None  # (tokens, caches) of the last shared prefix
        # per block row: the slot where its copy of that prefix starts, -1 if it holds none
        self._prefix_at = torch.empty(0, dtype=torch.long)

    def begin(self, batch_size: int, capacity: int, prompt_width: int | None = None) -> None:
        self._cache = [self._empty_cache(batch_size, capacity) for _ in range(self.cfg.num_layers)]
        self._prefix_at = torch.full((batch_size,), -1, dtype=torch.long)

    def end(self) -> None:
        self._cache, self._prefix = [], None

    def recomputes_at(self, length: int) -> bool:
        return family_recomputes_at(self.cfg, self.family, length)

    def _hidden(self, input_ids: torch.Tensor, key_valid: torch.Tensor, start: int) -> torch.Tensor:
        ctx = make_context(self.cfg, self.family, key_valid, start, self.dtype, self.device, decode=self.decode)
        return self._forward(input_ids, ctx, self._cache)

    def _forward(self, input_ids: torch.Tensor, ctx: StepContext, caches) -> torch.Tensor:
        h = self.family.embed(self.cfg, self.weights.globals, input_ids.to(self.device), ctx)
        for j, (layer_weights, (k_cache, v_cache)) in enumerate(zip(self.weights.layers, caches)):
            ctx.layer = j
            h = self.family.layer(self.cfg, layer_weights, h, ctx, k_cache, v_cache, j)
        return h

    def _shared_prefix(self, ctx: StepContext, rows: list[int]) -> SharedPrefix | None:
        """The shared prefix the rows of a decode step hold copies of, if any does: attended
        once for all of them (kernels.SharedKeys) instead of from every row."""
        at = self._prefix_at[rows]
        readers = at >= 0
        if self._prefix is None or self.cfg.sliding_window is not None or not bool(readers.any()):
            return None  # (a window of the mask could hide part of the prefix: the rows' copies are read)
        slots = torch.arange(ctx.attn_mask.shape[-1])
        copy = readers[:, None] & (slots >= at[:, None]) & (slots < at[:, None] + len(self._prefix[0]))
        own_mask = ctx.attn_mask.masked_fill(copy.view(len(rows), 1, 1, -1), torch.finfo(ctx.attn_mask.dtype).min)
        return SharedPrefix(self._prefix[1], readers, own_mask)

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, key_valid: torch.Tensor, start: int,
             rows: list[int] | None = None) -> torch.Tensor:
        if rows is not None and (self.decode is None or input_ids.shape[1] != 1):
            return self.step(input_ids, key_valid, start)[rows]
        if rows is None:
            h = self._hidden(input_ids, key_valid, start)
        else:
            ctx = make_context(self.cfg, self.family, key_valid[rows], start, self.dtype, self.device,
                               decode=self.decode, rows=rows)
            ctx.shared = self._shared_prefix(ctx, rows)
            h = self._forward(input_ids[rows], ctx, self._cache)
        return self.family.head(self.cfg, self.weights.globals, h[:, -1:]).squeeze(1).cpu()

    @torch.inference_mode()
    def admit(self, rows: list[int], input_ids: torch.Tensor, key_valid: torch.Tensor, end: int,
              shared: int = 0) -> torch.Tensor:
        width = input_ids.shape[1]
        last = []
        for group, first in prompt_groups(key_valid, shared):
            # the group's own columns: the left padding all its prompts share is not computed
            ids, block_rows = input_ids[group, first:], rows[group]
            in_place = block_rows == list(range(block_rows[0], block_rows[-1] + 1))
            if in_place:
                # consecutive rows: computed in the block's cache itself, the padding columns
                # [shared, first) kept there but masked (and zeroed, so no stale value meets a
                # masked weight)
                caches = [tuple(c[block_rows[0]:block_rows[-1] + 1, :, end - width:end] for c in cache)
                          for cache in self._cache]
                valid, start = key_valid[group], first
                for cache in caches:
                    for kv in range(2):
                        cache[kv][:, :, shared:first] = 0
            else:  # computed apart, then placed
                valid = torch.cat([key_valid[group, :shared], key_valid[group, first:]], 1)
                caches, start = [self._empty_cache(len(block_rows), valid.shape[1]) for _ in self._cache], shared
            ctx = make_context(self.cfg, self.family, valid, start, self.dtype, self.device, decode=self.decode)
            if shared:
                ctx.shared = self._admit_prefix(caches, input_ids[0, :shared], ctx)
            last.append(self._forward(ids, ctx, caches)[:, -1:])
            if not in_place:
                self._place(caches, torch.tensor(block_rows), end - width, shared, end - (width - first))
            self._prefix_at[block_rows] = end - width if shared else -1
        h = torch.cat(last)
        return self.family.head(self.cfg, self.weights.globals, h[:, -1:]).squeeze(1).cpu()

    def prefilled_tokens(self, key_valid: torch.Tensor, shared: int) -> int:
        return shared + sum((group.stop - group.start) * (key_valid.shape[1] - first)
                            for group, first in prompt_groups(key_valid, shared))

    def _admit_prefix(self, caches, tokens: torch.Tensor, ctx: StepContext) -> SharedPrefix | None:
        """The shared prefix `tokens` of an admission: read in place of the rows' first slots
        where the many-query kernel computes the admission (`_rows_skip_prefix`), else copied
        into them."""
        prefix = self._prefix_cache(tokens)
        if self._rows_skip_prefix():  # (prompts of one token past it attend as decode steps do: rest, then prefix)
            own_mask = ctx.attn_mask.clone()
            own_mask[..., :len(tokens)] = torch.finfo(own_mask.dtype).min
            return SharedPrefix(prefix, torch.ones(own_mask.shape[0], dtype=torch.bool), own_mask)
        for cache, (keys, values) in zip(caches, prefix):
            cache[0][:, :, :len(tokens)], cache[1][:, :, :len(tokens)] = keys, values
        return None

    def _rows_skip_prefix(self) -> bool:
        """Whether admitted rows hold no copy of their shared prefix: every step reads it from
        its own keys then (admissions through the many-query kernel, decode steps as
        `SharedKeys`; no sliding window or soft-capped score needs the rows' copies), so its
        slots in each row are never written, read, or even touched."""
        cfg, kernel = self.cfg, self.decode
        return kernel is not None and kernel.many is not None \
            and kernel.many.handles(self.device, self.dtype, cfg.head_dim) \
            and cfg.sliding_window is None and cfg.local_window is None and cfg.attn_softcap is None

    def _place(self, fresh, index: torch.Tensor, begin: int, shared: int, own: int) -> None:
        """Admitted rows' keys and values into block rows `index`: the shared prefix at slots
        [begin, begin + shared) (unless rows hold none), the rest of each prompt at [own, end);
        the slots between are padding, zeroed so that no stale value meets a masked weight."""
        skip = self._rows_skip_prefix()
        for cache, new in zip(self._cache, fresh):
            for kv in range(2):
                if not skip:
                    cache[kv][index, :, begin:begin + shared] = new[kv][:, :, :shared]
                cache[kv][index, :, begin + shared:own] = 0
                cache[kv][index, :, own:own + new[kv].shape[2] - shared] = new[kv][:, :, shared:]

    def _empty_cache(self, n: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (n, self.cfg.num_kv_heads, width, self.cfg.head_dim)
        return (torch.empty(shape, dtype=self.dtype, device=self.device),
                torch.empty(shape, dtype=self.dtype, device=self.device))

    def _prefix_cache(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values [1, Hkv, P, D] per layer of the prefix `tokens` [P]: the last one is
        kept until the block ends, since the requests joining next often share it too."""
        key = tuple(tokens.tolist())
        if self._prefix is None or self._prefix[0] != key:
            if self._prefix is not None and self._rows_skip_prefix():
                self._copy_prefix_into_rows()
            self._prefix_at.fill_(-1)  # rows with the last one keep their copies, read as any keys
            caches = [self._empty_cache(1, len(key)) for _ in range(self.cfg.num_layers)]
            ctx = make_context(self.cfg, self.family, torch.ones(1, len(key), dtype=torch.bool), 0, self.dtype,
                               self.device, decode=self.decode)
            self._forward(tokens.unsqueeze(0), ctx, caches)
            self._prefix = (key, caches)
        return self._prefix[1]

    def _copy_prefix_into_rows(self) -> None:
        """The last shared prefix into the slots of the rows that read it apart: once another
        prefix replaces it, their steps read those slots as any keys."""
        for at in self._prefix_at.unique().tolist():
            if at >= 0:
                rows = (self._prefix_at == at).nonzero().squeeze(1)
                for cache, prefix in zip(self._cache, self._prefix[1]):
                    for kv in range(2):
                        cache[kv][rows, :, at:at + prefix[kv].shape[2]] = prefix[kv]

    @torch.inference_mode()
    def shift(self, offset: int, end: int) -> None:
        for cache in self._cache:
            for tensor in cache:
                shift_slots(tensor, offset, end)
        at = self._prefix_at  # a copy that starts before the offset is cut (a finished row's)
        self._prefix_at = torch.where(at >= offset, at - offset, torch.full_like(at, -1))

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor, key_valid: torch.Tensor, piece: int | None = None,
              top: int = 0) -> TokenScores:
        logprobs_of = lambda h, targets: target_logprobs(self.cfg, self.family, self.weights.globals, h, targets, top)
        return score_in_pieces(self._hidden, logprobs_of, input_ids, key_valid, piece)

    @torch.inference_mode()
    def score_packed(self, rows: PackedRows) -> TokenScores:
        ctx = packed_context(self.cfg, self.family, rows, self.dtype, self.device, self.decode)
        hidden = self._forward(rows.input_ids, ctx, [(None, None)] * self.cfg.num_layers)
        return source_logprobs(self.cfg, self.family, self.weights.globals, hidden, rows)


def prompt_groups(key_valid: torch.Tensor, shared: int) -> list[tuple[slice, int]]:
    """Consecutive groups of left-padded prompts (key_valid [n, W]; the first `shared`
    columns a prefix every row has) of about PREFILL_TOKENS computed tokens each, with the
    first column of each group's own tokens: the group is computed from there. Prompts that
    join together come longest first, so a group's padding is small."""
    starts = key_valid[:, shared:].int().argmax(1).add_(shared).tolist()  # every row has a token past the prefix
    width, groups, begin = key_valid.shape[1], [], 0
    while begin < len(starts):
        first, stop = starts[begin], begin + 1
        while stop < len(starts) and (stop + 1 - begin) * (width - min(first, starts[stop])) <= PREFILL_TOKENS:
            first, stop = min(first, starts[stop]), stop + 1
        groups.append((slice(begin, stop), first))
        begin = stop
    return groups


def shift_slots(cache: torch.Tensor, offset: int, end: int) -> None:
    """cache [n, Hkv, capacity, D]: slots [offset, end) moved to [0, end - offset)."""
    cache[:, :, :end - offset] = cache[:, :, offset:end].clone()
