"""Mixtures of experts on the Llama attention: Mixtral (top-2 of 8 experts, weights
renormalised) and Qwen2-MoE (top-k, renormalised only if norm_topk_prob, plus a shared
expert behind a sigmoid gate). Each expert's matrices are ordinary layer weights, so they are
placed, streamed and compressed like any other; compute is grouped by expert over the
tokens routed to it (ops.mix_experts)."""
from __future__ import annotations

import torch

from . import ops
from .family import Family, Weights
from .llama import (
    ACTIVATIONS,
    attention,
    attention_specs,
    embed,
    gated_mlp,
    gated_mlp_specs,
    global_specs,
    head,
    prepare_step,
    proj,
    tied_aliases,
)
from .ops import StepContext
from .spec import ModelConfig, WeightSpec

# model type -> (block prefix, the expert's gate / up / down projection names)
EXPERT_LAYOUT = {"mixtral": ("block_sparse_moe.", ("w1", "w3", "w2")),
                 "qwen2_moe": ("mlp.", ("gate_proj", "up_proj", "down_proj"))}


def expert_names(model_type: str, e: int) -> tuple[str, str, str]:
    """Expert e's gate, up and down projections, relative to the layer (no `.weight`)."""
    block, names = EXPERT_LAYOUT[model_type]
    return tuple(f"{block}experts.{e}.{name}" for name in names)


def _expert_names(cfg: ModelConfig, e: int) -> tuple[str, str, str]:
    return expert_names(cfg.model_type, e)


def layer_specs(cfg: ModelConfig) -> list[WeightSpec]:
    c, i = cfg.hidden_size, cfg.intermediate_size
    block = EXPERT_LAYOUT[cfg.model_type][0]
    specs = [WeightSpec("input_layernorm.weight", (c,)), *attention_specs(cfg),
             WeightSpec("post_attention_layernorm.weight", (c,)),
             WeightSpec(f"{block}gate.weight", (cfg.num_experts, c))]
    for e in range(cfg.num_experts):
        gate, up, down = _expert_names(cfg, e)
        specs += [WeightSpec(f"{gate}.weight", (i, c)), WeightSpec(f"{up}.weight", (i, c)),
                  WeightSpec(f"{down}.weight", (c, i))]
    if cfg.shared_expert_size:
        specs += gated_mlp_specs(f"{block}shared_expert.", c, cfg.shared_expert_size)
        specs.append(WeightSpec(f"{block}shared_expert_gate.weight", (1, c)))
    return specs


def active_layer_params(cfg: ModelConfig) -> int:
    every = sum(spec.numel() for spec in layer_specs(cfg))
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
    return every - (cfg.num_experts - cfg.num_experts_per_tok) * per_expert


def _experts(cfg: ModelConfig, w: Weights, x: torch.Tensor) -> torch.Tensor:
    # x: [N, C], the step's tokens of this GPU batch flattened
    block = EXPERT_LAYOUT[cfg.model_type][0]
    weights, chosen = ops.route_top_k(proj(w, f"{block}gate", x), cfg.num_experts_per_tok, cfg.norm_topk_prob)
    act = ACTIVATIONS[cfg.hidden_act]

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up, down = _expert_names(cfg, e)
        return proj(w, down, act(proj(w, gate, rows)) * proj(w, up, rows))

    out = ops.mix_experts(x, weights.to(x.dtype), chosen, cfg.num_experts, expert)
    if cfg.shared_expert_size:
        shared = gated_mlp(cfg, w, f"{block}shared_expert.", x)
        out = out + torch.sigmoid(proj(w, f"{block}shared_expert_gate", x)) * shared
    return out


def layer(cfg: ModelConfig, w: Weights, h: torch.Tensor, ctx: StepContext,
          k_cache: torch.Tensor, v_cache: torch.Tensor, j: int) -> torch.Tensor:
    x = ops.rms_norm(h, w["input_layernorm.weight"], cfg.norm_eps)
    h = h + attention(cfg, w, x, ctx, k_cache, v_cache)
    x = ops.rms_norm(h, w["post_attention_layernorm.weight"], cfg.norm_eps)
    return h + _experts(cfg, w, x.reshape(-1, x.shape[-1])).view_as(h)


FAMILY = Family(
    name="moe", global_specs=global_specs, layer_specs=layer_specs,
    layer_prefix=lambda j: f"model.layers.{j}.", embed=embed, layer=layer, head=head,
    prepare_step=prepare_step, tied_aliases=tied_aliases, active_layer_params=active_layer_params,
)
