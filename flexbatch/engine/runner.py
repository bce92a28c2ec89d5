"""The runner interface, and the runner that keeps every weight in memory.

A runner owns the KV cache of the block it is generating. The generation loop calls
`begin`, `admit`, `step`, `shift` and `end`; scoring `begin`, `score` and `end` (or
`score_packed`, which keeps no cache),
and the LLM `close`s it, so the offloading runner (offload_runner.py) replaces this one
without changing them.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ..kernels import DecodeKernel
from ..models import ops
from ..models.family import Family
from ..models.ops import SharedPrefix, StepContext
from ..models.spec import ModelConfig
from ..weights.loader import ModelWeights
from .scoring import PackedRows

HEAD_ROWS = 512  # positions per head matmul when scoring: bounds the [rows, V] fp32 logits
# Tokens per forward pass of a prefill: larger passes' activations spill out of the CPU's
# caches, smaller ones lose to per-pass costs (the default model, bf16, 2 cores: a 64 x 200
# token admission 1.35x faster in passes of 4096 than at once; 1.1x slower in passes of 1024).
PREFILL_TOKENS = 4096


@dataclass
class TokenScores:
    """Per target token: log p(token | tokens before it), and whether it is the most likely."""

    logprobs: torch.Tensor  # [B, T] fp32, on the CPU
    greedy: torch.Tensor  # [B, T] bool: the target is the argmax of the model's distribution
    # when asked for: the k most likely tokens at each position, [B, T, k] ids and fp32 logprobs
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None

    @staticmethod
    def cat(parts: list["TokenScores"], dim: int) -> "TokenScores":
        joined = lambda name: None if getattr(parts[0], name) is None else \
            torch.cat([getattr(p, name) for p in parts], dim)
        return TokenScores(*(joined(name) for name in ("logprobs", "greedy", "top_ids", "top_logprobs")))


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
    ctx = StepContext(positions=positions, start=0, key_positions=positions,
                      attn_mask=ops.segment_mask(rows.positions, rows.segments, dtype, cfg.sliding_window).to(device),
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
        may hold within the runner's memory budget; 0 if not even one."""
        return limit

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
            if shared:
                for cache, prefix in zip(caches, self._prefix_cache(input_ids[0, :shared])):
                    for kv in range(2):
                        cache[kv][:, :, :shared] = prefix[kv]
            ctx = make_context(self.cfg, self.family, valid, start, self.dtype, self.device, decode=self.decode)
            last.append(self._forward(ids, ctx, caches)[:, -1:])
            if not in_place:
                self._place(caches, torch.tensor(block_rows), end - width, shared, end - (width - first))
            self._prefix_at[block_rows] = end - width if shared else -1
        h = torch.cat(last)
        return self.family.head(self.cfg, self.weights.globals, h[:, -1:]).squeeze(1).cpu()

    def prefilled_tokens(self, key_valid: torch.Tensor, shared: int) -> int:
        return shared + sum((group.stop - group.start) * (key_valid.shape[1] - first)
                            for group, first in prompt_groups(key_valid, shared))

    def _place(self, fresh, index: torch.Tensor, begin: int, shared: int, own: int) -> None:
        """Admitted rows' keys and values into block rows `index`: the shared prefix at slots
        [begin, begin + shared), the rest of each prompt at [own, end); the slots between are
        padding, zeroed so that no stale value meets a masked attention weight."""
        for cache, new in zip(self._cache, fresh):
            for kv in range(2):
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
            self._prefix_at.fill_(-1)  # rows with the last one keep their copies, read as any keys
            caches = [self._empty_cache(1, len(key)) for _ in range(self.cfg.num_layers)]
            ctx = make_context(self.cfg, self.family, torch.ones(1, len(key), dtype=torch.bool), 0, self.dtype,
                               self.device, decode=self.decode)
            self._forward(tokens.unsqueeze(0), ctx, caches)
            self._prefix = (key, caches)
        return self._prefix[1]

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


def source_logprobs(cfg: ModelConfig, family: Family, global_weights, hidden: torch.Tensor,
                    rows: PackedRows) -> TokenScores:
    """Scores of rows.targets from the hidden states [B, S, C] at rows.sources."""
    index = rows.sources.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return target_logprobs(cfg, family, global_weights, hidden.gather(1, index), rows.targets)


def target_logprobs(cfg: ModelConfig, family: Family, global_weights, hidden: torch.Tensor,
                    targets: torch.Tensor, top: int = 0) -> TokenScores:
    """Scores of targets[:, i] from hidden[:, i], for aligned [B, T] positions, on the CPU,
    with the `top` most likely tokens at each position.

    The head runs over HEAD_ROWS positions at a time so [B, T, V] logits never exist at once.
    """
    b, t = targets.shape
    flat_hidden, flat_targets = hidden.reshape(1, b * t, hidden.shape[-1]), targets.reshape(1, b * t).to(hidden.device)
    logprobs, greedy = [torch.empty(1, 0)], [torch.empty(1, 0, dtype=torch.bool)]
    top_ids, top_logprobs = [torch.empty(1, 0, top, dtype=torch.long)], [torch.empty(1, 0, top)]
    for s in range(0, b * t, HEAD_ROWS):
        logits = torch.log_softmax(family.head(cfg, global_weights, flat_hidden[:, s:s + HEAD_ROWS]).float(), dim=-1)
        chunk = flat_targets[:, s:s + HEAD_ROWS]
        logprobs.append(logits.gather(-1, chunk.unsqueeze(-1)).squeeze(-1).cpu())
        greedy.append((logits.argmax(-1) == chunk).cpu())
        if top:
            best = logits.topk(top, dim=-1)
            top_ids.append(best.indices.cpu())
            top_logprobs.append(best.values.cpu())
    tops = (torch.cat(top_ids, 1).view(b, t, top), torch.cat(top_logprobs, 1).view(b, t, top)) if top else (None, None)
    return TokenScores(torch.cat(logprobs, 1).view(b, t), torch.cat(greedy, 1).view(b, t), *tops)


def score_in_pieces(hidden_of, logprobs_of, input_ids: torch.Tensor, key_valid: torch.Tensor,
                    piece: int | None = None) -> TokenScores:
    """Scores [B, S-1] of each token given the tokens before it.

    The forward pass runs `piece` tokens at a time (default: all at once); each piece attends
    to the earlier ones through the KV cache, so with a compressed cache and small pieces
    the scores see the cache as generation does (piece 1 is exactly generation's view).
    hidden_of(ids, key_valid, start) -> [B, P, C]; logprobs_of(hidden, targets) -> TokenScores [B, P].
    """
    width = input_ids.shape[1]
    piece = piece or width
    parts = []
    for start in range(0, width, piece):
        end = min(start + piece, width)
        hidden = hidden_of(input_ids[:, start:end], key_valid[:, :end], start)
        targets = input_ids[:, start + 1:end + 1]  # one shorter than the piece at the end
        parts.append(logprobs_of(hidden[:, :targets.shape[1]], targets))
    return TokenScores.cat(parts, dim=1)
