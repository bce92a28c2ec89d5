"""GGUF files of the new architectures written here with gguf.GGUFWriter, tensors named by
gguf's own HF -> GGUF map and Gemma norms stored as 1 + w as llama.cpp's converter does:
they load to what gguf's dequantization gives, and a Gemma GGUF generates what transformers
generates from the original weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH, GGUFWriter, get_tensor_name_map, quants
from gguf import GGMLQuantizationType as Q

from flexbatch import LLM, SamplingParams
from flexbatch.weights.source import open_model

from conftest import _family_configs
from gguf_util import add_transformer_metadata

GEMMA = ("gemma2", "gemma3")
ARCH_OF_KIND = {"gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3"}


def _metadata(writer: GGUFWriter, cfg, arch: str) -> None:
    add_transformer_metadata(writer, cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        writer.add_string(f"{arch}.rope.scaling.type", "linear")
        writer.add_float32(f"{arch}.rope.scaling.factor", rope["factor"])
    if arch == "phi3":
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if arch in GEMMA:
        writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)


def write_gguf(path, hf_model, arch: str, qtype=Q.F32):
    """Write `hf_model` as a GGUF file (2-D tensors in `qtype`); returns {HF name: (qtype, data)}."""
    cfg = hf_model.config
    names = get_tensor_name_map(MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    writer = GGUFWriter(str(path), arch)
    _metadata(writer, cfg, arch)
    stored = {}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.numpy().astype(np.float32)
        if arch in GEMMA and name.endswith("norm.weight"):
            array = array + 1.0
        kind = qtype if array.ndim == 2 else Q.F32
        data = array if kind == Q.F32 else quants.quantize(array, kind)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data,
                          raw_dtype=None if kind == Q.F32 else kind)
        stored[name] = (kind, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_0])
@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "phi3"])
def test_tensors_load_like_gguf_dequantize(tiny_model, tmp_path, kind, qtype):
    _, hf = tiny_model(kind)
    arch = ARCH_OF_KIND[kind]
    path = tmp_path / "m.gguf"
    stored = write_gguf(path, hf, arch, qtype)
    source = open_model(path).source
    assert source.names() == set(stored)
    for name, (stored_kind, data) in stored.items():
        expected = data if stored_kind == Q.F32 else quants.dequantize(data, stored_kind)
        if arch in GEMMA and name.endswith("norm.weight"):
            expected = expected - 1.0  # back to the checkpoint's w
        np.testing.assert_array_equal(source.read(name).float().numpy(), expected.astype(np.float32))


def _llama_cpp_shaped(kind: str):
    """A tiny model whose config is what llama.cpp assumes of a GGUF it reads: attention scaled
    by head_dim, Gemma 3's global layer every sixth, Phi-3 without LongRoPE factors."""
    from transformers import AutoModelForCausalLM

    config = _family_configs()[kind]
    if kind in GEMMA:
        config.query_pre_attn_scalar = config.head_dim
    if kind == "phi3":
        config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    if kind == "gemma3":
        config.num_hidden_layers = 6
        config.layer_types = ["sliding_attention"] * 5 + ["full_attention"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.2)
    return model.eval()


@pytest.mark.parametrize("kind", [*GEMMA, "phi3"])
def test_gguf_generates_like_hf(tmp_path, kind):
    hf = _llama_cpp_shaped(kind)
    path = tmp_path / "m.gguf"
    write_gguf(path, hf, kind)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    ours = LLM(path, dtype="float32").generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               pad_token_id=0)
    assert ours[0].token_ids == expected[0, len(prompt):].tolist()
