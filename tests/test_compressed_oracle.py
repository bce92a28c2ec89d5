"""Compressed runs against independent oracles, and compression defaults that do no harm.

- Weights: flexbatch with compressed weights against transformers running the same model
  whose weights were quantized and dequantized here, by a few lines of fp32 arithmetic that
  share nothing with flexbatch's packing code.
- The default model on real text: top-1 agreement with transformers on the GGUF file, token
  by token as generation sees the cache.
- The default group size follows a GGUF source's grid; eval-ppl reads a compressed cache back.
"""
from __future__ import annotations

import argparse
import copy

import pytest
import torch

from flexbatch import LLM
from flexbatch.cli.common import add_policy_args, compression_fields
from flexbatch.cli.eval_ppl import default_piece
from flexbatch.config import Policy
from flexbatch.kernels.packed import packable
from flexbatch.prepare import planned_compression
from flexbatch.weights.gguf_file import open_gguf
from flexbatch.weights.loader import layer_weight_grid

from test_models_vs_hf import hf_with_logits, ours_with_logits

GROUP = 32


def fake_quantize(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Group-wise asymmetric quantization along input features, then back, in fp32: each
    group's values become min + round((w - min) / step) * step, step = (max - min) / levels."""
    g = w.float().reshape(w.shape[0], -1, group)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (high - low) / ((1 << bits) - 1)
    step = torch.where(step > 0, step, torch.ones_like(step))
    return (low + torch.round((g - low) / step) * step).reshape(w.shape)


def hf_on_dequantized_weights(hf, bits: int, group: int):
    """A copy of `hf` whose layer matrices flexbatch would compress are quantized and back."""
    model = copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and packable(tuple(p.shape), bits, group):
                p.copy_(fake_quantize(p, bits, group))
    return model


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["opt_pre_ln", "llama_mha_bias"])
def test_compressed_weights_match_transformers_on_the_dequantized_weights(tiny_model, kind, bits):
    folder, hf = tiny_model(kind)
    policy = Policy(gpu_batch_size=1, compress_weight=True, compress_bits=bits, compress_group=GROUP)
    prompt = [5, 17, 99, 3, 250, 42, 7, 8, 9, 10, 11]
    with LLM(folder, dtype="float32", policy=policy) as llm:
        our_tokens, our_logits = ours_with_logits(llm, prompt)
    oracle = hf_on_dequantized_weights(hf, bits, GROUP)
    hf_tokens, hf_logits = hf_with_logits(oracle, prompt)
    # Both multiply by the same fp32 values; only summation order differs, so the fp32
    # oracle tolerance of the uncompressed tests holds.
    torch.testing.assert_close(our_logits, hf_logits, rtol=1e-4, atol=1e-4)
    assert our_tokens == hf_tokens
    # and the compression is real: the original weights give clearly different logits
    _, plain_logits = hf_with_logits(hf, prompt)
    assert (plain_logits - hf_logits).abs().max() > 100 * 1e-4


# ---- the default model on real text ---------------------------------------------------------

TEXT_TOKENS = 64


@pytest.fixture(scope="module")
def real_text_ids(default_model_store):
    from flexbatch.evaluation import default_text_path, load_text

    try:
        text = load_text(default_text_path(), 4000)
    except Exception as e:  # the evaluation text is an optional package
        pytest.skip(f"no evaluation text: {e}")
    tok = LLM(default_model_store, dtype="float32").tokenizer
    return tok(text, add_special_tokens=False)["input_ids"][:TEXT_TOKENS]


@pytest.fixture(scope="module")
def hf_top1(default_gguf, real_text_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([real_text_ids])).logits[0].argmax(-1)


def stepwise_top1(llm: LLM, ids: list[int]) -> torch.Tensor:
    """The argmax after each token, feeding the text one token per step (generation's view
    of the KV cache, compressed or not)."""
    runner, n = llm.runner, len(ids)
    tokens = torch.tensor([ids])
    key_valid = torch.ones(1, n, dtype=torch.bool)
    runner.begin(1, n, 1)
    try:
        return torch.stack([runner.step(tokens[:, t:t + 1], key_valid[:, :t + 1], t)[0].argmax()
                            for t in range(n)])
    finally:
        runner.end()


