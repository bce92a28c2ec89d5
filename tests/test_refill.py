"""Continuous refill: requests join a block as others finish, and every sequence gets exactly
the tokens transformers generates for it alone (fp32), in memory and offloaded, with mixed
prompt lengths, mixed max_new_tokens, stop tokens and stop strings; the cache is shifted
along the way."""
from __future__ import annotations

import random

import pytest
import torch

from flexbatch import LLM, SamplingParams
from flexbatch.config import Policy
from flexbatch.engine import generation
from flexbatch.engine import runner as runner_module
from flexbatch.kernels import attention as attention_module
from flexbatch.kernels import fused
from flexbatch.model_policy import decode_kernel

from test_models_vs_hf import RecordingRunner


def mixed_requests(seed: int, count: int, vocab: int = 256):
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.randint(1, 30))] for _ in range(count)]
    news = [rng.randint(1, 24) for _ in range(count)]
    return prompts, news


def hf_alone(model, prompt: list[int], max_new: int, stop: list[int] | None = None) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=stop, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class CountingRunner(RecordingRunner):
    """Counts admissions and shifts, so a test knows refill and shifting really ran."""

    def __init__(self, inner):
        super().__init__(inner)
        self.admits = self.shifts = 0
        self.shared: list[int] = []  # each admission's shared prefix length
        self.cfg = getattr(inner, "cfg", None)

    def admit(self, rows, input_ids, key_valid, end, shared=0):
        self.admits += 1
        self.shared.append(shared)
        return self.inner.admit(rows, input_ids, key_valid, end, shared)

    def step(self, input_ids, key_valid, start, rows=None):
        return self.inner.step(input_ids, key_valid, start, rows)

    def shift(self, offset, end):
        self.shifts += 1
        self.inner.shift(offset, end)

    def close(self):
        self.inner.close()


