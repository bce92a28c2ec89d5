"""GGUF files written here with gguf.GGUFWriter: tensors of each type load to what gguf's own
dequantization gives, and a converted tiny model computes what its HF original computes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants

from flexbatch import LLM, SamplingParams
from flexbatch.weights.gguf_file import unpermute_rotary
from flexbatch.weights.source import open_model

from gguf_util import add_transformer_metadata

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"


def permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: HF's half-split rotary rows -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf_model, arch: str, qtype_of=lambda name, array: Q.F32):
    """Write `hf_model` as a GGUF file; returns {gguf name: (qtype, stored array)}."""
    cfg = hf_model.config
    writer = GGUFWriter(str(path), arch)
    add_transformer_metadata(writer, cfg)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    stored = {}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.numpy().astype(np.float32)
        if arch == "llama" and ("q_proj" in name or "k_proj" in name):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            array = permute_rotary(array, heads)
        qtype = qtype_of(name, array)
        if qtype == Q.F32:
            data = array
        elif qtype == Q.F16:
            data = array.astype(np.float16)
        else:
            data = quants.quantize(array, qtype)
        writer.add_tensor(gguf_name(name), data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        stored[gguf_name(name)] = (qtype, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0])
def test_each_tensor_type_loads_like_gguf_dequantize(tiny_model, tmp_path, qtype):
    _, hf = tiny_model("mistral")

    def choose(name, array):  # 1-D tensors stay F32, as llama.cpp keeps norms
        return qtype if array.ndim == 2 else Q.F32

    path = tmp_path / "m.gguf"
    stored = write_gguf(path, hf, "llama", choose)
    source = open_model(path).source
    cfg = hf.config
    checked = 0
    for hf_name in source.names():
        kind, data = stored[gguf_name(hf_name)]
        expected = quants.dequantize(data, kind).astype(np.float32)
        if "q_proj" in hf_name or "k_proj" in hf_name:
            heads = cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads
            expected = unpermute_rotary(torch.from_numpy(expected), heads).numpy()
        got = source.read(hf_name).float().numpy()
        np.testing.assert_array_equal(got, expected)
        checked += kind == qtype
    assert checked >= 7 * cfg.num_hidden_layers


def test_f32_gguf_recovers_the_original_weights(tiny_model, tmp_path):
    """Independent of gguf's dequantizer: F32 round trip including the q/k un-permutation."""
    _, hf = tiny_model("mistral")
    path = tmp_path / "m.gguf"
    write_gguf(path, hf, "llama")
    source = open_model(path).source
    for name, tensor in hf.state_dict().items():
        if name in source.names():
            torch.testing.assert_close(source.read(name), tensor, rtol=0, atol=0)


@pytest.mark.parametrize("kind,arch", [("mistral", "llama"), ("qwen2", "qwen2")])
def test_gguf_model_generates_like_hf(tiny_model, tmp_path, kind, arch):
    folder, hf = tiny_model(kind)
    path = tmp_path / "m.gguf"
    write_gguf(path, hf, arch)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    from_gguf = LLM(path, dtype="float32").generate([prompt], params)[0].token_ids
    from_hf_folder = LLM(folder, dtype="float32").generate([prompt], params)[0].token_ids
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                             pad_token_id=0)
    assert from_gguf == from_hf_folder == hf_out[0, len(prompt):].tolist()
