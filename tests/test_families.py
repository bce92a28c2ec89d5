"""Gemma 2/3, Phi-3, Mixtral and Qwen2-MoE against transformers on the same weights, in
memory, offloaded to disk and compressed. The tiny configs (conftest._family_configs) make a
30-token run cross Gemma's sliding window and Phi-3's original rope length."""
from __future__ import annotations

import pytest
import torch
from test_models_vs_hf import hf_with_logits, ours_with_logits

from flexbatch import LLM, SamplingParams
from flexbatch.config import Policy
from flexbatch.storage.tiers import Tier

from conftest import FAMILY_KINDS

PROMPT = [5, 17, 99, 3, 250, 42, 7, 8, 9, 10, 11]
MIXED = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [200, 100], list(range(30, 53))]
PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)
ON_DISK = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_device=0, weights_host=0, cache_device=0,
                 cache_host=0)
COMPRESSED = dict(compress_weight=True, compress_group=32, cache_window=0)


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


def test_phi3_short_rope_factors_match_hf(tiny_model):
    """A sequence that stays within original_max_position_embeddings (8) uses LongRoPE's short factors."""
    folder, hf = tiny_model("phi3")
    llm = LLM(folder, dtype="float32")
    prompt = [40, 41, 42]
    recorder_tokens, logits = ours_with_logits(llm, prompt)
    hf_tokens, hf_logits = hf_with_logits(hf, prompt)
    # steps 0..4 end at position 7 (8 positions): still the short factors on both sides
    torch.testing.assert_close(logits[:5], hf_logits[:5], rtol=1e-4, atol=1e-4)
    assert recorder_tokens[:5] == hf_tokens[:5]


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
