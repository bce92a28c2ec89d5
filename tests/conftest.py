"""Tiny random models built from configs with transformers, saved with save_pretrained.

Each kind covers a distinct architecture path; tests compare flexbatch against the HF model
object returned alongside the saved folder.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

logging.getLogger("transformers").setLevel(logging.ERROR)
# A fixed 4-bit kernel choice, so that a compressed run does not measure this machine's
# hardware profile (LLM reads the knob at construction). 16 rows: decode steps of the tiny
# models use the fused kernel and prompts dequantize, so both kernels run. Tests of the
# choice itself set or delete it.
os.environ.setdefault("FLEXBATCH_INT4_FUSED_MAX_ROWS", "16")

COMMON_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, max_position_embeddings=512, eos_token_id=None,
                    bos_token_id=None, pad_token_id=0)
COMMON_OPT = dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=512, eos_token_id=None,
                  bos_token_id=None, pad_token_id=1)


def _configs():
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                   "rope_theta": 500000.0}
    return {
        "opt_pre_ln": OPTConfig(**COMMON_OPT, do_layer_norm_before=True),
        # opt-350m's shape: post-LN, smaller word embeddings with project_in/project_out.
        "opt_post_ln_proj": OPTConfig(**COMMON_OPT, do_layer_norm_before=False, word_embed_proj_dim=32),
        "llama_gqa_tied_llama3": LlamaConfig(**COMMON_LLAMA, num_key_value_heads=2, tie_word_embeddings=True,
                                             rope_parameters=llama3_rope),
        "llama_mha_bias": LlamaConfig(**COMMON_LLAMA, num_key_value_heads=4, attention_bias=True),
        "mistral": MistralConfig(**COMMON_LLAMA, num_key_value_heads=2, sliding_window=4096),
        "qwen2": Qwen2Config(**COMMON_LLAMA, num_key_value_heads=2, tie_word_embeddings=False),
    }


def _family_configs():
    """Gemma 2/3, Phi-3 and the mixtures of experts, with windows, caps and rope lengths small
    enough that a 30-token test crosses them."""
    from transformers import Gemma2Config, Gemma3TextConfig, MixtralConfig, Phi3Config, Qwen2MoeConfig

    # head_dim 32 everywhere, so a compressed KV cache (groups of 32 along it) applies
    gemma = dict(COMMON_LLAMA, num_key_value_heads=2, head_dim=32, sliding_window=4, query_pre_attn_scalar=24)
    two_heads = {**COMMON_LLAMA, "num_attention_heads": 2}
    pairs = torch.arange(8)  # Phi-3 below: head_dim 32, partial_rotary_factor 0.5 -> 8 rotary pairs
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "short_factor": (1.0 + pairs / 8).tolist(), "long_factor": (1.0 + pairs / 2).tolist(),
                "original_max_position_embeddings": 8}
    return {
        "gemma2": Gemma2Config(**gemma, attn_logit_softcapping=5.0, final_logit_softcapping=10.0,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        "gemma3": Gemma3TextConfig(
            **{**gemma, "num_hidden_layers": 4},
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        "phi3": Phi3Config(**{**two_heads, "max_position_embeddings": 64}, num_key_value_heads=1,
                           original_max_position_embeddings=8, rope_parameters=longrope),
        "mixtral": MixtralConfig(**{**two_heads, "intermediate_size": 64}, num_key_value_heads=1,
                                 num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": Qwen2MoeConfig(**two_heads, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                    norm_topk_prob=False),
    }


MODEL_KINDS = list(_configs())
FAMILY_KINDS = ["gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe"]


def build_hf_model(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[kind] if kind in MODEL_KINDS else _family_configs()[kind]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # spread the weights so logits differ clearly between tokens
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(kind) -> (folder with config.json + safetensors, HF model object)."""
    cache = {}

    def make(kind: str):
        if kind not in cache:
            model = build_hf_model(kind)
            folder = tmp_path_factory.mktemp(kind)
            model.save_pretrained(folder)
            cache[kind] = (folder, model)
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def default_model_store():
    """The default model converted into the store (the same conversion the CLI does)."""
    from flexbatch.default_model import default_model_path

    return default_model_path(log=lambda *_: None)


@pytest.fixture(scope="session")
def default_gguf():
    from flexbatch.default_model import default_gguf_path

    return default_gguf_path()
