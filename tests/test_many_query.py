"""The many-query attention kernel (kernels/prefill_attention.c): prompts' attention and a
decode step's shared prefix in bf16, against attention computed by hand in float64, alone
and where the engine calls it (kernels/attention.py): visible keys only, GQA groups, masks
per sequence or shared, strided keys, each query's log-sum-exp."""
from __future__ import annotations

import pytest
import torch

from flexbatch.kernels import AttentionStep, SharedKeys, build_decode_kernel, cached_attention
from flexbatch.models import ops

BF16 = torch.bfloat16
HIDE = torch.finfo(BF16).min
# the output is rounded to bf16 and the probabilities too before they weigh the values (as
# PyTorch's CPU flash attention does): about 3 significant digits of values of size ~1
TOLERANCE = 2e-2


def _cpu_has_bf16_dot() -> bool:
    with open("/proc/cpuinfo") as f:
        return " avx512_bf16 " in next((line for line in f if line.startswith("flags")), "") + " "


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    kernel = build_decode_kernel(tmp_path_factory.mktemp("native")) if _cpu_has_bf16_dot() else None
    if kernel is None or kernel.many is None:
        if _cpu_has_bf16_dot():  # a CPU with the instructions: the kernel must be there
            assert kernel is not None and kernel.many is not None
        pytest.skip("no AVX512-BF16 on this CPU: PyTorch's attention runs instead")
    return kernel


def by_hand(q, keys, values, mask, scale):
    """q [B, H, S, D], keys/values [B, Hkv, T, D], mask [B or 1, 1, S, T] or None ->
    (output, log-sum-exp of scores) in float64."""
    group = q.shape[1] // keys.shape[1]
    k, v = (x.double().repeat_interleave(group, 1) for x in (keys, values))
    scores = q.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.double()
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def causal_left_padded(lengths: list[int], width: int, prefix: int) -> torch.Tensor:
    """The engine's mask for prompts of `lengths` tokens left-padded to `width`, after `prefix`
    keys every row sees: [B, 1, width, prefix + width]."""
    valid = torch.zeros(len(lengths), prefix + width, dtype=torch.bool)
    valid[:, :prefix] = True
    for b, n in enumerate(lengths):
        valid[b, prefix + width - n:] = True
    return ops.attention_mask(valid, prefix, BF16, None)


CASES = [  # batch, heads, kv heads, queries, keys before them, head dim, masked
    (3, 9, 3, 21, 16, 64, True),    # GQA, 37 keys: odd blocks, padding rows, query rows not a multiple of 4
    (2, 4, 4, 33, 0, 128, True),    # a prompt alone, head dim 128
    (1, 3, 3, 70, 405, 64, False),  # a shared prefix's queries: no mask
]


