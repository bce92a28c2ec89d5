"""OPT family: learned positions (offset 2), ReLU MLP, biases, pre- or post-LayerNorm
(opt-350m is post-LN with project_in/project_out between a smaller embedding and the model)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import linear
from . import ops
from .family import Family, Weights
from .ops import StepContext
from .spec import ModelConfig, WeightSpec

POSITION_OFFSET = 2  # OPT's learned position table reserves its first two rows
PREFIX = "model.decoder."
# Applied to a projection's fresh output, so relu and silu overwrite it: a block's prefill
# allocates (and page-faults) one [rows x intermediate] tensor less per layer; relu_ takes
# 12 ms where relu takes 20 (bf16, 3040 x 8192, 2 cores).
ACTIVATIONS = {"relu": torch.relu_, "gelu": F.gelu, "silu": lambda x: F.silu(x, inplace=True)}


def _has_projection(cfg: ModelConfig) -> bool:
    return cfg.word_embed_proj_dim != cfg.hidden_size


def global_specs(cfg: ModelConfig) -> list[WeightSpec]:
    c, p, v = cfg.hidden_size, cfg.word_embed_proj_dim, cfg.vocab_size
    specs = [WeightSpec(PREFIX + "embed_tokens.weight", (v, p)),
             WeightSpec(PREFIX + "embed_positions.weight", (cfg.max_position_embeddings + POSITION_OFFSET, c))]
    if _has_projection(cfg):
        specs += [WeightSpec(PREFIX + "project_in.weight", (c, p)),
                  WeightSpec(PREFIX + "project_out.weight", (p, c))]
    if cfg.final_layer_norm:
        specs += [WeightSpec(PREFIX + "final_layer_norm.weight", (c,)),
                  WeightSpec(PREFIX + "final_layer_norm.bias", (c,))]
    specs.append(WeightSpec("lm_head.weight", (v, p)))
    return specs


def layer_specs(cfg: ModelConfig) -> list[WeightSpec]:
    c, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {"self_attn.q_proj": (c, c), "self_attn.k_proj": (c, c), "self_attn.v_proj": (c, c),
              "self_attn.out_proj": (c, c), "fc1": (i, c), "fc2": (c, i)}
    specs = []
    for name, shape in shapes.items():
        specs.append(WeightSpec(f"{name}.weight", shape))
        if cfg.enable_bias:
            specs.append(WeightSpec(f"{name}.bias", (shape[0],)))
    for norm in ("self_attn_layer_norm", "final_layer_norm"):
        specs += [WeightSpec(f"{norm}.weight", (c,)), WeightSpec(f"{norm}.bias", (c,))]
    return specs


def tied_aliases(cfg: ModelConfig) -> dict[str, str]:
    return {"lm_head.weight": PREFIX + "embed_tokens.weight"} if cfg.tie_word_embeddings else {}


def prepare_step(cfg: ModelConfig, ctx: StepContext, dtype: torch.dtype) -> None:
    return None


def embed(cfg: ModelConfig, w: Weights, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    tokens = F.embedding(input_ids, w[PREFIX + "embed_tokens.weight"])
    if _has_projection(cfg):
        tokens = linear(tokens, w[PREFIX + "project_in.weight"])
    positions = F.embedding(ctx.positions + POSITION_OFFSET, w[PREFIX + "embed_positions.weight"])
    return tokens + positions


def _proj(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    return linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def _norm(cfg: ModelConfig, w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    return ops.layer_norm(x, w[f"{name}.weight"], w[f"{name}.bias"], cfg.norm_eps)


def _attention(cfg: ModelConfig, w: Weights, x: torch.Tensor, ctx: StepContext,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    # OPT scales queries before the product (not inside the softmax), as its checkpoints expect.
    q = _proj(w, "self_attn.q_proj", x) * cfg.head_dim ** -0.5
    q = ops.split_heads(q, cfg.num_heads)
    k = ops.split_heads(_proj(w, "self_attn.k_proj", x), cfg.num_heads)
    v = ops.split_heads(_proj(w, "self_attn.v_proj", x), cfg.num_heads)
    attn = ops.cached_attention(q, k, v, k_cache, v_cache, ctx, scale=1.0)
    return _proj(w, "self_attn.out_proj", ops.merge_heads(attn))


def layer(cfg: ModelConfig, w: Weights, h: torch.Tensor, ctx: StepContext,
          k_cache: torch.Tensor, v_cache: torch.Tensor, j: int) -> torch.Tensor:
    pre = cfg.do_layer_norm_before
    x = _norm(cfg, w, "self_attn_layer_norm", h) if pre else h
    h = h + _attention(cfg, w, x, ctx, k_cache, v_cache)
    if not pre:
        h = _norm(cfg, w, "self_attn_layer_norm", h)
    x = _norm(cfg, w, "final_layer_norm", h) if pre else h
    h = h + _proj(w, "fc2", ACTIVATIONS[cfg.hidden_act](_proj(w, "fc1", x)))
    if not pre:
        h = _norm(cfg, w, "final_layer_norm", h)
    return h


def head(cfg: ModelConfig, w: Weights, h: torch.Tensor) -> torch.Tensor:
    if cfg.final_layer_norm:
        h = _norm(cfg, w, PREFIX + "final_layer_norm", h)
    if _has_projection(cfg):
        h = linear(h, w[PREFIX + "project_out.weight"])
    return linear(h, w["lm_head.weight"])


FAMILY = Family(
    name="opt", global_specs=global_specs, layer_specs=layer_specs,
    layer_prefix=lambda j: f"{PREFIX}layers.{j}.", embed=embed, layer=layer, head=head,
    prepare_step=prepare_step, tied_aliases=tied_aliases,
)
