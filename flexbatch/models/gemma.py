"""Gemma 2 and Gemma 3 (text): embeddings scaled by sqrt(hidden), (1 + w) RMSNorm, norms
before and after both attention and MLP, GeGLU MLP, layers alternating sliding-window and
global attention. Gemma 2 soft-caps attention scores and final logits; Gemma 3 norms each
query and key head and gives local layers their own rope base."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import linear
from . import ops
from .family import Family, Weights
from .family_configs import SLIDING
from .llama import attention_specs, gated_mlp, gated_mlp_specs, global_specs, proj, tied_aliases
from .ops import StepContext
from .spec import ModelConfig, WeightSpec

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def layer_specs(cfg: ModelConfig) -> list[WeightSpec]:
    c, d = cfg.hidden_size, cfg.head_dim
    specs = [WeightSpec(f"{name}.weight", (c,)) for name in NORMS]
    specs += attention_specs(cfg)
    if cfg.qk_norm:
        specs += [WeightSpec("self_attn.q_norm.weight", (d,)), WeightSpec("self_attn.k_norm.weight", (d,))]
    return specs + gated_mlp_specs("mlp.", c, cfg.intermediate_size, cfg.mlp_bias)


def prepare_step(cfg: ModelConfig, ctx: StepContext, dtype: torch.dtype) -> None:
    ctx.cos, ctx.sin = ops.rope_tables(cfg.rope, cfg.head_dim, ctx.positions, dtype)
    ctx.local_cos, ctx.local_sin = ctx.cos, ctx.sin
    if cfg.local_rope != cfg.rope:
        ctx.local_cos, ctx.local_sin = ops.rope_tables(cfg.local_rope, cfg.head_dim, ctx.positions, dtype)
    ctx.local_mask = ops.sliding_window_mask(ctx, cfg.local_window)


def embed(cfg: ModelConfig, w: Weights, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    table = w["model.embed_tokens.weight"]
    # The scale is rounded to the table's dtype first, as the checkpoints were trained.
    return F.embedding(input_ids, table) * torch.tensor(cfg.hidden_size ** 0.5, dtype=table.dtype)


def _norm(cfg: ModelConfig, w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    return ops.rms_norm(x, w[f"{name}.weight"], cfg.norm_eps, unit_offset=True)


def _attention(cfg: ModelConfig, w: Weights, x: torch.Tensor, ctx: StepContext,
               k_cache: torch.Tensor, v_cache: torch.Tensor, local: bool) -> torch.Tensor:
    q = ops.split_heads(proj(w, "self_attn.q_proj", x), cfg.num_heads)
    k = ops.split_heads(proj(w, "self_attn.k_proj", x), cfg.num_kv_heads)
    v = ops.split_heads(proj(w, "self_attn.v_proj", x), cfg.num_kv_heads)
    if cfg.qk_norm:
        q, k = _norm(cfg, w, "self_attn.q_norm", q), _norm(cfg, w, "self_attn.k_norm", k)
    cos, sin = (ctx.local_cos, ctx.local_sin) if local else (ctx.cos, ctx.sin)
    q, k = ops.apply_rotary(q, cos, sin), ops.apply_rotary(k, cos, sin)
    attn = ops.cached_attention(q, k, v, k_cache, v_cache, ctx, scale=cfg.query_scale, local=local,
                                softcap=cfg.attn_softcap)
    return proj(w, "self_attn.o_proj", ops.merge_heads(attn))


def layer(cfg: ModelConfig, w: Weights, h: torch.Tensor, ctx: StepContext,
          k_cache: torch.Tensor, v_cache: torch.Tensor, j: int) -> torch.Tensor:
    local = cfg.layer_types[j] == SLIDING
    attn = _attention(cfg, w, _norm(cfg, w, "input_layernorm", h), ctx, k_cache, v_cache, local)
    h = h + _norm(cfg, w, "post_attention_layernorm", attn)
    mlp = gated_mlp(cfg, w, "mlp.", _norm(cfg, w, "pre_feedforward_layernorm", h))
    return h + _norm(cfg, w, "post_feedforward_layernorm", mlp)


def head(cfg: ModelConfig, w: Weights, h: torch.Tensor) -> torch.Tensor:
    logits = linear(_norm(cfg, w, "model.norm", h), w["lm_head.weight"]).float()
    return ops.soft_cap(logits, cfg.final_softcap)


FAMILY = Family(
    name="gemma", global_specs=global_specs, layer_specs=layer_specs,
    layer_prefix=lambda j: f"model.layers.{j}.", embed=embed, layer=layer, head=head,
    prepare_step=prepare_step, tied_aliases=tied_aliases,
)
