"""Choosing the next token of each sequence from its logits, per-request parameters."""
from __future__ import annotations

import torch

from ..config import SamplingParams
from ..kernels import DecodeKernel


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order Hugging Face applies them). logits: [V]."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= 1 - params.top_p
        remove_sorted[-1] = False  # always keep the most likely token
        remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


class Sampler:
    """One random generator per sampled sequence of a block, kept by block row, so a seeded
    request draws the same tokens whatever else shares its block and whenever it joins."""

    def __init__(self):
        self.rows: dict[int, tuple[SamplingParams, torch.Generator]] = {}

    def assign(self, row: int, params: SamplingParams) -> None:
        """Row `row` now generates with `params` (a greedy request needs no generator)."""
        self.rows.pop(row, None)
        if not params.greedy:
            g = torch.Generator()
            g.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
            self.rows[row] = (params, g)

    def release(self, row: int) -> None:
        self.rows.pop(row, None)

    def greedy_pick(self, logits: torch.Tensor, rows: list[int],
                    kernel: DecodeKernel | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(next tokens, their log-probabilities) of block rows `rows` from the C kernel, in
        one pass where `sample` and `token_logprobs` take three; None if one of the rows
        samples, there is no kernel, or a logit is NaN."""
        if kernel is None or any(row in self.rows for row in rows):
            return None
        return kernel.greedy(logits)

    def sample(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """logits [n, V] fp32 of block rows `rows` -> next token ids [n] int64."""
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if row in self.rows:
                p, g = self.rows[row]
                probs = filter_logits(logits[i], p).softmax(-1)
                tokens[i] = torch.multinomial(probs, 1, generator=g)[0]
        return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the unmodified distribution. logits [B, V], tokens [B] -> [B]."""
    return torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)


def top_alternatives(logits: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The k most likely tokens of each row with their log-probabilities under the unmodified
    distribution, most likely first. logits [B, V] -> B lists of (token id, logprob)."""
    values, ids = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
    return [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
