"""Sampling: seeded reproducibility, filters, and per-request parameters."""
from __future__ import annotations

import pytest
import torch

from flexbatch import LLM, SamplingParams
from flexbatch.engine.sampling import filter_logits
from flexbatch.errors import ConfigError


@pytest.fixture(scope="module")
def llm(tiny_model):
    folder, _ = tiny_model("llama_gqa_tied_llama3")
    return LLM(folder, dtype="float32", batch_size=4)


PROMPT = [5, 6, 7, 8]


def sample(llm, seed, **kw):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed, ignore_eos=True, **kw)
    return llm.generate([PROMPT], params)[0].token_ids


def test_seeded_sampling_is_reproducible_and_seed_dependent(llm):
    assert sample(llm, 1) == sample(llm, 1)
    assert sample(llm, 1) != sample(llm, 2)


def test_seeded_request_is_independent_of_its_batch(llm):
    seeded = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    other = SamplingParams(max_new_tokens=16, temperature=0.8, seed=99, ignore_eos=True)
    alone = llm.generate([PROMPT], seeded)[0].token_ids
    batched = llm.generate([[1, 2, 3, 4, 5, 6, 7], PROMPT, [9]], [other, seeded, other])[1].token_ids
    assert alone == batched


def test_top_k_1_is_greedy(llm):
    greedy = llm.generate([PROMPT], SamplingParams(max_new_tokens=16, ignore_eos=True))[0].token_ids
    assert sample(llm, 3, top_k=1) == greedy


def test_filters_keep_exactly_the_expected_tokens():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, **kw))).tolist()
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 + 0.25 reaches 0.7
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(top_p=0.8) == [True, True, True, False]


def test_max_new_tokens_and_finish_reason(llm):
    out = llm.generate([PROMPT], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_token_ids_end_generation(llm):
    greedy = llm.generate([PROMPT], SamplingParams(max_new_tokens=16, ignore_eos=True))[0].token_ids
    stop_at = greedy[3]
    out = llm.generate([PROMPT], SamplingParams(max_new_tokens=16, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == greedy[:greedy.index(stop_at) + 1] and out.finish_reason == "stop"


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0),
                                    dict(top_k=-2), dict(stop=[""])])
def test_invalid_params_are_refused(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context_is_refused(llm):
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        llm.generate([[1] * 500], SamplingParams(max_new_tokens=20))