def stop_tokens_from(expected: list[list[int]], every: int) -> list[list[int]]:
    """For every `every`-th request, a stop token taken from the middle of its expected
    output, so that request ends early at the token's first occurrence."""
    return [[e[len(e) // 2]] if i % every == 0 and len(e) > 2 else [] for i, e in enumerate(expected)]


def run_with_refill(llm: LLM, prompts, params) -> tuple[list[list[int]], CountingRunner]:
    counter = llm.runner = CountingRunner(llm.runner)
    return [o.token_ids for o in llm.generate(prompts, params)], counter


@pytest.mark.parametrize("native", [True, False], ids=["c-decode", "pytorch-decode"])
@pytest.mark.parametrize("kind", ["llama_gqa_tied_llama3", "opt_pre_ln", "gemma2", "qwen2_moe"])
def test_refill_gives_each_sequence_its_tokens_alone(tiny_model, kind, monkeypatch, native):
    """With the C decode kernel, decode steps compute the rows in flight alone; without it
    (no compiler, FLEXBATCH_NATIVE_KERNELS=0), PyTorch's attention computes every row."""
    monkeypatch.setenv("FLEXBATCH_NATIVE_KERNELS", "1" if native else "0")
    folder, hf = tiny_model(kind)
    prompts, news = mixed_requests(1, 14)
    full = [hf_alone(hf, p, n) for p, n in zip(prompts, news)]
    stops = stop_tokens_from(full, every=3)
    expected = [hf_alone(hf, p, n, s or None) for p, n, s in zip(prompts, news, stops)]
    assert any(len(e) < n for e, n in zip(expected, news)), "some request must stop early"
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, stop_token_ids=s) for n, s in zip(news, stops)]
    monkeypatch.setattr(generation, "REFILL_FRACTION", 0.0)  # refill as soon as one row frees
    llm = LLM(folder, dtype="float32", batch_size=4)
    assert (llm.runner.decode is not None) == (native and decode_kernel() is not None)
    assert (fused._active is not None) == (llm.runner.decode is not None)  # the elementwise kernels with it
    got, counter = run_with_refill(llm, prompts, params)
    assert got == expected
    assert counter.admits > 4 and counter.shifts >= 1


OFFLOADED = {
    "weights_and_cache_on_disk": Policy(gpu_batch_size=2, num_gpu_batches=2, weights_device=0, weights_host=0,
                                        cache_device=0, cache_host=0),
    "cache_split_sequential": Policy(gpu_batch_size=3, num_gpu_batches=2, weights_device=0.5, weights_host=0,
                                     cache_device=0.4, cache_host=0.2, overlap=False),
}


@pytest.mark.parametrize("policy_name", list(OFFLOADED))
def test_offloaded_refill_gives_each_sequence_its_tokens_alone(tiny_model, tmp_path, policy_name):
    folder, hf = tiny_model("llama_gqa_tied_llama3")
    prompts, news = mixed_requests(2, 20)
    expected = [hf_alone(hf, p, n) for p, n in zip(prompts, news)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news]
    with LLM(folder, dtype="float32", policy=OFFLOADED[policy_name], offload_dir=tmp_path) as llm:
        got, counter = run_with_refill(llm, prompts, params)
    assert got == expected
    assert counter.admits > 1 and counter.shifts >= 1


def test_compressed_cache_refill_equals_static_blocks(tiny_model, tmp_path, monkeypatch):
    """A 4-bit cache is not exact, so the oracle is the same cache without refill: one block
    per request, where nothing joins and nothing shifts."""
    folder, _ = tiny_model("llama_gqa_tied_llama3")
    prompts, news = mixed_requests(3, 16)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news]
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, cache_device=0, cache_host=0, compress_cache=True)
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path / "a") as llm:
        alone = [llm.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
        monkeypatch.setattr(generation, "REFILL_FRACTION", 0.0)
        together, counter = run_with_refill(llm, prompts, params)
    assert counter.admits > 1 and counter.shifts >= 1
    # Re-encoding other rows' slots when a newcomer joins may move a 4-bit value by one
    # step, so allow a rare late difference: the first 4 tokens of each must agree.
    assert all(t[:4] == a[:4] for t, a in zip(together, alone))
    assert sum(t == a for t, a in zip(together, alone)) >= len(alone) - 1


def test_seeded_sampling_does_not_depend_on_block_neighbours(tiny_model):
    folder, _ = tiny_model("qwen2")
    prompts, news = mixed_requests(4, 8)
    params = [SamplingParams(max_new_tokens=n, temperature=0.9, top_p=0.9, seed=i, ignore_eos=True)
              for i, n in enumerate(news)]
    runs = [[o.token_ids for o in LLM(folder, dtype="float32", batch_size=b).generate(prompts, params)]
            for b in (1, 3, 8)]
    assert runs[0] == runs[1] == runs[2]


def prefixed_requests(seed: int, count: int, prefix_len: int = 24):
    """Prompts that share a `prefix_len`-token prefix (a system prompt, few-shot examples),
    then differ, with mixed lengths and max_new_tokens."""
    rng = random.Random(seed)
    prefix = [rng.randrange(2, 256) for _ in range(prefix_len)]
    prompts, news = mixed_requests(seed, count)
    return [prefix + p for p in prompts], news


@pytest.mark.parametrize("kind", ["llama_gqa_tied_llama3", "gemma2", "opt_post_ln_proj"])
def test_shared_prefix_computed_once_gives_each_sequence_its_tokens_alone(tiny_model, kind, monkeypatch):
    folder, hf = tiny_model(kind)
    prompts, news = prefixed_requests(5, 12)
    expected = [hf_alone(hf, p, n) for p, n in zip(prompts, news)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news]
    monkeypatch.setattr(generation, "REFILL_FRACTION", 0.25)
    got, counter = run_with_refill(LLM(folder, dtype="float32", batch_size=4), prompts, params)
    assert got == expected
    assert counter.shared[0] >= 24 and sum(s > 0 for s in counter.shared) >= 3


@pytest.mark.parametrize("with_prefix", [False, True])
def test_an_admission_is_computed_in_groups_from_their_own_first_column(tiny_model, monkeypatch, with_prefix):
    """Prompts joining together are computed in groups of about PREFILL_TOKENS tokens, each
    from where its own longest prompt starts, so the left padding shorter prompts would
    share is not computed; each sequence still gets its tokens alone (Gemma 2: a sliding
    window, which counts positions, not slots)."""
    folder, hf = tiny_model("gemma2")
    prompts, news = prefixed_requests(7, 16) if with_prefix else mixed_requests(7, 16)
    expected = [hf_alone(hf, p, n) for p, n in zip(prompts, news)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news]
    monkeypatch.setattr(runner_module, "PREFILL_TOKENS", 60)
    llm = LLM(folder, dtype="float32", batch_size=16)
    widths, forward = [], llm.runner._forward
    llm.runner._forward = lambda ids, ctx, caches: (widths.append(ids.shape[1]), forward(ids, ctx, caches))[1]
    got, _ = run_with_refill(llm, prompts, params)
    assert got == expected
    longest = max(map(len, prompts)) - (24 if with_prefix else 0)
    prefills = [w for w in widths[1 if with_prefix else 0:] if w > 1]  # after the prefix's own pass
    assert prefills[0] == longest and min(prefills) < longest / 2  # later groups are narrower


@pytest.mark.parametrize("policy_name", list(OFFLOADED))
def test_offloaded_shared_prefix_gives_each_sequence_its_tokens_alone(tiny_model, tmp_path, policy_name):
    folder, hf = tiny_model("qwen2")
    prompts, news = prefixed_requests(6, 11, prefix_len=30)
    expected = [hf_alone(hf, p, n) for p, n in zip(prompts, news)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news]
    with LLM(folder, dtype="float32", policy=OFFLOADED[policy_name], offload_dir=tmp_path) as llm:
        got, counter = run_with_refill(llm, prompts, params)
    assert got == expected
    assert counter.shared[0] >= 30


def test_shared_prefix_with_a_short_prompt_that_generates_long(tiny_model, monkeypatch):
    """A joining group is as wide as its longest prompt and the prefix sits at its left edge,
    so a short prompt's row spans the group's width plus everything it generates: the cache
    must hold that too, across shifts."""
    folder, hf = tiny_model("llama_gqa_tied_llama3")
    rng = random.Random(9)
    prefix = [rng.randrange(2, 256) for _ in range(20)]
    rest = lambda n: [rng.randrange(2, 256) for _ in range(n)]
    prompts = [prefix + rest(40)] + [prefix + rest(rng.randint(1, 3)) for _ in range(6)]
    news = [2, 40, 38, 37, 36, 40, 39]
    expected = [hf_alone(hf, p, n) for p, n in zip(prompts, news)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news]
    monkeypatch.setattr(generation, "REFILL_FRACTION", 0.0)
    shared_calls = count_calls(monkeypatch, attention_module, "_attend_shared")
    got, counter = run_with_refill(LLM(folder, dtype="float32", batch_size=3), prompts, params)
    assert got == expected
    assert max(counter.shared) >= 20 and counter.shifts >= 1
    # with the decode kernel, decode steps attend to the prefix once for the rows holding it
    assert (shared_calls[0] > 0) == (decode_kernel() is not None)


def test_a_new_shared_prefix_while_rows_hold_the_last_one(tiny_model, monkeypatch):
    """Prompts with another shared prefix join while rows of the last one are in flight: the
    runner keeps one prefix's keys and values, and the rows in flight keep seeing theirs."""
    folder, hf = tiny_model("llama_gqa_tied_llama3")
    rng = random.Random(13)
    tokens = lambda n: [rng.randrange(2, 256) for _ in range(n)]
    first, second = tokens(24), tokens(24)
    prompts = [first + tokens(rng.randint(20, 30)) for _ in range(4)] + \
        [second + tokens(rng.randint(1, 10)) for _ in range(4)]  # longer: they join first
    news = [40, 3, 4, 40, 6, 5, 7, 6]
    expected = [hf_alone(hf, p, n) for p, n in zip(prompts, news)]
    monkeypatch.setattr(generation, "REFILL_FRACTION", 0.5)  # two rows free: two join together
    llm = LLM(folder, dtype="float32", batch_size=4)
    got, counter = run_with_refill(llm, prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news])
    assert got == expected
    assert counter.shared.count(24) >= 2, counter.shared  # both prefixes computed once


