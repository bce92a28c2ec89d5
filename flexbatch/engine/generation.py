"""The decoding loop with continuous refill: a block of rows generates one token per step
for every sequence in flight, and when sequences finish, waiting requests take their rows.

Every row writes its next token into the same KV cache slot, the block's clock `t`, so the
cache of every placement (runner.py, offload_runner.py) keeps appending one slot range per
step. A request joining the block is prefilled on its own and its prompt's keys and values
fill the slots just before the clock (`Runner.admit`); its row attends to nothing left of
them (`key_valid`), and positions count valid slots, so each sequence sees exactly its own
tokens, as when generated alone. Requests joining together that share a prefix compute it
once: each row holds the prefix, padding, then the rest of its prompt (`prefix_layout`).

Requests join longest prompt first, so the clock is always at least as far as a newcomer's
prompt is long; when it reaches the cache's capacity, the slots still in use move to the
cache's start (`Runner.shift`). The schedule is a function of the requests and the tokens
they generate, so a rerun of the same requests (a resumed job) repeats it exactly.

A server also feeds the block requests that arrive while it runs (`Arrivals`): they queue
longest first beside the call's own, and one whose prompt is longer than the clock waits
for the clock to reach it.
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Protocol

import torch

from ..config import SamplingParams
from ..sizing import block_capacity
from ..structured import GrammarMasks
from .runner import Runner
from .sampling import Sampler, token_logprobs, top_alternatives

# Newcomers join once this fraction of the block's rows is free: each admission is one more
# prefill pass (with weights offloaded, one more read of them).
REFILL_FRACTION = 1 / 8
# Requests joining together that share at least this many leading tokens (a system prompt,
# few-shot examples) compute them once (`Runner.admit`'s `shared`).
MIN_SHARED_PREFIX = 16


@dataclass
class Request:
    token_ids: list[int]
    params: SamplingParams


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None  # "stop" | "length"
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: (id, logprob), most likely first

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SequenceTracker:
    """Accumulates one sequence's tokens and decides when it is finished."""

    def __init__(self, request: Request, tokenizer, eos_ids: set[int]):
        self.params = request.params
        self.tokenizer = tokenizer
        self.stop_ids = set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else eos_ids)
        self.out = Completion(logprobs=[] if self.params.logprobs else None,
                              top_logprobs=[] if self.params.top_logprobs else None)

    def append(self, token: int, logprob: float, alternatives=None, grammar_complete: bool = False) -> None:
        """grammar_complete: the token completed the request's response_format (nothing may follow)."""
        out = self.out
        out.token_ids.append(token)
        if out.logprobs is not None:
            out.logprobs.append(logprob)
        if out.top_logprobs is not None:
            out.top_logprobs.append(alternatives[:self.params.top_logprobs])
        if token in self.stop_ids or grammar_complete:
            out.finish_reason = "stop"
        elif self.params.stop and self._cut_at_stop_string():
            out.finish_reason = "stop"
        elif len(out.token_ids) >= self.params.max_new_tokens:
            out.finish_reason = "length"

    def _cut_at_stop_string(self) -> bool:
        # Checked after every token, so the first hit is the token that completed the string.
        text = self.tokenizer.decode(self.out.token_ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            self.out.text = text[:min(hits)]
        return bool(hits)

    def finish(self) -> Completion:
        if self.out.text is None and self.tokenizer is not None:
            self.out.text = self.tokenizer.decode(self.out.token_ids, skip_special_tokens=True)
        return self.out


@dataclass
class Vocabulary:
    """What decoding needs of the tokenizer and the model's vocabulary."""

    tokenizer: object | None  # None: token ids only (no stop strings, no response_format)
    eos_ids: set[int]
    pad_id: int
    size: int


@dataclass
class BlockStats:
    """What a block's schedule cost, added up over the calls it is passed to."""

    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0  # prompt slots prefilled, left padding included
    row_steps: int = 0  # block rows computed by decode steps
    live_row_steps: int = 0  # of them, rows holding a sequence in flight
    admissions: int = 0  # prefill passes of prompts joining a block

    @property
    def padding_overhead(self) -> float:
        return self.padded_prompt_tokens / self.prompt_tokens - 1.0 if self.prompt_tokens else 0.0

    @property
    def occupancy(self) -> float:
        """The share of decode rows that held a sequence (1.0: no row ever idled)."""
        return self.live_row_steps / self.row_steps if self.row_steps else 1.0


def left_pad(prompts: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids [B, width] left-padded, and their validity [B, width] (True at real tokens)."""
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for b, prompt in enumerate(prompts):
        if prompt:
            ids[b, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            valid[b, width - len(prompt):] = True
    return ids, valid


def prefix_layout(prompts: list[list[int]], shared: int, width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `left_pad`, but the first `shared` tokens (the same in every prompt) come first in
    every row, then padding, then the rest of each prompt: the prefix is computed once."""
    ids, valid = left_pad([p[shared:] for p in prompts], width - shared, pad_id)
    prefix = torch.tensor(prompts[0][:shared], dtype=torch.long).expand(len(prompts), shared)
    return torch.cat([prefix, ids], 1), torch.cat([torch.ones(len(prompts), shared, dtype=torch.bool), valid], 1)


class Arrivals(Protocol):
    """Requests that arrive while a block runs (online serving), for `generate` to admit into
    rows that free up. Those taken are numbered after the call's own requests, in the order
    `take` returns them: the index on_finish is called with, and their place in its result."""

    def waiting(self) -> int:
        """How many have arrived and not been taken."""

    def expected(self) -> int:
        """How many rows a block starting now should keep for arrivals: at least those
        waiting, more where the demand seen lately says they are coming."""

    def take(self, limit: int, fits: Callable[[Request], bool]) -> list[Request]:
        """Without waiting, up to `limit` arrived requests, first come first. One for which
        `fits` is false stays first in line and nothing more is taken for this block: the
        block drains, and that request starts the next one."""


@dataclass
class Joining:
    """Which arrivals a block admits: those with room in its rows (prompt and generation
    within `span`, no response_format: its grammar is compiled as a block starts). A block
    smaller than `most_rows` takes none once more are waiting than it has rows: it drains,
    so that a block as large as the demand can form."""

    arrivals: Arrivals
    span: int
    rows: int
    most_rows: int

    def fits(self, request: Request) -> bool:
        return len(request.token_ids) + request.params.max_new_tokens <= self.span \
            and request.params.response_format is None

    def take(self, free: int) -> list[Request]:
        if free <= 0 or (self.rows < self.most_rows and self.arrivals.waiting() > self.rows):
            return []
        return self.arrivals.take(free, self.fits)


def generate(runner: Runner, requests: list[Request], block_size: int, vocab: Vocabulary,
             on_step=None, on_finish=None, stats: BlockStats | None = None,
             arrivals: Arrivals | None = None) -> list[Completion]:
    """Generate for all `requests` with `block_size` sequences in flight; one Completion per
    request, in order. on_step(n): n tokens were generated; on_finish(i, completion): request
    i is done (called as each finishes); `stats`, if given, is added to. With `arrivals`,
    requests that arrive meanwhile join the block too (their completions follow)."""
    if not requests:
        return []
    masks = grammar_masks(requests, vocab)
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].token_ids), i))
    # A row spans at most its joining group's width (the prefix layout starts every row there)
    # plus what it generates.
    span = len(requests[order[0]].token_ids) + max(r.params.max_new_tokens for r in requests)
    size = min(block_size, len(requests) + (arrivals.expected() if arrivals else 0))
    capacity = block_capacity(span, refills=len(requests) > block_size or arrivals is not None)
    block = Block(runner, size, capacity, vocab, masks, on_step, on_finish, stats or BlockStats(), span)
    # the memory check counts prompts as wide as the longest that may join: with arrivals, a span's
    runner.begin(block.size, capacity, span if arrivals else len(requests[order[0]].token_ids))
    try:
        block.run(requests, deque(order), arrivals and Joining(arrivals, span, size, block_size))
    finally:
        runner.end()
    return block.results


