"""Llama family: Llama 2/3 (GQA, Llama 3 rope scaling), Mistral (sliding window), Qwen2 (qkv
bias) and tied embeddings (SmolLM2). Pre-norm RMSNorm, rotary positions, gated SiLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import linear
from . import ops
from .family import Family, Weights
from .ops import StepContext
from .spec import ModelConfig, WeightSpec

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def global_specs(cfg: ModelConfig) -> list[WeightSpec]:
    v, c = cfg.vocab_size, cfg.hidden_size
    return [WeightSpec("model.embed_tokens.weight", (v, c)),
            WeightSpec("model.norm.weight", (c,)),
            WeightSpec("lm_head.weight", (v, c))]


def layer_specs(cfg: ModelConfig) -> list[WeightSpec]:
    c, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    specs = [WeightSpec("input_layernorm.weight", (c,))]
    for name, rows in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
        specs.append(WeightSpec(f"self_attn.{name}.weight", (rows, c)))
        if cfg.qkv_bias:
            specs.append(WeightSpec(f"self_attn.{name}.bias", (rows,)))
    specs.append(WeightSpec("self_attn.o_proj.weight", (c, q_out)))
    if cfg.o_bias:
        specs.append(WeightSpec("self_attn.o_proj.bias", (c,)))
    specs.append(WeightSpec("post_attention_layernorm.weight", (c,)))
    for name, shape in (("gate_proj", (i, c)), ("up_proj", (i, c)), ("down_proj", (c, i))):
        specs.append(WeightSpec(f"mlp.{name}.weight", shape))
        if cfg.mlp_bias:
            specs.append(WeightSpec(f"mlp.{name}.bias", (shape[0],)))
    return specs


def tied_aliases(cfg: ModelConfig) -> dict[str, str]:
    return {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else {}


def prepare_step(cfg: ModelConfig, ctx: StepContext, dtype: torch.dtype) -> None:
    inv_freq = ops.rope_inv_freq(cfg.rope, cfg.head_dim).to(ctx.positions.device)
    ctx.cos, ctx.sin = ops.rotary_tables(inv_freq, ctx.positions, dtype)


def embed(cfg: ModelConfig, w: Weights, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    return F.embedding(input_ids, w["model.embed_tokens.weight"])


def _proj(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    return linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def layer(cfg: ModelConfig, w: Weights, h: torch.Tensor, ctx: StepContext,
          k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    x = ops.rms_norm(h, w["input_layernorm.weight"], cfg.norm_eps)
    q = ops.split_heads(_proj(w, "self_attn.q_proj", x), cfg.num_heads)
    k = ops.split_heads(_proj(w, "self_attn.k_proj", x), cfg.num_kv_heads)
    v = ops.split_heads(_proj(w, "self_attn.v_proj", x), cfg.num_kv_heads)
    q = ops.apply_rotary(q, ctx.cos, ctx.sin)
    k = ops.apply_rotary(k, ctx.cos, ctx.sin)
    attn = ops.cached_attention(q, k, v, k_cache, v_cache, ctx)
    h = h + _proj(w, "self_attn.o_proj", ops.merge_heads(attn))
    x = ops.rms_norm(h, w["post_attention_layernorm.weight"], cfg.norm_eps)
    act = ACTIVATIONS[cfg.hidden_act]
    gated = act(_proj(w, "mlp.gate_proj", x)) * _proj(w, "mlp.up_proj", x)
    return h + _proj(w, "mlp.down_proj", gated)


def head(cfg: ModelConfig, w: Weights, h: torch.Tensor) -> torch.Tensor:
    x = ops.rms_norm(h, w["model.norm.weight"], cfg.norm_eps)
    return linear(x, w["lm_head.weight"]).float()


FAMILY = Family(
    name="llama", global_specs=global_specs, layer_specs=layer_specs,
    layer_prefix=lambda j: f"model.layers.{j}.", embed=embed, layer=layer, head=head,
    prepare_step=prepare_step, tied_aliases=tied_aliases,
)
