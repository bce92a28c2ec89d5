"""config.json fields of the families that extend the Llama config (Gemma 2/3, Phi-3, the
mixtures of experts): each parser takes the Llama reading of the same dict and adds or
corrects what its family defines differently."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..errors import ModelFormatError
from .spec import ModelConfig, rope_config

SLIDING, FULL = "sliding_attention", "full_attention"


def _layer_types(raw: dict[str, Any], num_layers: int, default_pattern: int) -> tuple[str, ...]:
    # Older configs give a period instead of the list: every `pattern`-th layer is global.
    types = raw.get("layer_types")
    if types is None:
        pattern = raw.get("sliding_window_pattern", default_pattern)
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {SLIDING, FULL}:
        raise ModelFormatError(
            f"layer_types must name {num_layers} layers, each {SLIDING!r} or {FULL!r}; got {types}."
        )
    return tuple(types)


def gemma_config(raw: dict[str, Any], base: ModelConfig) -> ModelConfig:
    """Gemma 2 and Gemma 3 (text): alternating local and global layers; Gemma 3 adds QK-norm and
    a separate rope for local layers (its `rope_parameters` are keyed by layer type)."""
    gemma3 = base.model_type == "gemma3_text"
    if raw.get("use_bidirectional_attention"):
        raise ModelFormatError("Gemma with use_bidirectional_attention (an encoder) cannot generate text.")
    rope, local_rope = base.rope, base.rope
    params = raw.get("rope_parameters") or {}
    if gemma3:
        if FULL in params:  # transformers >= 5
            rope = rope_config(raw, params[FULL], default_theta=1_000_000.0)
            local_rope = rope_config(raw, params.get(SLIDING, {}), default_theta=10_000.0)
        else:
            rope = rope_config(raw, {**(raw.get("rope_scaling") or {}),
                                     "rope_theta": raw.get("rope_theta", 1_000_000.0)})
            local_rope = rope_config(raw, {"rope_theta": raw.get("rope_local_base_freq", 10_000.0)})
    return replace(
        base,
        rope=rope,
        local_rope=local_rope,
        hidden_act=raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh",
        sliding_window=None,  # per layer instead, through layer_types
        local_window=raw.get("sliding_window") or 4096,
        layer_types=_layer_types(raw, base.num_layers, 6 if gemma3 else 2),
        query_scale=raw.get("query_pre_attn_scalar", base.head_dim) ** -0.5,
        # transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it.
        attn_softcap=None if gemma3 else raw.get("attn_logit_softcapping"),
        final_softcap=raw.get("final_logit_softcapping"),
        qk_norm=gemma3,
        tie_word_embeddings=raw.get("tie_word_embeddings", True),
    )


def phi3_config(raw: dict[str, Any], base: ModelConfig) -> ModelConfig:
    rope = base.rope
    if rope.kind == "longrope":
        rotary_pairs = int(base.head_dim * rope.partial_rotary_factor) // 2
        if len(rope.short_factor) != rotary_pairs or len(rope.long_factor) != rotary_pairs:
            raise ModelFormatError(
                f"longrope short_factor and long_factor need {rotary_pairs} values each (half the rotary "
                f"dimension); the config has {len(rope.short_factor)} and {len(rope.long_factor)}."
            )
    return replace(base, qkv_bias=False, o_bias=False)


def moe_config(raw: dict[str, Any], base: ModelConfig) -> ModelConfig:
    """Mixtral (top-k of `num_local_experts`, weights renormalised) and Qwen2-MoE (top-k of
    `num_experts`, renormalised only if norm_topk_prob, plus a gated shared expert)."""
    if base.model_type == "mixtral":
        return replace(base, num_experts=raw["num_local_experts"], num_experts_per_tok=raw["num_experts_per_tok"],
                       norm_topk_prob=True)
    if raw.get("mlp_only_layers") or raw.get("decoder_sparse_step", 1) != 1:
        raise ModelFormatError(
            "this Qwen2-MoE config mixes dense and expert layers (mlp_only_layers or decoder_sparse_step "
            "!= 1); flexbatch runs Qwen2-MoE models whose every layer has experts."
        )
    return replace(
        base,
        intermediate_size=raw["moe_intermediate_size"],
        num_experts=raw["num_experts"],
        num_experts_per_tok=raw["num_experts_per_tok"],
        norm_topk_prob=raw.get("norm_topk_prob", False),
        shared_expert_size=raw.get("shared_expert_intermediate_size") or 0,
        qkv_bias=True,
        sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window", False) else None,
    )
