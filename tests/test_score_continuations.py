"""LLM.score_continuations (continuations of one context packed into one prefill row) against
transformers scoring each context + continuation on its own, for every model family."""
from __future__ import annotations

import pytest
import torch

from flexbatch import LLM
from flexbatch.config import Policy
from flexbatch.engine.scoring import pack_by_context
from flexbatch.errors import ConfigError

from conftest import FAMILY_KINDS, MODEL_KINDS

CONTEXT = [5, 6, 7, 8, 9, 10, 11]
PAIRS = [(CONTEXT, [20, 21, 22]), (CONTEXT, [23]), ([1, 2], [3, 4]), (CONTEXT, [24, 25]), ([40], [41, 42, 43, 44]),
         (CONTEXT, [20, 21, 22]), ([1, 2], [30])]


def hf_scores(model, context: list[int], continuation: list[int]) -> tuple[list[float], list[bool]]:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)[len(context) - 1:-1]
    targets = torch.tensor(continuation)
    return logprobs.gather(1, targets[:, None]).squeeze(1).tolist(), (logprobs.argmax(-1) == targets).tolist()


@pytest.mark.parametrize("kind", MODEL_KINDS + FAMILY_KINDS)
def test_packed_scores_match_transformers(tiny_model, kind):
    folder, hf = tiny_model(kind)
    got = LLM(folder, dtype="float32", batch_size=2).score_continuations(PAIRS)
    for (context, continuation), scored in zip(PAIRS, got):
        logprobs, greedy = hf_scores(hf, context, continuation)
        assert scored.token_ids == continuation
        assert scored.logprobs == pytest.approx(logprobs, abs=1e-4)
        assert scored.greedy == greedy


def test_greedy_flags_true_on_the_models_own_tokens(tiny_model):
    folder, hf = tiny_model("opt_pre_ln")
    with torch.no_grad():
        own = hf.generate(torch.tensor([CONTEXT]), max_new_tokens=4, do_sample=False, pad_token_id=1)[0, 7:].tolist()
    [scored] = LLM(folder, dtype="float32").score_continuations([(CONTEXT, own)])
    assert scored.greedy == [True] * 4 and scored.is_greedy


def test_weights_on_disk_score_the_same(tiny_model, tmp_path):
    folder, _ = tiny_model("llama_gqa_tied_llama3")
    expected = LLM(folder, dtype="float32").score_continuations(PAIRS)
    policy = Policy(gpu_batch_size=1, num_gpu_batches=2, weights_device=0, weights_host=0, cache_device=0,
                    cache_host=0)
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path) as llm:
        got = llm.score_continuations(PAIRS)
    for g, e in zip(got, expected):
        assert g.logprobs == pytest.approx(e.logprobs, abs=1e-5) and g.greedy == e.greedy


def test_shared_contexts_run_once_per_row():
    rows = pack_by_context(PAIRS)
    assert sorted(tuple(r.context) for r in rows) == sorted([tuple(CONTEXT), (1, 2), (40,)])
    row = next(r for r in rows if r.context == CONTEXT)
    assert row.num_tokens == 7 + 2 + 0 + 1 + 2  # the context once, each continuation less its last token
    assert rows == sorted(rows, key=lambda r: -r.num_tokens)
    split = pack_by_context(PAIRS, max_row_tokens=10)
    assert sorted(i for r in split for i, _ in r.continuations) == list(range(len(PAIRS)))
    assert all(r.num_tokens <= 10 or len(r.continuations) == 1 for r in split)


def test_bad_pairs_are_refused_before_running(tiny_model):
    folder, _ = tiny_model("qwen2")
    llm = LLM(folder, dtype="float32")
    with pytest.raises(ConfigError, match="at least one token"):
        llm.score_continuations([([], [3])])
    with pytest.raises(ConfigError, match="exceeds the model's context of 512"):
        llm.score_continuations([([1] * 500, [2] * 20)])
