"""The runner interface, and the runner that keeps every weight in memory.

A runner owns the KV cache of the batch it is generating. The generation loop and scoring
only call `begin`, `step` / `score` and `end`, and the LLM `close`s it, so the offloading
runner (offload_runner.py) replaces this one without changing them.
"""
from __future__ import annotations

import abc

import torch

from ..models import ops
from ..models.family import Family
from ..models.ops import StepContext
from ..models.spec import ModelConfig
from ..weights.loader import ModelWeights

HEAD_CHUNK = 256  # positions per head matmul when scoring, to bound the [B, S, V] logits


def make_context(cfg: ModelConfig, family: Family, key_valid: torch.Tensor, start: int,
                 dtype: torch.dtype, device: torch.device, attn_keep: float = 1.0,
                 kv_rotation: torch.Tensor | None = None) -> StepContext:
    ctx = StepContext(
        positions=ops.positions_from_mask(key_valid, start).to(device),
        start=start,
        attn_mask=ops.attention_mask(key_valid, start, dtype, cfg.sliding_window).to(device),
        attn_keep=attn_keep,
        kv_rotation=kv_rotation,
    )
    family.prepare_step(cfg, ctx, dtype)
    return ctx


class Runner(abc.ABC):
    """Forward steps over one batch at a time, with the batch's KV cache."""

    @abc.abstractmethod
    def begin(self, batch_size: int, capacity: int, prompt_width: int | None = None) -> None:
        """Start a batch of `batch_size` sequences of up to `capacity` tokens (KV cache slots)."""

    @abc.abstractmethod
    def step(self, input_ids: torch.Tensor, key_valid: torch.Tensor, start: int) -> torch.Tensor:
        """Append input_ids [B, S] at cache slot `start`; return last-position logits [B, V] fp32."""

    @abc.abstractmethod
    def score(self, input_ids: torch.Tensor, key_valid: torch.Tensor, piece: int | None = None) -> torch.Tensor:
        """Log-probability [B, S-1] of each token given the tokens before it."""

    @abc.abstractmethod
    def end(self) -> None:
        """Free the batch's KV cache."""

    def close(self) -> None:
        """Release everything the runner holds (files, threads); it is not used again."""
        self.end()


class InMemoryRunner(Runner):
    def __init__(self, cfg: ModelConfig, family: Family, weights: ModelWeights,
                 dtype: torch.dtype, device: torch.device):
        self.cfg, self.family, self.weights = cfg, family, weights
        self.dtype, self.device = dtype, device
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []

    def begin(self, batch_size: int, capacity: int, prompt_width: int | None = None) -> None:
        shape = (batch_size, self.cfg.num_kv_heads, capacity, self.cfg.head_dim)
        self._cache = [(torch.empty(shape, dtype=self.dtype, device=self.device),
                        torch.empty(shape, dtype=self.dtype, device=self.device))
                       for _ in range(self.cfg.num_layers)]

    def end(self) -> None:
        self._cache = []

    def _hidden(self, input_ids: torch.Tensor, key_valid: torch.Tensor, start: int) -> torch.Tensor:
        ctx = make_context(self.cfg, self.family, key_valid, start, self.dtype, self.device)
        h = self.family.embed(self.cfg, self.weights.globals, input_ids.to(self.device), ctx)
        for j, (layer_weights, (k_cache, v_cache)) in enumerate(zip(self.weights.layers, self._cache)):
            h = self.family.layer(self.cfg, layer_weights, h, ctx, k_cache, v_cache, j)
        return h

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, key_valid: torch.Tensor, start: int) -> torch.Tensor:
        h = self._hidden(input_ids, key_valid, start)
        return self.family.head(self.cfg, self.weights.globals, h[:, -1:]).squeeze(1).cpu()

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor, key_valid: torch.Tensor, piece: int | None = None) -> torch.Tensor:
        logprobs_of = lambda h, targets: target_logprobs(self.cfg, self.family, self.weights.globals, h, targets)
        return score_in_pieces(self._hidden, logprobs_of, input_ids, key_valid, piece)


def target_logprobs(cfg: ModelConfig, family: Family, global_weights, hidden: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[:, i] | hidden[:, i]) for aligned [B, T] positions, on the CPU.

    The head runs over HEAD_CHUNK positions at a time so [B, T, V] logits never exist at once.
    """
    out = [torch.empty(targets.shape[0], 0)]
    for s in range(0, targets.shape[1], HEAD_CHUNK):
        logits = family.head(cfg, global_weights, hidden[:, s:s + HEAD_CHUNK])
        logprobs = torch.log_softmax(logits, dim=-1)
        out.append(logprobs.gather(-1, targets[:, s:s + HEAD_CHUNK].unsqueeze(-1).to(logits.device))
                   .squeeze(-1).cpu())
    return torch.cat(out, dim=1)


def score_in_pieces(hidden_of, logprobs_of, input_ids: torch.Tensor, key_valid: torch.Tensor,
                    piece: int | None = None) -> torch.Tensor:
    """Log-probability [B, S-1] of each token given the tokens before it.

    The forward pass runs `piece` tokens at a time (default: all at once); each piece attends
    to the earlier ones through the KV cache, so with a compressed cache and small pieces
    the scores see the cache as generation does (piece 1 is exactly generation's view).
    hidden_of(ids, key_valid, start) -> [B, P, C]; logprobs_of(hidden, targets) -> [B, P].
    """
    width = input_ids.shape[1]
    piece = piece or width
    parts = []
    for start in range(0, width, piece):
        end = min(start + piece, width)
        hidden = hidden_of(input_ids[:, start:end], key_valid[:, :end], start)
        targets = input_ids[:, start + 1:end + 1]  # one shorter than the piece at the end
        parts.append(logprobs_of(hidden[:, :targets.shape[1]], targets))
    return torch.cat(parts, dim=1)
