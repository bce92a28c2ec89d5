"""LLM.generate speaks Hugging Face / FlexGen keywords; top-N logprobs per generated token."""
from __future__ import annotations

import pytest
import torch

from flexbatch import LLM, SamplingParams
from flexbatch.errors import ConfigError

PROMPTS = [[5, 6, 7, 8], [9, 10]]


@pytest.fixture(scope="module")
def llm(tiny_model):
    folder, _ = tiny_model("llama_gqa_tied_llama3")
    return LLM(folder, dtype="float32", batch_size=4)


def tokens(outputs):
    return [o.token_ids for o in outputs]


def test_hf_keywords_map_onto_sampling_params(llm):
    greedy = SamplingParams(max_new_tokens=6)
    assert tokens(llm.generate(PROMPTS, max_new_tokens=6)) == tokens(llm.generate(PROMPTS, greedy))
    assert tokens(llm.generate(PROMPTS, max_new_tokens=6, do_sample=False, temperature=0.7)) == \
        tokens(llm.generate(PROMPTS, greedy))
    sampled = SamplingParams(max_new_tokens=6, temperature=0.7, top_k=20, top_p=0.9, seed=4)
    assert tokens(llm.generate(PROMPTS, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=4,
                               max_new_tokens=6)) == tokens(llm.generate(PROMPTS, sampled))
    assert SamplingParams.from_hf(do_sample=True).temperature == 1.0


def test_flexgen_style_tensor_input_and_token_id_stop(llm):
    free = llm.generate(PROMPTS[:1], max_new_tokens=6)[0].token_ids
    stop = free[2]
    stopped = llm.generate(torch.tensor(PROMPTS[:1]), max_new_tokens=6, stop=stop)[0]
    assert stopped.token_ids == free[:free.index(stop) + 1] and stopped.finish_reason == "stop"


def test_bad_keywords_are_refused(llm):
    with pytest.raises(ConfigError, match="num_beams"):
        llm.generate(PROMPTS, num_beams=4)
    with pytest.raises(ConfigError, match="not both"):
        llm.generate(PROMPTS, SamplingParams(), max_new_tokens=3)
    with pytest.raises(ConfigError, match="top_logprobs"):
        SamplingParams(top_logprobs=21)


def test_top_logprobs_are_the_most_likely_tokens(llm):
    out = llm.generate(PROMPTS, SamplingParams(max_new_tokens=5, top_logprobs=3))
    plain = llm.generate(PROMPTS, SamplingParams(max_new_tokens=5, logprobs=True))
    for o, p in zip(out, plain):
        assert o.token_ids == p.token_ids and o.logprobs == pytest.approx(p.logprobs)
        for token, logprob, alternatives in zip(o.token_ids, o.logprobs, o.top_logprobs):
            assert len(alternatives) == 3 and alternatives[0] == (token, pytest.approx(logprob))  # greedy
            values = [v for _, v in alternatives]
            assert values == sorted(values, reverse=True)
