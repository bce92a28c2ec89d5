"""The decoding loop of one batch: left-pad, prefill, then one token per step until every
sequence has met its EOS, stop string, stop token or length limit."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import SamplingParams
from ..structured import GrammarMasks
from .runner import Runner
from .sampling import Sampler, token_logprobs, top_alternatives


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


def left_pad(requests: list[Request], capacity: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids [B, S] left-padded, and key validity [B, capacity] (True at real tokens)."""
    width = max(len(r.token_ids) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    key_valid = torch.zeros((len(requests), capacity), dtype=torch.bool)
    for b, r in enumerate(requests):
        n = len(r.token_ids)
        ids[b, width - n:] = torch.tensor(r.token_ids, dtype=torch.long)
        key_valid[b, width - n:width] = True
    return ids, key_valid


def generate_batch(runner: Runner, requests: list[Request], tokenizer, eos_ids: set[int],
                   pad_id: int = 0, on_step=None) -> list[Completion]:
    """Generate for all `requests` together; returns one Completion per request, in order.

    on_step(n) is called after each step with the number of tokens it generated.
    """
    max_new = max(r.params.max_new_tokens for r in requests)
    prompt_width = max(len(r.token_ids) for r in requests)
    ids, key_valid = left_pad(requests, prompt_width + max_new, pad_id)
    trackers = [SequenceTracker(r, tokenizer, eos_ids) for r in requests]
    sampler = Sampler([r.params for r in requests])
    num_alternatives = max(r.params.top_logprobs for r in requests)
    runner.begin(len(requests), prompt_width + max_new, prompt_width)
    try:
        logits = runner.step(ids, key_valid[:, :prompt_width], 0)
        masks = grammar_masks(requests, tokenizer, logits.shape[-1])
        for step in range(max_new):
            # The mask acts on logits the model produced, so every placement shares this code.
            allowed = masks.apply(logits, active_rows(trackers)) if masks else logits
            tokens = sampler.sample(allowed)
            logprobs = token_logprobs(logits, tokens)
            alternatives = top_alternatives(logits, num_alternatives) if num_alternatives else None
            appended = 0
            for b, tracker in enumerate(trackers):
                if not tracker.out.finished:
                    token = int(tokens[b])
                    complete = masks.advance(b, token) if masks else False
                    tracker.append(token, float(logprobs[b]), alternatives and alternatives[b], complete)
                    appended += 1
            if on_step is not None:
                on_step(appended)
            if all(t.out.finished for t in trackers):
                break
            slot = prompt_width + step
            key_valid[:, slot] = True
            logits = runner.step(tokens.unsqueeze(1), key_valid[:, :slot + 1], slot)
    finally:
        runner.end()
    return [t.finish() for t in trackers]


def grammar_masks(requests: list[Request], tokenizer, vocab_size: int) -> GrammarMasks | None:
    """The grammar state of the requests that carry a response_format; None if none does."""
    rows = {b: r.params.response_format for b, r in enumerate(requests) if r.params.response_format}
    return GrammarMasks(tokenizer, vocab_size, rows) if rows else None


def active_rows(trackers: list[SequenceTracker]) -> set[int]:
    return {b for b, t in enumerate(trackers) if not t.out.finished}
