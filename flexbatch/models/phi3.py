"""Phi-3: the Llama layer with fused projections (one qkv_proj, one gate_up_proj), and
LongRoPE scaling (short and long factors, switched by the length a sequence has reached;
see ops.longrope_inv_freq) or partial rotary where the config says."""
from __future__ import annotations

import torch

from . import ops
from .family import Family, Weights
from .llama import ACTIVATIONS, embed, global_specs, head, prepare_step, proj, tied_aliases
from .ops import StepContext
from .spec import ModelConfig, WeightSpec


def layer_specs(cfg: ModelConfig) -> list[WeightSpec]:
    c, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    return [WeightSpec("input_layernorm.weight", (c,)),
            WeightSpec("self_attn.qkv_proj.weight", (qkv_rows, c)),
            WeightSpec("self_attn.o_proj.weight", (c, cfg.num_heads * d)),
            WeightSpec("post_attention_layernorm.weight", (c,)),
            WeightSpec("mlp.gate_up_proj.weight", (2 * i, c)),
            WeightSpec("mlp.down_proj.weight", (c, i))]


def _attention(cfg: ModelConfig, w: Weights, x: torch.Tensor, ctx: StepContext,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q, k, v = proj(w, "self_attn.qkv_proj", x).split([q_width, kv_width, kv_width], dim=-1)
    q = ops.apply_rotary(ops.split_heads(q, cfg.num_heads), ctx.cos, ctx.sin)
    k = ops.apply_rotary(ops.split_heads(k, cfg.num_kv_heads), ctx.cos, ctx.sin)
    attn = ops.cached_attention(q, k, ops.split_heads(v, cfg.num_kv_heads), k_cache, v_cache, ctx)
    return proj(w, "self_attn.o_proj", ops.merge_heads(attn))


def layer(cfg: ModelConfig, w: Weights, h: torch.Tensor, ctx: StepContext,
          k_cache: torch.Tensor, v_cache: torch.Tensor, j: int) -> torch.Tensor:
    x = ops.rms_norm(h, w["input_layernorm.weight"], cfg.norm_eps)
    h = h + _attention(cfg, w, x, ctx, k_cache, v_cache)
    x = ops.rms_norm(h, w["post_attention_layernorm.weight"], cfg.norm_eps)
    gate, up = proj(w, "mlp.gate_up_proj", x).chunk(2, dim=-1)
    return h + proj(w, "mlp.down_proj", ACTIVATIONS[cfg.hidden_act](gate) * up)


def length_group(cfg: ModelConfig, tokens: int) -> bool | None:
    """LongRoPE rotates a sequence with its long factors once it is longer than the original
    context (ops.longrope_inv_freq): sequences on either side of that length cannot share keys."""
    return tokens > cfg.rope.original_max_position_embeddings if cfg.rope.kind == "longrope" else None


FAMILY = Family(
    name="phi3", global_specs=global_specs, layer_specs=layer_specs,
    layer_prefix=lambda j: f"model.layers.{j}.", embed=embed, layer=layer, head=head,
    prepare_step=prepare_step, tied_aliases=tied_aliases, length_group=length_group,
)
