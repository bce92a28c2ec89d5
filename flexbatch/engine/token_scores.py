"""A model's scores of given tokens: log p(token | the tokens before it), whether it is the
most likely one, and the most likely tokens, computed from hidden states by the model's
head a bounded number of positions at a time (every runner scores through these)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.family import Family
from ..models.spec import ModelConfig
from .scoring import PackedRows

HEAD_ROWS = 512  # positions per head matmul when scoring: bounds the [rows, V] fp32 logits


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
