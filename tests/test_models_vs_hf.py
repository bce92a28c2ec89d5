"""Our fp32 compute against Hugging Face transformers on the same saved weights."""
from __future__ import annotations

import pytest
import torch

from flexbatch import LLM, SamplingParams
from flexbatch.engine.generation import Request, Vocabulary, generate
from flexbatch.engine.runner import Runner

from conftest import MODEL_KINDS

NEW_TOKENS = 20


class RecordingRunner(Runner):
    """Wraps a runner and keeps the logits of every step."""

    def __init__(self, inner):
        self.inner, self.logits = inner, []

    def begin(self, batch_size, capacity, prompt_width=None):
        self.inner.begin(batch_size, capacity, prompt_width)

    def end(self):
        self.inner.end()

    def step(self, input_ids, key_valid, start, rows=None):
        out = self.inner.step(input_ids, key_valid, start, rows)
        self.logits.append(out.clone())
        return out

    def admit(self, rows, input_ids, key_valid, end, shared=0):
        out = self.inner.admit(rows, input_ids, key_valid, end, shared)
        if not self.logits:  # the prompt's; a later admission recomputes a sequence before a step
            self.logits.append(out.clone())
        return out

    def recomputes_at(self, length):
        return self.inner.recomputes_at(length)

    def shift(self, offset, end):
        self.inner.shift(offset, end)

    def score(self, input_ids, key_valid, piece=None, top=0):
        return self.inner.score(input_ids, key_valid, piece, top)


def ours_with_logits(llm: LLM, prompt: list[int]):
    recorder = RecordingRunner(llm.runner)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    vocab = Vocabulary(None, set(), llm.pad_id, llm.config.vocab_size)
    [out] = generate(recorder, [Request(prompt, params)], 1, vocab)
    return out.token_ids, torch.stack(recorder.logits)[:, 0]


def hf_with_logits(model, prompt: list[int]):
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits)[:, 0]


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_prefill_and_decode_logits_match_hf(tiny_model, kind):
    folder, hf = tiny_model(kind)
    llm = LLM(folder, dtype="float32")
    prompt = [5, 17, 99, 3, 250, 42, 7, 8, 9, 10, 11]
    our_tokens, our_logits = ours_with_logits(llm, prompt)
    hf_tokens, hf_logits = hf_with_logits(hf, prompt)
    # Step 0 is the prefill's last position; steps 1.. are decode steps with the KV cache.
    torch.testing.assert_close(our_logits, hf_logits, rtol=1e-4, atol=1e-4)
    assert our_tokens == hf_tokens
    assert len(set(hf_tokens)) >= 2, "a degenerate model would make this test weak"


@pytest.mark.parametrize("kind", ["opt_pre_ln", "llama_gqa_tied_llama3", "qwen2"])
def test_full_prefill_logits_match_hf(tiny_model, kind):
    folder, hf = tiny_model(kind)
    llm = LLM(folder, dtype="float32")
    prompt = list(range(3, 40))
    [ours] = llm.score([prompt])
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0]
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor(ours.logprobs), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("offloaded", [False, True])
def test_scored_positions_top_alternatives_match_hf(tiny_model, tmp_path, offloaded):
    """score(top_logprobs=k): at each scored position of texts of mixed lengths, the k most
    likely tokens and their logprobs are transformers' top k of the same distribution."""
    from flexbatch.config import Policy

    folder, hf = tiny_model("llama_gqa_tied_llama3")
    policy = Policy(gpu_batch_size=1, num_gpu_batches=2, weights_device=0, weights_host=0, cache_device=0,
                    cache_host=0) if offloaded else None
    prompts = [list(range(3, 30)), [9, 40, 41, 200, 7]]
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path) as llm:
        scored = llm.score(prompts, top_logprobs=3)
    for prompt, ours in zip(prompts, scored):
        with torch.no_grad():
            best = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], -1)[:-1].topk(3, dim=-1)
        assert [[t for t, _ in top] for top in ours.top_logprobs] == best.indices.tolist()
        torch.testing.assert_close(torch.tensor([[lp for _, lp in top] for top in ours.top_logprobs]), best.values,
                                   rtol=1e-4, atol=1e-4)
        assert len(ours.top_logprobs) == len(ours.logprobs) == len(prompt) - 1


@pytest.mark.parametrize("kind", ["opt_post_ln_proj", "llama_gqa_tied_llama3", "mistral"])
def test_batch_of_mixed_lengths_equals_each_alone(tiny_model, kind):
    folder, _ = tiny_model(kind)
    llm = LLM(folder, dtype="float32", batch_size=8)
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [200, 100], list(range(30, 53))]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    together = [o.token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert together == alone


def test_hf_left_padded_batch_agrees(tiny_model):
    """Our batched run equals HF's own batched, left-padded generate."""
    folder, hf = tiny_model("llama_gqa_tied_llama3")
    llm = LLM(folder, dtype="float32")
    prompts = [[9, 8, 7, 6, 5], [4, 3]]
    ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))]
    ids = torch.tensor([[9, 8, 7, 6, 5], [0, 0, 0, 4, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          pad_token_id=0)
    assert ours == out[:, 5:].tolist()
