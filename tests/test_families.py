"""Gemma 2/3, Phi-3, Mixtral and Qwen2-MoE against transformers on the same weights, in
memory, offloaded to disk and compressed. The tiny configs (conftest._family_configs) make a
30-token run cross Gemma's sliding window and Phi-3's original rope length."""
from __future__ import annotations

import pytest
import torch

from flexbatch import LLM, SamplingParams
from flexbatch.config import Policy
from flexbatch.storage.tiers import Tier

from conftest import FAMILY_KINDS
from test_models_vs_hf import hf_with_logits, ours_with_logits

PROMPT = [5, 17, 99, 3, 250, 42, 7, 8, 9, 10, 11]
MIXED = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [200, 100], list(range(30, 53))]
PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)
ON_DISK = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_device=0, weights_host=0, cache_device=0,
                 cache_host=0)
COMPRESSED = dict(compress_weight=True, compress_cache=True, compress_group=32, cache_window=2)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_prefill_and_decode_logits_match_hf(tiny_model, kind):
    folder, hf = tiny_model(kind)
    our_tokens, our_logits = ours_with_logits(LLM(folder, dtype="float32"), PROMPT)
    hf_tokens, hf_logits = hf_with_logits(hf, PROMPT)
    # Step 0 is the prefill's last position, steps 1..20 decode over the KV cache.
    torch.testing.assert_close(our_logits, hf_logits, rtol=1e-4, atol=1e-4)
    assert our_tokens == hf_tokens
    assert len(set(hf_tokens)) >= 2, "a degenerate model would make this test weak"


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "phi3", "qwen2_moe"])
def test_every_prompt_position_matches_hf(tiny_model, kind):
    """Scores of a 37-token prompt: every position, most of them beyond Gemma's 4-token window."""
    folder, hf = tiny_model(kind)
    prompt = list(range(3, 40))
    [ours] = LLM(folder, dtype="float32").score([prompt])
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0]
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor(ours.logprobs), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("offloaded", [False, True])
def test_phi3_crossing_to_long_rope_factors_matches_hf(tiny_model, tmp_path, offloaded):
    """A 3-token prompt crosses original_max_position_embeddings (8) at decode step 6: from
    there LongRoPE's long factors rotate every position, and transformers recomputes its
    cache; so does flexbatch (Block.recompute), in memory and with weights and cache on disk."""
    folder, hf = tiny_model("phi3")
    llm = LLM(folder, dtype="float32", policy=ON_DISK if offloaded else None, offload_dir=tmp_path)
    prompt = [40, 41, 42]
    our_tokens, our_logits = ours_with_logits(llm, prompt)
    hf_tokens, hf_logits = hf_with_logits(hf, prompt)
    torch.testing.assert_close(our_logits, hf_logits, rtol=1e-4, atol=1e-4)
    assert our_tokens == hf_tokens
    llm.close()


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_batch_of_mixed_lengths_equals_each_alone(tiny_model, kind):
    folder, _ = tiny_model(kind)
    llm = LLM(folder, dtype="float32", batch_size=8)
    together = [o.token_ids for o in llm.generate(MIXED, PARAMS)]
    alone = [llm.generate([p], PARAMS)[0].token_ids for p in MIXED]
    assert together == alone


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_weights_and_cache_on_disk_equal_in_memory(tiny_model, tmp_path, kind):
    folder, _ = tiny_model(kind)
    expected = [o.token_ids for o in LLM(folder, dtype="float32", batch_size=4).generate(MIXED, PARAMS)]
    with LLM(folder, dtype="float32", policy=ON_DISK, offload_dir=tmp_path) as llm:
        assert llm.runner.home.tier_bytes()[Tier.DISK] > 0
        assert [o.token_ids for o in llm.generate(MIXED, PARAMS)] == expected


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_compressed_on_disk_equals_compressed_in_memory(tiny_model, tmp_path, kind):
    folder, _ = tiny_model(kind)
    in_memory = Policy(gpu_batch_size=4, **COMPRESSED)
    on_disk = Policy(**{**ON_DISK.__dict__, **COMPRESSED})
    results = []
    for name, policy in (("memory", in_memory), ("disk", on_disk)):
        with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path / name) as llm:
            results.append([o.token_ids for o in llm.generate(MIXED, PARAMS)])
    assert results[0] == results[1]


def test_experts_are_placed_per_tier_like_any_weight(tiny_model, tmp_path):
    """Half the weights on disk: a layer's experts are split between memory and disk, and the
    tokens are those of the in-memory run."""
    folder, _ = tiny_model("mixtral")
    expected = [o.token_ids for o in LLM(folder, dtype="float32", batch_size=4).generate(MIXED, PARAMS)]
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_device=0.5, weights_host=0)
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path) as llm:
        for layer in llm.runner.home.tiers:
            expert_tiers = {tier for name, tier in layer.items() if ".experts." in name}
            assert expert_tiers == {Tier.DEVICE, Tier.DISK}
        assert [o.token_ids for o in llm.generate(MIXED, PARAMS)] == expected


def test_active_parameters_count_top_k_experts(tiny_model):
    """Hand count for the tiny Mixtral: attention, norms and router, plus 2 of 4 experts."""
    folder, hf = tiny_model("mixtral")
    llm = LLM(folder, dtype="float32")
    c, i, q, kv = 64, 64, 2 * 32, 1 * 32
    attention = c * q + 2 * c * kv + q * c
    assert llm.family.active_layer_params(llm.config) == attention + 2 * c + 4 * c + 2 * 3 * c * i


def test_compression_changes_the_computation(tiny_model, tmp_path):
    """Guards the compressed test above: a compressed run really computes with quantized values."""
    folder, _ = tiny_model("gemma2")
    prompt = [list(range(3, 30))]
    plain = LLM(folder, dtype="float32").score(prompt)[0].logprobs
    with LLM(folder, dtype="float32", policy=Policy(gpu_batch_size=4, **COMPRESSED), offload_dir=tmp_path) as llm:
        assert llm.score(prompt)[0].logprobs != plain


def test_chat_text_gets_one_bos(tiny_model, tmp_path):
    """A chat template that writes BOS itself (as Gemma's does) and a tokenizer that adds BOS
    (as Gemma's does): the prompt holds one BOS, the ids transformers' own chat tokenization gives."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder, _ = tiny_model("gemma2")
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 3, "<end_of_turn>": 4, "user": 5, "model": 6,
             "hello": 7, "there": 8, "<unk>": 9}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    template = ("{{ bos_token }}{% for m in messages %}<start_of_turn> {{ m['role'] }} {{ m['content'] }} "
                "<end_of_turn> {% endfor %}<start_of_turn> model ")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>", chat_template=template)
    with_tokenizer = tmp_path / "with_tokenizer"
    shutil.copytree(folder, with_tokenizer)
    tokenizer.save_pretrained(with_tokenizer)
    llm = LLM(with_tokenizer, dtype="float32")
    messages = [{"role": "user", "content": "hello there"}]
    ids = llm.encode(llm.apply_chat_template(messages))
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert ids.count(2) == 1 and llm.encode("hello there") == [2, 7, 8]
