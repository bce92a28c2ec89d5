"""GGUF files (llama.cpp's format): metadata to a HF-style config, tensors dequantized by the
`gguf` package and renamed to Hugging Face names."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelFormatError, WeightFileError
from ..models.spec import config_from_hf_dict
from .gguf_experts import Entry, expert_entries, moe_config_fields, numpy_shape
from .source import OpenedModel

SUPPORTED_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma2": "gemma2",
                   "gemma3": "gemma3_text", "phi3": "phi3", "qwen2moe": "qwen2_moe"}

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Where an architecture's layer tensors differ from Llama's names (gguf's tensor_mapping.py).
GEMMA_NAMES = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm"}
ARCH_LAYER_NAMES = {"gemma2": GEMMA_NAMES, "gemma3": GEMMA_NAMES,
                    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}}
# llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w (its norm multiplies by w).
NORM_SHIFTED_ARCHS = {"gemma2", "gemma3"}
# llama.cpp scales Gemma's 27B models' attention by hidden / heads, the others by head_dim
# (the query_pre_attn_scalar the GGUF does not store); it knows them by their layer count.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
LAYER_PATTERN = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Values per scale along a row: the block of the legacy formats, the sub-block of K-quants.
QUANT_GRID = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q8_1": 32, "IQ4_NL": 32,
              "Q2_K": 16, "Q3_K": 16, "Q4_K": 32, "Q5_K": 32, "Q6_K": 16}


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    names = {**LAYER_NAMES, **ARCH_LAYER_NAMES.get(arch, {})}
    m = LAYER_PATTERN.match(gguf_name)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
    return None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config_dict(reader, tensor_names: set[str]) -> dict[str, Any]:
    """A Hugging Face config.json equivalent of the GGUF metadata (a `llama` file with experts
    is Mixtral)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelFormatError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHS))}."
        )
    if tensor_names & {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}:
        raise ModelFormatError(
            "this GGUF stores rope frequency factors (Llama 3.1, Phi-3 LongRoPE), which flexbatch does not "
            "read from GGUF yet; run the model from its Hugging Face folder instead."
        )
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    heads = _field(reader, f"{arch}.attention.head_count")
    config = {
        "model_type": SUPPORTED_ARCHS[arch],
        "vocab_size": _field(reader, f"{arch}.vocab_size", len(tokens)),
        "hidden_size": _field(reader, f"{arch}.embedding_length"),
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
        "max_position_embeddings": _field(reader, f"{arch}.context_length", 4096),
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "architectures": [f"{arch.capitalize()}ForCausalLM"],
    }
    if "blk.0.attn_output.bias" in tensor_names:
        config["attention_bias"] = True
    if "blk.0.ffn_up.bias" in tensor_names:
        config["mlp_bias"] = True
    key_length = _field(reader, f"{arch}.attention.key_length")
    if key_length:
        config["head_dim"] = key_length
    if _field(reader, f"{arch}.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _field(reader, f"{arch}.rope.scaling.factor")}
    shapes = {t.name: numpy_shape(t) for t in reader.tensors}
    config.update(moe_config_fields(arch, lambda key, default=None: _field(reader, key, default), shapes))
    if arch in GEMMA_27B_LAYERS:
        config.update(_gemma_fields(reader, arch, config))
    rotary_dims = _field(reader, f"{arch}.rope.dimension_count")
    if arch == "phi3":
        config["sliding_window"] = _field(reader, f"{arch}.attention.sliding_window")
    if arch == "phi3" and rotary_dims:
        config["partial_rotary_factor"] = rotary_dims / (config.get("head_dim") or config["hidden_size"] // heads)
    return config


def _gemma_fields(reader, arch: str, config: dict[str, Any]) -> dict[str, Any]:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    is_27b = config["num_hidden_layers"] == GEMMA_27B_LAYERS[arch]
    fields = {
        "sliding_window": _field(reader, f"{arch}.attention.sliding_window"),
        "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"] if is_27b else head_dim,
        "attn_logit_softcapping": _field(reader, f"{arch}.attn_logit_softcapping"),
        "final_logit_softcapping": _field(reader, f"{arch}.final_logit_softcapping"),
    }
    if arch == "gemma3":  # llama.cpp: local layers rotate with base 10000, global ones with freq_base
        fields["rope_local_base_freq"] = 10000.0
    return fields


def unpermute_rotary(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> HF's half split)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def dequantize(entry: Entry) -> np.ndarray:
    """A GGUF tensor, or one expert's slice of a merged one, as a numpy array in the entry's
    shape; F16 kept as is. The reader maps the file, so only the slice's bytes are read."""
    from gguf import GGMLQuantizationType, quants

    data = entry.tensor.data if entry.expert is None else entry.tensor.data[entry.expert]
    kind = entry.tensor.tensor_type
    if kind == GGMLQuantizationType.F32:
        return np.asarray(data, dtype=np.float32).reshape(entry.shape)
    if kind == GGMLQuantizationType.F16:
        return np.asarray(data).view(np.float16).reshape(entry.shape)
    return quants.dequantize(data, kind).reshape(entry.shape)


class GGUFSource:
    def __init__(self, reader, config: dict[str, Any]):
        self._tensors: dict[str, Entry] = {}
        arch = _field(reader, "general.architecture")
        self._norm_shift = 1.0 if arch in NORM_SHIFTED_ARCHS else 0.0
        for t in reader.tensors:
            name = hf_name(t.name, arch)
            if name is not None:
                self._tensors[name] = Entry(t, None, numpy_shape(t))
        if config["model_type"] in ("mixtral", "qwen2_moe"):
            self._tensors.update(expert_entries(reader.tensors, config["model_type"]))
        # llama.cpp permutes q/k rows for the llama architecture only (Mixtral included).
        self._rotary_heads = {}
        if config["model_type"] in ("llama", "mistral", "mixtral"):
            self._rotary_heads = {"q_proj": config["num_attention_heads"],
                                  "k_proj": config["num_key_value_heads"]}

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def quant_grid(self, name: str) -> int | None:
        """Values per scale along the tensor's rows (its input features) in this file, or None
        for a dense tensor or a format without one fixed size."""
        return QUANT_GRID.get(self._tensors[name].tensor.tensor_type.name)

    def read(self, name: str) -> torch.Tensor:
        try:
            array = dequantize(self._tensors[name])
        except Exception as e:
            raise WeightFileError(f"cannot dequantize GGUF tensor for {name}: {e}") from e
        tensor = torch.from_numpy(np.array(array, copy=True, order="C"))
        for proj, heads in self._rotary_heads.items():
            if f"self_attn.{proj}." in name:
                tensor = unpermute_rotary(tensor, heads).contiguous()
        if self._norm_shift and name.endswith("norm.weight"):
            tensor = tensor - self._norm_shift
        return tensor


def open_gguf(path: Path) -> OpenedModel:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise WeightFileError(f"cannot read GGUF file {path}: {e}. The file is truncated or not GGUF.") from e
    names = {t.name for t in reader.tensors}
    raw = gguf_config_dict(reader, names)
    config = config_from_hf_dict(raw, source=str(path))
    return OpenedModel(config, GGUFSource(reader, raw), path, "gguf", raw)
