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


def test_shared_contexts_run_once_per_group_and_groups_fill_rows():
    rows = pack_by_context(PAIRS)
    assert len(rows) == 1  # 12 + 3 + 4 tokens: one row
    groups = rows[0].groups
    assert sorted(tuple(g.context) for g in groups) == sorted([tuple(CONTEXT), (1, 2), (40,)])
    group = next(g for g in groups if g.context == CONTEXT)
    assert group.num_tokens == 7 + 2 + 0 + 1 + 2  # the context once, each continuation less its last token
    split = pack_by_context(PAIRS, max_row_tokens=10)
    assert sorted(i for r in split for g in r.groups for i, _ in g.continuations) == list(range(len(PAIRS)))
    assert all(g.num_tokens <= 10 or len(g.continuations) == 1 for r in split for g in r.groups)
    assert all(r.num_tokens <= 10 or len(r.groups) == 1 for r in split)
    assert split == sorted(split, key=lambda r: -r.num_tokens)


def test_groups_fill_rows_best_fit_largest_first():
    # groups of 6, 5, 4, 3, 2 tokens (a context of n - 1 and one two-token continuation) in rows of 9:
    # 6 + 3, 5 + 4, 2 by hand
    pairs = [([n] * (n - 1), [1, 2]) for n in (2, 4, 6, 3, 5)]
    rows = pack_by_context(pairs, max_row_tokens=9)
    assert [[g.num_tokens for g in r.groups] for r in rows] == [[6, 3], [5, 4], [2]]


def test_short_contexts_packed_in_one_row_score_as_alone(tiny_model):
    """Eighty short contexts with two continuations each, in rows of several groups (a group's
    tokens must see nothing of the other groups in its row); blocks of two rows."""
    folder, hf = tiny_model("llama_gqa_tied_llama3")
    g = torch.Generator().manual_seed(3)
    pairs = []
    for i in range(80):
        context = torch.randint(3, 250, (int(torch.randint(5, 60, (), generator=g)),), generator=g).tolist()
        pairs += [(context, [7 + i, 9]), (context, [11, 12, 13 + i % 200])]
    rows = pack_by_context(pairs)
    assert len(rows) >= 3 and all(len(r.groups) > 1 for r in rows)
    got = LLM(folder, dtype="float32", batch_size=2).score_continuations(pairs)
    for (context, continuation), scored in zip(pairs, got):
        logprobs, greedy = hf_scores(hf, context, continuation)
        assert scored.logprobs == pytest.approx(logprobs, abs=1e-4)
        assert scored.greedy == greedy


def test_in_memory_scoring_blocks_hold_about_prefill_tokens(tiny_model, monkeypatch):
    """With every weight in memory a scoring block holds about PREFILL_TOKENS tokens whatever
    the batch size (a block of 64 rows of 1,024 tokens was slower and held 2.4 GB): 30 groups of
    a 300-token context and a 5-token continuation fill 10 rows of 3 x 304 = 912 tokens,
    4096 // 912 = 4 rows a block; the scores stay transformers'."""
    from flexbatch.engine.runner import InMemoryRunner

    folder, hf = tiny_model("opt_pre_ln")
    g = torch.Generator().manual_seed(4)
    pairs = [(torch.randint(3, 250, (300,), generator=g).tolist(), torch.randint(3, 250, (5,), generator=g).tolist())
             for _ in range(30)]
    blocks, real = [], InMemoryRunner.score_packed
    monkeypatch.setattr(InMemoryRunner, "score_packed", lambda self, rows: (
        blocks.append(tuple(rows.input_ids.shape)), real(self, rows))[1])
    got = LLM(folder, dtype="float32", batch_size=64).score_continuations(pairs)
    assert blocks == [(4, 912), (4, 912), (2, 912)]
    for (context, continuation), scored in zip(pairs, got):
        assert scored.logprobs == pytest.approx(hf_scores(hf, context, continuation)[0], abs=1e-4)


def test_bad_pairs_are_refused_before_running(tiny_model):
    folder, _ = tiny_model("qwen2")
    llm = LLM(folder, dtype="float32")
    with pytest.raises(ConfigError, match="at least one token"):
        llm.score_continuations([([], [3])])
    with pytest.raises(ConfigError, match="exceeds the model's context of 512"):
        llm.score_continuations([([1] * 500, [2] * 20)])
