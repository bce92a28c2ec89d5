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

# Applied to a projection's fresh output: relu and silu overwrite it (see models/opt.py).
ACTIVATIONS = {"silu": lambda x: F.silu(x, inplace=True), "gelu": F.gelu, "relu": torch.relu_,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def global_specs(cfg: ModelConfig) -> list[WeightSpec]:
    v, c = cfg.vocab_size, cfg.hidden_size
    return [WeightSpec("model.embed_tokens.weight", (v, c)),
            WeightSpec("model.norm.weight", (c,)),
            WeightSpec("lm_head.weight", (v, c))]


def attention_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """q/k/v/o projections under `self_attn.` (shared by the families built on Llama's attention)."""
    c, d = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    specs = []
    for name, rows in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
        specs.append(WeightSpec(f"self_attn.{name}.weight", (rows, c)))
        if cfg.qkv_bias:
            specs.append(WeightSpec(f"self_attn.{name}.bias", (rows,)))
    specs.append(WeightSpec("self_attn.o_proj.weight", (c, q_out)))
    if cfg.o_bias:
        specs.append(WeightSpec("self_attn.o_proj.bias", (c,)))
    return specs


def gated_mlp_specs(prefix: str, hidden: int, inner: int, bias: bool = False) -> list[WeightSpec]:
    """gate_proj, up_proj, down_proj of one gated MLP (a dense MLP or one expert) under `prefix`."""
    specs = []
    for name, shape in (("gate_proj", (inner, hidden)), ("up_proj", (inner, hidden)), ("down_proj", (hidden, inner))):
        specs.append(WeightSpec(f"{prefix}{name}.weight", shape))
        if bias:
            specs.append(WeightSpec(f"{prefix}{name}.bias", (shape[0],)))
    return specs


def layer_specs(cfg: ModelConfig) -> list[WeightSpec]:
    c = cfg.hidden_size
    return [WeightSpec("input_layernorm.weight", (c,)), *attention_specs(cfg),
            WeightSpec("post_attention_layernorm.weight", (c,)),
            *gated_mlp_specs("mlp.", c, cfg.intermediate_size, cfg.mlp_bias)]


def tied_aliases(cfg: ModelConfig) -> dict[str, str]:
    return {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else {}


def prepare_step(cfg: ModelConfig, ctx: StepContext, dtype: torch.dtype) -> None:
    ctx.cos, ctx.sin = ops.rope_tables(cfg.rope, cfg.head_dim, ctx.positions, dtype)


def embed(cfg: ModelConfig, w: Weights, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    return F.embedding(input_ids, w["model.embed_tokens.weight"])


def proj(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    return linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def attention(cfg: ModelConfig, w: Weights, x: torch.Tensor, ctx: StepContext,
              k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Rotary GQA self-attention of normed hidden states x [B, S, C]; returns [B, S, C]."""
    q = ops.split_heads(proj(w, "self_attn.q_proj", x), cfg.num_heads)
    k = ops.split_heads(proj(w, "self_attn.k_proj", x), cfg.num_kv_heads)
    v = ops.split_heads(proj(w, "self_attn.v_proj", x), cfg.num_kv_heads)
    q = ops.apply_rotary(q, ctx.cos, ctx.sin)
    k = ops.apply_rotary(k, ctx.cos, ctx.sin)
    attn = ops.cached_attention(q, k, v, k_cache, v_cache, ctx)
    return proj(w, "self_attn.o_proj", ops.merge_heads(attn))


def gated_mlp(cfg: ModelConfig, w: Weights, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) with the weights under `prefix` (a dense MLP or one expert)."""
    gate, up = proj(w, f"{prefix}gate_proj", x), proj(w, f"{prefix}up_proj", x)
    gated = ops.silu_times(gate, up) if cfg.hidden_act == "silu" else ACTIVATIONS[cfg.hidden_act](gate) * up
    return proj(w, f"{prefix}down_proj", gated)


def layer(cfg: ModelConfig, w: Weights, h: torch.Tensor, ctx: StepContext,
          k_cache: torch.Tensor, v_cache: torch.Tensor, j: int) -> torch.Tensor:
    x = ops.rms_norm(h, w["input_layernorm.weight"], cfg.norm_eps)
    h = h + attention(cfg, w, x, ctx, k_cache, v_cache)
    x = ops.rms_norm(h, w["post_attention_layernorm.weight"], cfg.norm_eps)
    return h + gated_mlp(cfg, w, "mlp.", x)


def head(cfg: ModelConfig, w: Weights, h: torch.Tensor) -> torch.Tensor:
    x = ops.rms_norm(h, w["model.norm.weight"], cfg.norm_eps)
    return linear(x, w["lm_head.weight"])


FAMILY = Family(
    name="llama", global_specs=global_specs, layer_specs=layer_specs,
    layer_prefix=lambda j: f"model.layers.{j}.", embed=embed, layer=layer, head=head,
    prepare_step=prepare_step, tied_aliases=tied_aliases,
)
