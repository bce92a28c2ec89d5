"""Model configuration and weight specifications, independent of where weights live.

`ModelConfig` is read from a Hugging Face `config.json` (old and new rope formats) or built
from GGUF metadata. `WeightSpec` lists every tensor a model needs, so loaders can validate a
checkpoint and the planner can count bytes without reading any data.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError

# model_type in config.json -> family module name in flexbatch.models
FAMILY_OF_MODEL_TYPE = {"opt": "opt", "llama": "llama", "mistral": "llama", "qwen2": "llama"}


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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
    sliding_window: int | None = None  # Mistral
    # OPT
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    enable_bias: bool = True
    final_layer_norm: bool = True

    @property
    def family(self) -> str:
        return FAMILY_OF_MODEL_TYPE[self.model_type]

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


def _rope_config(raw: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older files have rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ModelFormatError(
            f"unsupported rope scaling type {kind!r}; flexbatch supports default, linear and llama3."
        )
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


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
        rope=_rope_config(raw),
        qkv_bias=model_type == "qwen2" or raw.get("attention_bias", False),
        o_bias=raw.get("attention_bias", False),
        mlp_bias=raw.get("mlp_bias", False),
        hidden_act=raw.get("hidden_act", "silu"),
        sliding_window=sliding,
    )
