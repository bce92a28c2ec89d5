"""Model configuration and weight specifications, independent of where weights live.

`ModelConfig` is read from a Hugging Face `config.json` (old and new rope formats) or built
from GGUF metadata. `WeightSpec` lists every tensor a model needs, so loaders can validate a
checkpoint and the planner can count bytes without reading any data.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError

# model_type in config.json -> family module name in flexbatch.models
FAMILY_OF_MODEL_TYPE = {"opt": "opt", "llama": "llama", "mistral": "llama", "qwen2": "llama",
                        "gemma2": "gemma", "gemma3_text": "gemma", "phi3": "phi3",
                        "mixtral": "moe", "qwen2_moe": "moe"}


# model types whose config extends the Llama one, and their parser in family_configs.py
FAMILY_CONFIG_PARSERS = {"gemma2": "gemma_config", "gemma3_text": "gemma_config", "phi3": "phi3_config",
                         "mixtral": "moe_config", "qwen2_moe": "moe_config"}


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3 | longrope
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # LongRoPE (Phi-3): per-frequency divisors for sequences up to / beyond the original
    # length, and the factor cos and sin are scaled by.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    partial_rotary_factor: float = 1.0  # rotary on this leading fraction of each head (Phi-3)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Llama family
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # Llama `attention_bias`
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None  # Mistral: every layer
    # Gemma: layers alternate "sliding_attention" (window `local_window`, rope `local_rope`)
    # and "full_attention"; pre- and post-norms; soft-capped attention scores and logits.
    layer_types: tuple[str, ...] = ()
    local_window: int | None = None
    local_rope: RopeConfig | None = None
    query_scale: float | None = None  # attention score scale; None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    qk_norm: bool = False  # Gemma 3: RMSNorm over each query and key head
    # Mixture of experts: `intermediate_size` is each expert's.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    shared_expert_size: int = 0  # Qwen2-MoE: a sigmoid-gated dense expert every token uses
    # OPT
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    enable_bias: bool = True
    final_layer_norm: bool = True

    @property
    def family(self) -> str:
        return FAMILY_OF_MODEL_TYPE[self.model_type]

    @property
    def attention_width(self) -> int:
        """The query heads times the head dim: what a query's scores and output span."""
        return self.num_heads * self.head_dim

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class WeightSpec:
    name: str
    shape: tuple[int, ...]

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_config_json(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelFormatError(
            f"{model_dir} has no config.json. Point --model at a Hugging Face model folder "
            "(config.json + *.safetensors), a .gguf file, or a folder written by `flexbatch convert`."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{path} is not valid JSON: {e}") from e


def config_from_hf_dict(raw: dict[str, Any], source: str = "config") -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in FAMILY_OF_MODEL_TYPE:
        supported = ", ".join(sorted(FAMILY_OF_MODEL_TYPE))
        raise ModelFormatError(
            f"{source}: unsupported architecture model_type={model_type!r} "
            f"(architectures={raw.get('architectures')}). Supported model types: {supported}."
        )
    if model_type == "opt":
        return _opt_config(raw)
    if model_type in FAMILY_CONFIG_PARSERS:
        from . import family_configs

        return getattr(family_configs, FAMILY_CONFIG_PARSERS[model_type])(raw, _llama_config(raw, model_type))
    return _llama_config(raw, model_type)


def _eos_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _opt_config(raw: dict[str, Any]) -> ModelConfig:
    hidden = raw["hidden_size"]
    heads = raw["num_attention_heads"]
    pre_ln = raw.get("do_layer_norm_before", True)
    return ModelConfig(
        model_type="opt",
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["ffn_dim"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        norm_eps=1e-5,
        tie_word_embeddings=raw.get("tie_word_embeddings", True),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_tuple(raw.get("eos_token_id")),
        pad_token_id=raw.get("pad_token_id"),
        hidden_act=raw.get("activation_function", "relu"),
        do_layer_norm_before=pre_ln,
        word_embed_proj_dim=raw.get("word_embed_proj_dim", hidden),
        enable_bias=raw.get("enable_bias", True),
        final_layer_norm=pre_ln and not raw.get("_remove_final_layer_norm", False),
    )


def rope_config(raw: dict[str, Any], params: dict[str, Any] | None = None,
                default_theta: float = 10000.0) -> RopeConfig:
    """The rope of a config.json; `params` overrides where they are (one layer type's rope)."""
    if params is None:
        # transformers >= 5 writes `rope_parameters`; older files have rope_theta + rope_scaling.
        params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    theta = params.get("rope_theta", raw.get("rope_theta", default_theta))
    kind = params.get("rope_type", params.get("type", "default"))
    kind = {"su": "longrope"}.get(kind, kind)  # early Phi-3 configs
    if kind not in ("default", "linear", "llama3", "longrope"):
        raise ModelFormatError(
            f"unsupported rope scaling type {kind!r}; flexbatch supports default, linear, llama3 and longrope."
        )
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings",
                       raw.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192)))
        ),
        short_factor=tuple(float(f) for f in params.get("short_factor") or ()),
        long_factor=tuple(float(f) for f in params.get("long_factor") or ()),
        attention_factor=_longrope_attention_factor(raw, params) if kind == "longrope" else 1.0,
        partial_rotary_factor=float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))),
    )


def _longrope_attention_factor(raw: dict[str, Any], params: dict[str, Any]) -> float:
    # As transformers computes it: given, or from the ratio of the extended to the original length.
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    original = params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
    factor = params.get("factor") or raw["max_position_embeddings"] / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _llama_config(raw: dict[str, Any], model_type: str) -> ModelConfig:
    hidden = raw["hidden_size"]
    heads = raw["num_attention_heads"]
    sliding = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        sliding = None
    return ModelConfig(
        model_type=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        norm_eps=raw.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_tuple(raw.get("eos_token_id")),
        pad_token_id=raw.get("pad_token_id"),
        rope=rope_config(raw),
        qkv_bias=model_type == "qwen2" or raw.get("attention_bias", False),
        o_bias=raw.get("attention_bias", False),
        mlp_bias=raw.get("mlp_bias", False),
        hidden_act=raw.get("hidden_act", "silu"),
        sliding_window=sliding,
    )
