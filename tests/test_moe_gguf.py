"""Mixture-of-experts GGUF files written here as llama.cpp's converter writes them: Mixtral as
architecture `llama` with expert metadata and q/k rows permuted, Qwen2-MoE as `qwen2moe`,
each layer's experts merged into one 3-D tensor per projection. Every per-expert tensor
flexbatch reads equals gguf's own dequantization of the merged tensor, split by expert; the
models generate what transformers generates from the same dequantized weights (Mixtral: a
MixtralForCausalLM holding them, as transformers cannot read a `llama` GGUF with experts;
Qwen2-MoE: transformers loading the GGUF file itself)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH, GGUFWriter, get_tensor_name_map, quants
from gguf import GGMLQuantizationType as Q

from flexbatch import LLM, SamplingParams
from flexbatch.weights.source import open_model

from conftest import build_hf_model
from gguf_util import add_transformer_metadata

ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe"}
# The Hugging Face names flexbatch's MoE family reads, per model: router, expert e's gate/up/down.
ROUTER = {"mixtral": "block_sparse_moe.gate", "qwen2_moe": "mlp.gate"}
EXPERT = {"mixtral": "block_sparse_moe.experts.{e}.{p}", "qwen2_moe": "mlp.experts.{e}.{p}"}
PROJ = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj")}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter on q/k of a `llama` file: HF's half-split rotary rows -> pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _metadata(writer: GGUFWriter, cfg, kind: str, expert_sizes: bool) -> None:
    add_transformer_metadata(writer, cfg)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_uint32(f"{ARCH[kind]}.vocab_size", cfg.vocab_size)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    if kind == "mixtral":
        writer.add_expert_count(cfg.num_local_experts)
    else:
        writer.add_expert_count(cfg.num_experts)
    if kind == "qwen2_moe" and expert_sizes:
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)


def _gguf_tensors(hf, kind: str, split_experts: bool = False):
    """(GGUF name, float32 array, HF names its slices load as) of the model, as llama.cpp's
    converter lays them out (split_experts: as it did before early 2024, one tensor per
    expert); transformers keeps experts fused as gate_up_proj / down_proj."""
    cfg = hf.config
    names = get_tensor_name_map(MODEL_ARCH[ARCH[kind].upper()], cfg.num_hidden_layers)
    for name, tensor in hf.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if ".mlp.experts." in name:
            j = name.split(".")[2]
            parts = np.split(array, 2, axis=1) if name.endswith("gate_up_proj") else [array]
            for part, p in zip(parts, ("gate", "up") if len(parts) == 2 else ("down",)):
                proj = PROJ[kind][("gate", "up", "down").index(p)]
                if split_experts:
                    for e, matrix in enumerate(part):
                        yield (f"blk.{j}.ffn_{p}.{e}.weight", matrix,
                               [f"model.layers.{j}.{EXPERT[kind].format(e=e, p=proj)}.weight"])
                    continue
                yield (f"blk.{j}.ffn_{p}_exps.weight", part,
                       [f"model.layers.{j}.{EXPERT[kind].format(e=e, p=proj)}.weight" for e in range(len(part))])
            continue
        hf_name = name
        if name.endswith("mlp.gate.weight"):
            hf_name = name.replace("mlp.gate", ROUTER[kind])
        if name.endswith("shared_expert_gate.weight"):
            array = array[0]  # a vector in llama.cpp's files
        if kind == "mixtral" and ("q_proj" in name or "k_proj" in name):
            array = _permute(array, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
        yield names.get_name(name, try_suffixes=(".weight", ".bias")), array, [hf_name]


def write_moe_gguf(path, hf, kind: str, qtype=Q.F32, split_experts: bool = False,
                   expert_sizes: bool = True) -> dict[str, np.ndarray]:
    """Write `hf` as a GGUF file, matrices in `qtype` (expert_sizes=False: without Qwen2-MoE's
    expert sizes in the metadata); returns {HF name: what gguf's own dequantization of the
    stored tensor gives for it}."""
    writer = GGUFWriter(str(path), ARCH[kind])
    _metadata(writer, hf.config, kind, expert_sizes)
    expected = {}
    for gguf_name, array, hf_names in _gguf_tensors(hf, kind, split_experts):
        stored_kind = qtype if array.ndim >= 2 else Q.F32
        data = array if stored_kind == Q.F32 else quants.quantize(array, stored_kind)
        writer.add_tensor(gguf_name, data, raw_dtype=None if stored_kind == Q.F32 else stored_kind)
        back = array if stored_kind == Q.F32 else quants.dequantize(data, stored_kind)
        if len(hf_names) > 1:  # merged experts: slice e is expert e
            expected.update(zip(hf_names, back))
            continue
        if kind == "mixtral" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = hf.config.num_attention_heads if ".attn_q." in gguf_name else hf.config.num_key_value_heads
            back = _unpermute(back, heads)
        expected[hf_names[0]] = back.reshape(1, -1) if "shared_expert_gate" in hf_names[0] else back
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_0])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_experts_load_like_gguf_dequantize(tmp_path, kind, qtype):
    hf = build_hf_model(kind)
    path = tmp_path / "m.gguf"
    expected = write_moe_gguf(path, hf, kind, qtype)
    model = open_model(path)
    assert model.config.model_type == kind
    source = model.source
    assert source.names() == set(expected)
    for name, array in expected.items():
        assert source.shape(name) == array.shape, name
        np.testing.assert_array_equal(source.read(name).float().numpy(), array.astype(np.float32), err_msg=name)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q4_0])
def test_split_experts_of_older_files_load(tmp_path, qtype):
    path = tmp_path / "m.gguf"
    expected = write_moe_gguf(path, build_hf_model("mixtral"), "mixtral", qtype, split_experts=True)
    source = open_model(path).source
    assert source.names() == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(source.read(name).float().numpy(), array.astype(np.float32), err_msg=name)


def test_store_converted_from_a_moe_gguf_keeps_config_and_experts(tmp_path):
    from flexbatch.weights.store import write_store

    expected = write_moe_gguf(tmp_path / "m.gguf", build_hf_model("qwen2_moe"), "qwen2_moe", Q.Q4_0)
    gguf = open_model(tmp_path / "m.gguf")
    store = open_model(write_store(gguf, tmp_path / "store"))
    assert store.kind == "store" and store.config == gguf.config
    for name, array in expected.items():
        np.testing.assert_array_equal(store.source.read(name).float().numpy(), array.astype(np.float32), err_msg=name)


@pytest.mark.parametrize("expert_sizes", [True, False])
def test_config_from_metadata(tmp_path, expert_sizes):
    hf = build_hf_model("qwen2_moe")  # a dense intermediate_size of 96 must not be read as the experts'
    write_moe_gguf(tmp_path / "q.gguf", hf, "qwen2_moe", expert_sizes=expert_sizes)
    cfg = open_model(tmp_path / "q.gguf").config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.intermediate_size, cfg.shared_expert_size) == (4, 2, 32, 64)
    assert cfg.norm_topk_prob is False  # llama.cpp's qwen2moe graph does not renormalise
    hf = build_hf_model("mixtral")
    write_moe_gguf(tmp_path / "m.gguf", hf, "mixtral")
    cfg = open_model(tmp_path / "m.gguf").config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.intermediate_size, cfg.norm_topk_prob) == (4, 2, 64, True)


def _hf_holding(expected: dict[str, np.ndarray], kind: str):
    """A transformers model of `kind` whose weights are `expected` (experts fused back)."""
    hf = build_hf_model(kind, seed=1)
    cfg = hf.config
    state = {}
    for name in hf.state_dict():
        j = name.split(".")[2] if name.startswith("model.layers.") else None
        experts = range(cfg.num_local_experts if kind == "mixtral" else cfg.num_experts)
        expert = f"model.layers.{j}.{EXPERT[kind]}.weight"
        if name.endswith("experts.gate_up_proj"):
            state[name] = np.stack([np.concatenate([expected[expert.format(e=e, p=PROJ[kind][0])],
                                                    expected[expert.format(e=e, p=PROJ[kind][1])]]) for e in experts])
        elif name.endswith("experts.down_proj"):
            state[name] = np.stack([expected[expert.format(e=e, p=PROJ[kind][2])] for e in experts])
        else:
            state[name] = expected[name.replace("mlp.gate.", ROUTER[kind] + ".")]
    hf.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in state.items()})
    return hf


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0])
def test_mixtral_gguf_generates_like_transformers_on_its_weights(tmp_path, qtype):
    path = tmp_path / "m.gguf"
    expected = write_moe_gguf(path, build_hf_model("mixtral"), "mixtral", qtype)
    ours = LLM(path, dtype="float32").generate([PROMPT], SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert ours[0].token_ids == _greedy(_hf_holding(expected, "mixtral"), PROMPT, 12)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0])
def test_qwen2_moe_gguf_generates_like_transformers_loading_it(tmp_path, qtype):
    from transformers import AutoModelForCausalLM

    hf = build_hf_model("qwen2_moe")
    path = tmp_path / "m.gguf"
    write_moe_gguf(path, hf, "qwen2_moe", qtype)
    # transformers maps neither expert size from the GGUF metadata, so it is given the config.
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", config=hf.config,
                                                  dtype=torch.float32).eval()
    ours = LLM(path, dtype="float32").generate([PROMPT], SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert ours[0].token_ids == _greedy(theirs, PROMPT, 12)


@pytest.mark.parametrize("arch,counts,message", [
    ("llama", {"expert_count": 4}, "no llama.expert_used_count"),
    ("qwen2moe", {}, "no qwen2moe.expert_count"),
    ("qwen2", {"expert_count": 4, "expert_used_count": 2}, "'qwen2' with experts is not supported"),
])
def test_incomplete_moe_metadata_is_refused_by_name(tmp_path, arch, counts, message):
    from flexbatch.errors import ModelFormatError

    writer = GGUFWriter(str(tmp_path / "m.gguf"), arch)
    for key, value in counts.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFormatError, match=message):
        open_model(tmp_path / "m.gguf")
