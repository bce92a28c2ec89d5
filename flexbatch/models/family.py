"""The interface every model family implements, and the registry that finds one by config."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .ops import StepContext
from .spec import ModelConfig, WeightSpec

Weights = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """Pure functions that define one model family.

    Global weights use their full checkpoint names (e.g. `model.embed_tokens.weight`); layer
    weights use names relative to the layer prefix (e.g. `self_attn.q_proj.weight`), so the
    same `layer` function serves every layer.
    """

    name: str
    global_specs: Callable[[ModelConfig], list[WeightSpec]]
    layer_specs: Callable[[ModelConfig], list[WeightSpec]]
    layer_prefix: Callable[[int], str]
    # embed(cfg, weights, input_ids [B, S], ctx) -> hidden [B, S, C]
    embed: Callable[[ModelConfig, Weights, torch.Tensor, StepContext], torch.Tensor]
    # layer(cfg, layer_weights, hidden, ctx, k_cache, v_cache, j) -> hidden; j is the layer's
    # index, for families whose layers differ (Gemma's local and global attention)
    layer: Callable[..., torch.Tensor]
    # head(cfg, weights, hidden [B, S, C]) -> logits [B, S, V] in the compute dtype or fp32: a
    # consumer that needs fp32 converts them (greedy decoding reads bf16 as it is)
    head: Callable[[ModelConfig, Weights, torch.Tensor], torch.Tensor]
    # Fill family-specific parts of the step context (rotary tables); may be a no-op.
    prepare_step: Callable[[ModelConfig, StepContext, torch.dtype], None]
    # Checkpoint names that may be absent because they are tied to another tensor.
    tied_aliases: Callable[[ModelConfig], dict[str, str]]
    # Parameters of one layer that one token multiplies by, for compute estimates; None: all of
    # the layer's (a mixture of experts: the shared part and its top-k experts only, though a
    # large block's tokens together reach, and load, every expert).
    active_layer_params: Callable[[ModelConfig], int] | None = None
    # Families whose computation depends on a sequence's whole length (Phi-3's LongRoPE picks
    # its rotary factors by it): length_group(cfg, tokens) -> a key; sequences share a packed
    # scoring row (and its prefix's keys) only within one group. None: any lengths may share.
    length_group: Callable[[ModelConfig, int], object] | None = None


FAMILY_MODULES = {"opt": "opt", "llama": "llama", "gemma": "gemma", "phi3": "phi3", "moe": "moe"}


def get_family(cfg: ModelConfig) -> Family:
    module = importlib.import_module(f".{FAMILY_MODULES[cfg.family]}", __package__)
    return module.FAMILY
