"""Gemma 2/3, Phi-3, Mixtral and Qwen2-MoE on a CUDA device: the prefill's and 20 decode
steps' logits against transformers on the same GPU and weights, and weights (experts too) and
KV cache offloaded to host RAM and disk giving the tokens of the run with everything on the
GPU. Skipped on machines without CUDA."""
from __future__ import annotations

import copy

import pytest
import torch
from test_families import MIXED, PARAMS, PROMPT
from test_gpu import POLICIES

from flexbatch import LLM
from flexbatch.config import Policy

from conftest import FAMILY_KINDS
from test_models_vs_hf import hf_with_logits, ours_with_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OFFLOADED = ["weights_disk_cache_disk", "cache_host_cpu_attention", "mixed_three_tiers"]


def all_on_gpu_tokens(folder, **compression) -> list[list[int]]:
    with LLM(folder, dtype="float32", device="cuda", policy=Policy(gpu_batch_size=4, **compression)) as llm:
        return [o.token_ids for o in llm.generate(MIXED, PARAMS)]


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_gpu_logits_match_hf_on_the_gpu(tiny_model, kind):
    folder, hf = tiny_model(kind)
    with LLM(folder, dtype="float32", device="cuda") as llm:
        our_tokens, our_logits = ours_with_logits(llm, PROMPT)
    # a copy: the session's CPU model is the oracle of the CPU tests
    hf_tokens, hf_logits = hf_with_logits(copy.deepcopy(hf).cuda(), PROMPT)
    torch.testing.assert_close(our_logits, hf_logits.cpu(), rtol=1e-4, atol=1e-4)
    assert our_tokens == hf_tokens


@pytest.mark.parametrize("policy_name", OFFLOADED)
@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_gpu_offloaded_family_equals_all_on_gpu(tiny_model, tmp_path, kind, policy_name):
    folder, _ = tiny_model(kind)
    with LLM(folder, dtype="float32", device="cuda", policy=POLICIES[policy_name], offload_dir=tmp_path) as llm:
        got = [o.token_ids for o in llm.generate(MIXED, PARAMS)]
    assert got == all_on_gpu_tokens(folder)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_gpu_compressed_on_disk_equals_compressed_on_gpu(tiny_model, tmp_path, kind):
    folder, _ = tiny_model(kind)
    compression = dict(compress_weight=True, compress_cache=True, compress_group=32)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_device=0, weights_host=0.5, cache_device=0,
                    cache_host=0.5, **compression)
    with LLM(folder, dtype="float32", device="cuda", policy=policy, offload_dir=tmp_path) as llm:
        got = [o.token_ids for o in llm.generate(MIXED, PARAMS)]
    assert got == all_on_gpu_tokens(folder, **compression)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_gpu_batch_of_mixed_lengths_equals_each_alone(tiny_model, kind):
    folder, _ = tiny_model(kind)
    with LLM(folder, dtype="float32", device="cuda", batch_size=8) as llm:
        together = [o.token_ids for o in llm.generate(MIXED, PARAMS)]
        alone = [llm.generate([p], PARAMS)[0].token_ids for p in MIXED]
    assert together == alone