def count_calls(monkeypatch, module, name: str) -> list[int]:
    calls, original = [0], getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


class ScriptedArrivals:
    """Requests that arrive at given turns of the block (engine.generation.Arrivals): turn n
    is the n-th call of `take`, made each step the block has a free row."""

    def __init__(self, schedule: list[tuple[int, generation.Request]], expect: int = 0):
        self.schedule, self.turn, self.expect = list(schedule), 0, expect
        self.arrived: list[generation.Request] = []
        self.taken: list[generation.Request] = []

    def _arrive(self) -> None:
        while self.schedule and self.schedule[0][0] <= self.turn:
            self.arrived.append(self.schedule.pop(0)[1])

    def waiting(self) -> int:
        self._arrive()
        return len(self.arrived)

    def expected(self) -> int:
        return max(self.waiting(), self.expect)

    def take(self, limit, fits):
        self.turn += 1
        self._arrive()
        out = []
        while self.arrived and len(out) < limit and fits(self.arrived[0]):
            out.append(self.arrived.pop(0))
        self.taken += out
        return out


@pytest.mark.parametrize("offloaded", [False, True])
def test_requests_arriving_during_a_block_join_it_and_get_their_tokens_alone(tiny_model, tmp_path, offloaded,
                                                                              monkeypatch):
    """A server's requests join the block in flight as rows free up: each gets exactly the
    tokens transformers generates for it alone. One with a prompt longer than the clock
    waits for it; one too long for the block's rows is not taken, nor what arrived after it."""
    folder, hf = tiny_model("llama_gqa_tied_llama3")
    rng = random.Random(7)
    prompt = lambda n: [rng.randrange(2, 256) for _ in range(n)]
    first = [(prompt(5), 30), (prompt(12), 3), (prompt(3), 2)]  # the block's rows span 12 + 30 tokens
    arriving = [(0, prompt(4), 5), (2, prompt(20), 6), (3, prompt(2), 4), (4, prompt(10), 40), (5, prompt(3), 3)]
    request = lambda p, n: generation.Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
    arrivals = ScriptedArrivals([(turn, request(p, n)) for turn, p, n in arriving])
    monkeypatch.setattr(generation, "REFILL_FRACTION", 0.0)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_device=0, weights_host=0, cache_device=0.5,
                    cache_host=0) if offloaded else None
    with LLM(folder, dtype="float32", batch_size=4, policy=policy, offload_dir=tmp_path) as llm:
        counter = llm.runner = CountingRunner(llm.runner)
        begins = []
        monkeypatch.setattr(counter, "begin", lambda *a: (begins.append(a), counter.inner.begin(*a)))
        outputs = llm.generate_ids([p for p, _ in first], [request(p, n).params for p, n in first],
                                   arrivals=arrivals)
    joined = [(r.token_ids, r.params.max_new_tokens) for r in arrivals.taken]
    assert joined == [(p, n) for _, p, n in arriving[:3]]  # 40 + 10 tokens do not fit; the last waits behind
    assert len(begins) == 1 and begins[0][0] == 4  # one block: the call's 3 requests and the one waiting
    assert [o.prompt_token_ids for o in outputs] == [p for p, _ in first + joined]
    assert [o.token_ids for o in outputs] == [hf_alone(hf, p, n) for p, n in first + joined]