@pytest.mark.parametrize("batch,heads,kv_heads,queries,before,dim,masked", CASES)
def test_many_query_attention_is_attention(kernel, batch, heads, kv_heads, queries, before, dim, masked):
    gen = torch.Generator().manual_seed(queries)
    q = torch.randn(batch, heads, queries, dim, generator=gen).to(BF16)
    # token-major keys and values, as a cache's views are: strided, head dim contiguous
    keys, values = (torch.randn(before + queries, batch, kv_heads, dim, generator=gen).to(BF16).permute(1, 2, 0, 3)
                    for _ in range(2))
    lengths = [queries - 5 * b for b in range(batch)]
    mask = causal_left_padded(lengths, queries, before) if masked else None
    out, lse = kernel.many(q, keys, values, mask, dim ** -0.5, lse=True)
    want, want_lse = by_hand(q, keys, values, mask, dim ** -0.5)
    assert out.dtype == BF16 and out.shape == q.shape
    assert (out.double() - want).abs().max() < TOLERANCE
    assert torch.allclose(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_a_shared_prefix_is_read_from_its_own_keys(kernel):
    """Sequences whose first 23 positions are a prefix they share: given its keys and values
    apart, the kernel reads those instead of the sequences' slots, which hold NaN here."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, kv_heads, dim, prefix, queries = 3, 6, 2, 64, 23, 18
    shared_k, shared_v = (torch.randn(kv_heads, prefix, dim, generator=gen).to(BF16) for _ in range(2))
    q = torch.randn(batch, heads, queries, dim, generator=gen).to(BF16)
    keys, values = (torch.randn(batch, kv_heads, prefix + queries, dim, generator=gen).to(BF16) for _ in range(2))
    whole_k, whole_v = keys.clone(), values.clone()
    whole_k[:, :, :prefix], whole_v[:, :, :prefix] = shared_k, shared_v
    keys[:, :, :prefix], values[:, :, :prefix] = float("nan"), float("nan")
    mask = causal_left_padded([queries, queries - 4, 1], queries, prefix)
    out, lse = kernel.many(q, keys, values, mask, dim ** -0.5, lse=True, prefix=(shared_k, shared_v))
    want, want_lse = by_hand(q, whole_k, whole_v, mask, dim ** -0.5)
    assert (out.double() - want).abs().max() < TOLERANCE
    assert torch.allclose(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_a_query_that_sees_one_key_gets_its_value(kernel):
    q = torch.randn(1, 2, 16, 64).to(BF16)
    keys, values = torch.randn(2, 1, 2, 40, 64).to(BF16)
    mask = torch.full((1, 1, 16, 40), HIDE, dtype=BF16)
    for s in range(16):
        mask[0, 0, s, 3 + 2 * s] = 0  # each query sees one key, a different one
    out, _ = kernel.many(q, keys, values, mask, 0.125)
    assert torch.equal(out[0, :, :], values[0, :, 3:35:2].expand(2, 16, 64))


def test_what_it_does_not_take_goes_to_pytorch(kernel):
    q, keys = torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64)
    assert kernel.many(q, keys, keys, None, 0.125) is None  # fp32
    q80, keys80 = torch.randn(1, 2, 8, 80).to(BF16), torch.randn(1, 2, 8, 80).to(BF16)
    assert kernel.many(q80, keys80, keys80, None, 0.125) is None  # head dim not a multiple of 64


def test_a_prompts_attention_over_its_cache_uses_it(kernel, monkeypatch):
    """cached_attention of a prefill step appended after cached keys, with left padding (the
    first slots no query sees are skipped): the kernel computes it, as by hand."""
    calls = []
    original = type(kernel.many).__call__
    monkeypatch.setattr(type(kernel.many), "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    gen = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, dim, start, new = 2, 6, 2, 64, 12, 10
    cache = [torch.randn(batch, kv_heads, 32, dim, generator=gen).to(BF16) for _ in range(2)]
    q = torch.randn(batch, heads, new, dim, generator=gen).to(BF16)
    k_new, v_new = (torch.randn(batch, kv_heads, new, dim, generator=gen).to(BF16) for _ in range(2))
    valid = torch.ones(batch, start + new, dtype=torch.bool)
    valid[:, :4] = False  # slots no query sees: skipped as the step's `first`
    valid[1, 4:9] = False
    mask = ops.attention_mask(valid, start, BF16, None)
    step = AttentionStep(start=start, mask=mask, scale=dim ** -0.5, first=4, decode=kernel)
    out = cached_attention(q, k_new, v_new, cache[0], cache[1], step)
    keys, values = cache[0][:, :, :start + new], cache[1][:, :, :start + new]
    assert torch.equal(keys[:, :, start:], k_new)
    want, _ = by_hand(q, keys, values, mask, dim ** -0.5)
    assert calls and (out.double() - want).abs().max() < TOLERANCE


def test_a_decode_steps_shared_prefix_uses_it(kernel):
    """A decode step whose rows all read a shared prefix: the prefix through this kernel, the
    rest of each row through the decode kernel, merged: attention over both, by hand."""
    gen = torch.Generator().manual_seed(2)
    rows, heads, kv_heads, dim, prefix, own = 5, 6, 2, 64, 40, 9
    shared_k, shared_v = (torch.randn(kv_heads, prefix, dim, generator=gen).to(BF16) for _ in range(2))
    cache = [torch.randn(rows, kv_heads, own + 1, dim, generator=gen).to(BF16) for _ in range(2)]
    q = torch.randn(rows, heads, 1, dim, generator=gen).to(BF16)
    k_new, v_new = (torch.randn(rows, kv_heads, 1, dim, generator=gen).to(BF16) for _ in range(2))
    mask = torch.zeros(rows, 1, 1, own + 1, dtype=BF16)
    shared = SharedKeys(shared_k, shared_v, torch.ones(rows, dtype=torch.bool), mask)
    step = AttentionStep(start=own, mask=mask, scale=dim ** -0.5, decode=kernel, rows=torch.arange(rows), shared=shared)
    out = cached_attention(q, k_new, v_new, cache[0], cache[1], step)
    keys = torch.cat([shared_k.expand(rows, -1, -1, -1), cache[0]], 2)
    values = torch.cat([shared_v.expand(rows, -1, -1, -1), cache[1]], 2)
    want, _ = by_hand(q, keys, values, None, dim ** -0.5)
    assert (out.double() - want).abs().max() < TOLERANCE


def test_rows_that_hold_no_copy_of_their_prefix_generate_what_copies_give(kernel, default_model_store, monkeypatch):
    """The default model in bf16 (head dim 64): requests of two 30-token prefixes join a
    refilling block, the second while rows of the first are in flight. Rows that hold no copy
    of their prefix (admissions read it apart through this kernel, decode steps attend to it
    once, and a prefix that another replaces is copied into its rows then) give the tokens
    and log-probabilities of rows that hold copies, exactly."""
    from flexbatch import LLM, SamplingParams
    from flexbatch.engine import generation
    from flexbatch.engine.runner import InMemoryRunner

    rng = torch.Generator().manual_seed(5)
    tokens = lambda n: torch.randint(100, 20000, (n,), generator=rng).tolist()
    first, second = tokens(30), tokens(30)
    # longer first: they join first, and the second prefix's join as rows of the first finish
    prompts = [first + tokens(20 + 2 * i) for i in range(4)] + [second + tokens(1 + i) for i in range(4)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=True) for n in (24, 3, 4, 24, 6, 5, 7, 6)]
    monkeypatch.setattr(generation, "REFILL_FRACTION", 0.5)

    def run(skip: bool):
        monkeypatch.setattr(InMemoryRunner, "_rows_skip_prefix", lambda self: skip)
        llm = LLM(default_model_store, dtype="bfloat16", batch_size=4)
        copied = []
        original = InMemoryRunner._copy_prefix_into_rows
        monkeypatch.setattr(InMemoryRunner, "_copy_prefix_into_rows",
                            lambda self: copied.append(1) or original(self))
        outs = llm.generate(prompts, params)
        return [(o.token_ids, o.logprobs) for o in outs], copied

    apart, copied = run(True)
    assert copied, "the first prefix must be copied into its rows when the second replaces it"
    assert apart == run(False)[0]


def test_prompts_one_token_past_a_prefix_they_hold_no_copy_of(kernel, default_model_store, monkeypatch):
    """Two copies of one chat prompt share all but its last token: their admission computes
    one query each, as decode steps do, over the prefix apart and the rest of their rows
    (whose prefix slots were never written). Its log-probabilities are those of rows that
    hold copies, up to bf16 rounding (the prefix's part is rounded to bf16 before the merge)."""
    from flexbatch import LLM, SamplingParams
    from flexbatch.engine.runner import InMemoryRunner

    ask = [{"role": "user", "content": "Give Ada Lovelace's name and birth year as JSON."}]
    params = SamplingParams(max_new_tokens=4, logprobs=True)

    def first_steps(skip: bool):
        monkeypatch.setattr(InMemoryRunner, "_rows_skip_prefix", lambda self: skip)
        return LLM(default_model_store, dtype="bfloat16").chat([ask, ask], [params, params])

    apart, copies = first_steps(True), first_steps(False)
    for a, c in zip(apart, copies):
        assert all(abs(x) < 50 for x in a.logprobs)  # finite: no unwritten slot was read
        assert a.token_ids[0] == c.token_ids[0] and abs(a.logprobs[0] - c.logprobs[0]) < 0.2