def grammar_masks(requests: list[Request], vocab: Vocabulary) -> GrammarMasks | None:
    """The grammar state for requests that carry a response_format (each compiled now, so a
    bad schema fails before any work); None if none does."""
    formats = [r.params.response_format for r in requests if r.params.response_format]
    if not formats:
        return None
    masks = GrammarMasks(vocab.tokenizer, vocab.size)
    for fmt in formats:
        masks.compile(fmt)
    return masks


class Block:
    """The rows of a block in flight: which request each row holds, the KV cache slots its
    tokens fill (`key_valid` [rows, capacity]), and the clock `t` all rows write at next."""

    def __init__(self, runner: Runner, size: int, capacity: int, vocab: Vocabulary, masks: GrammarMasks | None,
                 on_step=None, on_finish=None, stats: BlockStats | None = None, span: int | None = None):
        self.runner, self.size, self.capacity, self.vocab, self.masks = runner, size, capacity, vocab, masks
        self.span = span or capacity  # the most slots a row may need, prompt and generation
        self.on_step, self.on_finish, self.stats = on_step, on_finish, stats or BlockStats()
        self.key_valid = torch.zeros((size, capacity), dtype=torch.bool)
        self.tokens = torch.full((size,), vocab.pad_id, dtype=torch.long)  # each row's latest token
        self.starts = [0] * size  # each row's first cache slot
        self.live: dict[int, tuple[int, SequenceTracker]] = {}  # row -> (request index, its tracker)
        self.sampler = Sampler()
        self.prefix: list[int] = []  # the shared prefix computed last
        self.t = 0
        self.requests: list[Request] = []
        self.results: list[Completion | None] = []

    def run(self, requests: list[Request], queue: deque, joining: Joining | None = None) -> None:
        """Generate `requests` (`queue`: their indices, longest prompt first), and with
        `joining`, the arrivals it admits (appended to `requests`)."""
        self.requests, self.results = requests, [None] * len(requests)
        while True:
            if joining is not None:
                self.join(joining.take(self.size - len(self.live) - len(queue)), queue)
            if not (queue or self.live):
                return
            free = self.size - len(self.live)
            if queue and (not self.live or free >= min(len(queue), max(1, int(self.size * REFILL_FRACTION)))):
                self.admit(queue)
            if self.live:
                self.decode(queue)

    def join(self, arrived: list[Request], queue: deque) -> None:
        """Queue requests that arrived while the block runs, keeping it longest prompt first."""
        for request in arrived:
            self.requests.append(request)
            self.results.append(None)
            width = len(request.token_ids)
            at = next((k for k, i in enumerate(queue) if len(self.requests[i].token_ids) < width), len(queue))
            queue.insert(at, len(self.requests) - 1)

    def admit(self, queue: deque) -> None:
        """Prefill waiting requests into the free rows, right-aligned at the clock. While rows
        are in flight, a prompt longer than the clock waits (the clock only grows until a
        shift, and a shift keeps room for the longest waiting prompt)."""
        free = [r for r in range(self.size) if r not in self.live]
        joining = list(islice((i for i in queue if not self.live or len(self.requests[i].token_ids) <= self.t),
                              len(free)))
        if not joining:
            return
        for i in joining:
            queue.remove(i)
        rows = free[:len(joining)]
        prompts = [self.requests[i].token_ids for i in joining]
        width = len(prompts[0])  # the longest: requests join longest first
        if not self.live:
            self.t = width  # nothing to keep: the clock restarts
        assert self.t >= width, "requests must join longest prompt first"
        # with a shared prefix every row starts where the longest prompt does, so each needs
        # that width and its own generation (always within the span, unless arrivals joined)
        roomy = width + max(self.requests[i].params.max_new_tokens for i in joining) <= self.span
        shared = self.shared_prefix(prompts) if roomy else 0
        ids, valid = prefix_layout(prompts, shared, width, self.vocab.pad_id)
        logits = self.runner.admit(rows, ids, valid, self.t, shared)
        self.stats.admissions += 1
        self.stats.prompt_tokens += sum(map(len, prompts))
        self.stats.padded_prompt_tokens += self.runner.prefilled_tokens(valid, shared)
        for row, index, row_valid in zip(rows, joining, valid):
            self.key_valid[row] = False
            self.key_valid[row, self.t - width:self.t] = row_valid
            self.starts[row] = self.t - width + int(row_valid.int().argmax())  # its first token's slot
            request = self.requests[index]
            self.live[row] = (index, SequenceTracker(request, self.vocab.tokenizer, self.vocab.eos_ids))
            self.sampler.assign(row, request.params)
            if self.masks:
                self.masks.assign(row, request.params.response_format)
        self.choose(logits, rows)

    def shared_prefix(self, prompts: list[list[int]]) -> int:
        """Leading tokens the joining prompts share, to compute once: the prefix used last if
        they all start with it (a runner may have kept its keys and values), else their
        longest common prefix if at least MIN_SHARED_PREFIX long and shared by two or more.
        Every prompt keeps at least its last token out of it, for its logits."""
        longest = os.path.commonprefix(prompts)[:min(map(len, prompts)) - 1]
        if self.prefix and longest[:len(self.prefix)] == self.prefix:
            return len(self.prefix)
        if len(longest) < MIN_SHARED_PREFIX or len(prompts) < 2:
            return 0
        self.prefix = list(longest)
        return len(longest)

    def decode(self, queue: deque) -> None:
        """One token for every row in flight, written at the clock."""
        if self.t == self.capacity:
            longest_waiting = len(self.requests[queue[0]].token_ids) if queue else 0
            self.shift(max(max(self.t - self.starts[r] for r in self.live), longest_waiting))
        rows = sorted(self.live)
        for row in rows:
            index, tracker = self.live[row]  # the step appends its latest token: the sequence's length
            if self.runner.recomputes_at(len(self.requests[index].token_ids) + len(tracker.out.token_ids)):
                self.recompute(row)
        self.key_valid[rows, self.t] = True
        logits = self.runner.step(self.tokens.unsqueeze(1), self.key_valid[:, :self.t + 1], self.t, rows)
        self.t += 1
        self.stats.row_steps += self.size
        self.stats.live_row_steps += len(rows)
        self.choose(logits, rows)

    def recompute(self, row: int) -> None:
        """Compute the row's whole sequence again, its latest token included, into its own
        slots up to the clock's (the step that follows writes that slot once more, alike)."""
        index, tracker = self.live[row]
        tokens = self.requests[index].token_ids + tracker.out.token_ids  # the latest is not in the cache yet
        start = self.starts[row]
        valid = self.key_valid[row, start:self.t + 1].clone()
        valid[-1] = True
        ids = torch.full((1, valid.numel()), self.vocab.pad_id, dtype=torch.long)
        ids[0, valid] = torch.tensor(tokens, dtype=torch.long)
        self.runner.admit([row], ids, valid.unsqueeze(0), self.t + 1)

    def shift(self, keep: int) -> None:
        """Move the last `keep` slots before the clock to the cache's start."""
        offset = self.t - keep
        self.runner.shift(offset, self.t)
        self.key_valid[:, :keep] = self.key_valid[:, offset:self.t].clone()
        self.key_valid[:, keep:] = False
        self.starts = [s - offset for s in self.starts]
        self.t = keep

    def choose(self, logits: torch.Tensor, rows: list[int]) -> None:
        """Pick the next token of block rows `rows` from their logits [n, V]; finish those done."""
        # The mask acts on logits the model produced, so every placement shares this code.
        picked = None if self.masks else self.sampler.greedy_pick(logits, rows, self.runner.decode)
        num_alternatives = max(self.live[r][1].params.top_logprobs for r in rows)
        if picked is None or num_alternatives:
            logits = logits.float()  # the runner's are in the model's dtype
        if picked is not None:
            tokens, logprobs = picked
        else:
            tokens = self.sampler.sample(self.masks.apply(logits, rows) if self.masks else logits, rows)
            logprobs = token_logprobs(logits, tokens)
        alternatives = top_alternatives(logits, num_alternatives) if num_alternatives else None
        self.tokens[rows] = tokens
        for i, row in enumerate(rows):
            token, tracker = int(tokens[i]), self.live[row][1]
            complete = self.masks.advance(row, token) if self.masks else False
            tracker.append(token, float(logprobs[i]), alternatives and alternatives[i], complete)
            if tracker.out.finished:
                self.finish(row)
        if self.on_step is not None:
            self.on_step(len(rows))

    def finish(self, row: int) -> None:
        index, tracker = self.live.pop(row)
        self.results[index] = tracker.finish()
        self.key_valid[row] = False
        self.sampler.release(row)
        if self.masks:
            self.masks.assign(row, None)
        if self.on_finish is not None:
            self.on_finish(index, self.results[index])