def test_arrivals_sharing_a_prefix_never_outgrow_the_rows(tiny_model, monkeypatch):
    """Two arrivals that each fit the block's rows and share a 20-token prefix join together:
    computed as one shared prefix, the short prompt would start where the long one does and
    need 38 + 23 slots of the block's 53. They must still get transformers' tokens alone."""
    folder, hf = tiny_model("llama_gqa_tied_llama3")
    rng = random.Random(11)
    prompt = lambda n: [rng.randrange(2, 256) for _ in range(n)]
    request = lambda p, n: generation.Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
    prefix = prompt(20)
    first = [(prompt(5), 40)]  # the block's rows span 45 tokens
    arriving = [(prefix + prompt(18), 7), (prefix + prompt(2), 23)]  # 45 and 45
    arrivals = ScriptedArrivals([(40, request(p, n)) for p, n in arriving], expect=2)
    monkeypatch.setattr(generation, "REFILL_FRACTION", 0.0)
    llm = LLM(folder, dtype="float32", batch_size=4)
    counter = llm.runner = CountingRunner(llm.runner)
    outputs = llm.generate_ids([p for p, _ in first], [request(p, n).params for p, n in first], arrivals=arrivals)
    assert len(arrivals.taken) == 2 and counter.admits == 2  # the two joined together, after the first
    assert [o.token_ids for o in outputs] == [hf_alone(hf, p, n) for p, n in first + arriving]