@pytest.mark.slow
@pytest.mark.parametrize("switches,agreement", [
    # measured on 160 tokens: 1.0 with the default group (the GGUF's grid of 32), 0.76 with
    # groups of 64, 0.975 with the cache compressed too
    ({"compress_weight": True}, 0.98),
    ({"compress_weight": True, "compress_cache": True}, 0.9),
])
def test_default_model_compressed_top1_agrees_with_transformers(default_model_store, real_text_ids, hf_top1,
                                                                 switches, agreement):
    with LLM(default_model_store, dtype="float32", policy=Policy(gpu_batch_size=1, **switches)) as llm:
        assert llm.policy.compress_group == GROUP
        ours = stepwise_top1(llm, real_text_ids)
    assert (ours == hf_top1).float().mean().item() >= agreement


# ---- defaults ---------------------------------------------------------------------------------

def test_grid_of_the_default_gguf_and_of_its_store(default_gguf, default_model_store):
    from flexbatch.models import get_family
    from flexbatch.weights.source import open_model

    for opened in (open_gguf(default_gguf), open_model(default_model_store)):
        assert layer_weight_grid(opened.config, get_family(opened.config), opened.source) == 32  # Q4_1 blocks


def test_default_group_follows_the_source_grid(default_model_store, tiny_model):
    with LLM(default_model_store, dtype="float32", policy=Policy(compress_weight=True)) as llm:
        assert llm.policy.compress_group == 32 and llm.policy.weight_quant.group_size == 32
    with LLM(default_model_store, dtype="float32", policy=Policy(compress_weight=True, compress_group=64)) as llm:
        assert llm.policy.compress_group == 64  # given: kept
    with LLM(default_model_store, dtype="float32", policy=Policy(compress_cache=True)) as llm:
        assert llm.policy.cache_quant.group_size == 64  # the weights' grid says nothing about the cache
    folder, _ = tiny_model("opt_pre_ln")  # dense safetensors: no grid
    with LLM(folder, dtype="float32", policy=Policy(compress_weight=True)) as llm:
        assert llm.policy.compress_group is None and llm.policy.weight_quant.group_size == 64


def test_a_store_packed_on_its_own_group_keeps_it(tiny_model, tmp_path):
    from flexbatch.cli.main import main

    folder, _ = tiny_model("opt_pre_ln")
    dst = tmp_path / "packed16"
    assert main(["convert", str(folder), str(dst), "--compress-weight", "--compress-group", "16"]) == 0
    with LLM(dst, dtype="float32", policy=Policy(compress_weight=True)) as llm:
        assert llm.policy.compress_group == 16  # its values lie on that grid: read packed, not re-quantized


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_policy_args(parser)
    parser.add_argument("--piece", type=int, default=None)
    return parser.parse_args(list(flags))


def test_cli_group_flag_defaults_to_the_grid():
    planned = lambda *flags, grid: planned_compression(compression_fields(parse(*flags)), lambda: grid)
    assert planned("--compress-weight", grid=32)["compress_group"] == 32
    assert planned("--compress-weight", grid=None)["compress_group"] is None  # 64 later
    assert planned("--compress-weight", "--compress-group", "64", grid=32)["compress_group"] == 64
    assert planned("--compress-cache", grid=32)["compress_group"] is None


def test_eval_ppl_reads_a_compressed_cache_back_by_default():
    assert default_piece(parse()) is None  # nothing compressed: whole chunks
    assert default_piece(parse("--compress-weight")) is None
    assert default_piece(parse("--compress-cache")) == 32  # the cache window
    assert default_piece(parse("--compress-cache", "--cache-window", "0")) == 1
    assert default_piece(parse("--compress-cache", "--piece", "1024")) == 1024
