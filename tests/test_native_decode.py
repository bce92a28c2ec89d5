"""The C decode kernels: attention (kernels/decode_attention.c) against attention computed by
hand in float64: visible keys only, GQA groups, soft-capping, caches with any strides, and
only the cache rows named; the new keys and values land in their rows' last slot. The greedy
pick (kernels/greedy.c) against argmax and log_softmax."""
from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from flexbatch.kernels import NativeBuildError, build_decode_kernel


def _cpu_has_avx512() -> bool:
    with open("/proc/cpuinfo") as f:
        return "avx512f" in next((line for line in f if line.startswith("flags")), "").split()


def _machine_can_build() -> bool:
    return _cpu_has_avx512() and shutil.which("cc") is not None


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    try:
        return build_decode_kernel(tmp_path_factory.mktemp("native"))
    except NativeBuildError:
        if _machine_can_build():  # a C compiler and AVX-512: the build must work, never skip here
            raise
        pytest.skip("no C compiler or no AVX-512 on this machine: PyTorch's attention runs instead")


def by_hand(q, keys, values, mask, scale, softcap):
    """q [H, D], keys/values [Hkv, T, D], mask [T] additive -> [H, D], in float64."""
    heads, kv_heads = q.shape[0], keys.shape[0]
    group = heads // kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(heads):
        k, v = keys[h // group].double(), values[h // group].double()
        scores = k @ q[h].double() * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        visible = mask > torch.finfo(mask.dtype).min / 2
        probs = torch.softmax(scores[visible] + mask[visible].double(), 0)
        out[h] = probs @ v[visible]
    return out


CASES = [  # dtype, heads, kv heads, head dim, softcap, token-major cache
    (torch.float32, 4, 4, 16, None, False),
    (torch.float32, 6, 2, 80, 50.0, True),
    (torch.bfloat16, 9, 3, 64, None, False),
    (torch.bfloat16, 8, 1, 128, None, True),
    (torch.float16, 4, 2, 32, 30.0, False),
]


@pytest.mark.parametrize("dtype,heads,kv_heads,dim,softcap,token_major", CASES)
def test_decode_attention_reads_what_each_query_sees(kernel, dtype, heads, kv_heads, dim, softcap, token_major):
    gen = torch.Generator().manual_seed(dim)
    cache_rows, capacity, end = 7, 40, 37  # 37 keys: two 16-wide chunks and a tail
    if token_major:  # the layout of cache rows offloaded token by token: [slot, row, head, dim]
        k_cache = torch.randn(capacity, cache_rows, kv_heads, dim, generator=gen).to(dtype).permute(1, 2, 0, 3)
        v_cache = torch.randn(capacity, cache_rows, kv_heads, dim, generator=gen).to(dtype).permute(1, 2, 0, 3)
    else:
        k_cache = torch.randn(cache_rows, kv_heads, capacity, dim, generator=gen).to(dtype)
        v_cache = torch.randn(cache_rows, kv_heads, capacity, dim, generator=gen).to(dtype)
    if dtype != torch.float32:  # a hidden slot may hold anything (uninitialised memory): NaN never leaks
        k_cache[5, :, 2] = float("nan")
        v_cache[0, :, 3] = float("nan")
    untouched = (k_cache.clone(), v_cache.clone())
    rows = torch.tensor([5, 0, 3, 6])  # in any order; rows 1, 2 and 4 are not computed
    n = len(rows)
    q = torch.randn(n, heads, 1, dim, generator=gen).to(dtype)
    k_new, v_new = (torch.randn(n, kv_heads, 1, dim, generator=gen).to(dtype) for _ in range(2))
    visible = torch.rand(n, end, generator=gen) < 0.6
    visible[:, :5] = False  # left padding
    visible[3, :] = False  # a row that sees only its own new token
    visible[:, end - 1] = True
    mask = torch.zeros(n, 1, 1, end, dtype=dtype).masked_fill(~visible.view(n, 1, 1, end), torch.finfo(dtype).min)
    mask[0, 0, 0, 10] = -1.5  # an additive bias that is not a hidden key
    scale = dim ** -0.5

    out = kernel(q, k_new, v_new, k_cache, v_cache, rows, mask, end, scale, softcap)

    expected_k, expected_v = untouched[0].clone(), untouched[1].clone()
    expected_k[rows, :, end - 1] = k_new[:, :, 0]
    expected_v[rows, :, end - 1] = v_new[:, :, 0]
    assert torch.equal(k_cache.nan_to_num(), expected_k.nan_to_num())
    assert torch.equal(v_cache.nan_to_num(), expected_v.nan_to_num())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for i, row in enumerate(rows.tolist()):
        want = by_hand(q[i, :, 0], expected_k[row, :, :end], expected_v[row, :, :end], mask[i, 0, 0], scale, softcap)
        assert out.dtype == dtype and out.shape == (n, heads, 1, dim)
        torch.testing.assert_close(out[i, :, 0].double(), want, atol=tolerance, rtol=tolerance)
    only_itself = expected_v[rows[3], :, end - 1].double().repeat_interleave(heads // kv_heads, 0)
    torch.testing.assert_close(out[3, :, 0].double(), only_itself, atol=tolerance, rtol=tolerance)


def test_without_rows_sequence_i_is_cache_row_i(kernel):
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = (torch.randn(3, 2, 20, 32, generator=gen) for _ in range(2))
    q = torch.randn(3, 4, 1, 32, generator=gen)
    k_new, v_new = (torch.randn(3, 2, 1, 32, generator=gen) for _ in range(2))
    mask = torch.zeros(3, 1, 1, 17)
    named = (k_cache.clone(), v_cache.clone())
    out = kernel(q, k_new, v_new, *named, torch.arange(3), mask, 17, 0.2)
    assert torch.equal(kernel(q, k_new, v_new, k_cache, v_cache, None, mask, 17, 0.2), out)
    assert torch.equal(k_cache, named[0]) and torch.equal(v_cache, named[1])


def test_a_head_dim_the_kernel_cannot_take_is_left_to_pytorch(kernel):
    assert kernel.handles(torch.device("cpu"), torch.bfloat16, 64)
    assert not kernel.handles(torch.device("cpu"), torch.bfloat16, 72)  # not a multiple of 16
    assert not kernel.handles(torch.device("cpu"), torch.float64, 64)
    assert not kernel.handles(torch.device("meta"), torch.float32, 64)


def test_a_kernel_that_cannot_be_built_leaves_decoding_to_pytorch_with_a_warning(tmp_path, monkeypatch, capsys):
    from flexbatch.model_policy import decode_kernel

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    # what comes first: a CPU without AVX-512, then a missing compiler, then the folder
    reason = "AVX-512" if not _cpu_has_avx512() else "not-a-folder" if shutil.which("cc") else "could not run"
    with pytest.raises(NativeBuildError, match=reason):
        build_decode_kernel(blocker / "native")
    monkeypatch.setenv("FLEXBATCH_CACHE", str(blocker))  # the cache folder cannot be created
    assert decode_kernel() is None
    warning = capsys.readouterr().err
    assert reason in warning and "FLEXBATCH_NATIVE_KERNELS=0" in warning


def test_greedy_pick_is_the_first_maximum_and_its_log_softmax(kernel):
    torch.manual_seed(0)
    logits = torch.randn(40, 1000) * 4
    logits[3, 100] = logits[3, 900] = logits[3].max() + 1  # a tie: the first index wins, as argmax says
    logits[7] = float("-inf")  # every token but one masked
    logits[7, 5] = -2.0
    logits[9, 999] = 50.0  # the maximum in the last vector
    # a vocabulary that is not a multiple of 16, rows strided; logits as a bf16 or fp16 model
    # computes them, read as their `.float()`
    views = [logits, logits[:, :993], logits.bfloat16(), logits.half()[:, :993]]
    for view in views:
        tokens, logprobs = kernel.greedy(view)
        assert torch.equal(tokens, view.float().argmax(-1))
        expected = torch.log_softmax(view.double(), -1).gather(1, tokens.unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(logprobs.double(), expected, rtol=1e-5, atol=1e-5)
        assert tokens[3] == 100 and tokens[7] == 5 and logprobs[7] == 0.0


def test_greedy_pick_leaves_a_nan_to_pytorch(kernel):
    logits = torch.zeros(4, 64)
    logits[2, 17] = float("nan")
    assert kernel.greedy(logits) is None and kernel.greedy(logits.bfloat16()) is None


@pytest.fixture
def pytorch_then_fused(kernel):
    """f(op, *args) -> (PyTorch's result, the fused kernel's), restoring the switch after."""
    from flexbatch.kernels import fused

    before = fused._active

    def both(op, *args):
        fused.use(None)
        expected = op(*[a.clone() for a in args])
        fused.use(kernel.fused)
        return expected, op(*[a.clone() for a in args])

    yield both
    fused.use(before)


def _agree(expected, got, dtype):
    """fp32 within rounding; bf16 rounded where PyTorch rounds, so nearly every element identical."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
        assert (got != expected).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_elementwise_kernels_equal_pytorchs_operations(pytorch_then_fused, dtype):
    from flexbatch.models import ops

    torch.manual_seed(0)
    x = (torch.randn(3, 50, 100) * 2).to(dtype)[:, 5:45]  # rows at a stride, 100 not a multiple of 16
    weight = (torch.randn(100) * 0.3 + 1).to(dtype)
    for unit_offset in (False, True):
        _agree(*pytorch_then_fused(lambda a, w: ops.rms_norm(a, w, 1e-5, unit_offset), x, weight), dtype)
    q = torch.randn(2, 9, 4, 40).to(dtype).transpose(1, 2)  # [B, H, S, D] as split_heads views it
    for rotary_dim in (40, 24):  # all of the head dim, and a part of it (Phi-3)
        cos, sin = (torch.randn(2, 9, rotary_dim).to(dtype) for _ in range(2))
        _agree(*pytorch_then_fused(ops.apply_rotary, q, cos, sin), dtype)
    gate, up = (torch.randn(33, 70) * 3).to(dtype), torch.randn(33, 70).to(dtype)
    _agree(*pytorch_then_fused(ops.silu_times, gate, up), dtype)


@pytest.mark.parametrize("head_dim,group", [(64, 64), (48, 24), (12, 6)])  # one, two, a part of a vector
def test_kv_cache_rows_decoded_by_the_kernel_are_pytorchs_bits(pytorch_then_fused, head_dim, group):
    """A 4-bit KV cache block decoded by dequantize_rows equals dequantize_into's torch ops
    bit for bit (groups shorter than a vector, tails shorter than 16 bytes, outlier channels)."""
    from flexbatch.kernels import fused
    from flexbatch.kernels.quant import QuantConfig
    from flexbatch.storage.kv_rows import RowCodec

    torch.manual_seed(1)
    codec = RowCodec(3, 5, head_dim, torch.bfloat16, QuantConfig(4, group))
    assert codec.quant.group_size == group
    tokens = torch.randn(11, 3, 5, head_dim) * torch.rand(head_dim) * 8  # [T, n, Hkv, D], channels of all scales
    rows = codec.encode_rows(tokens.to(torch.bfloat16))
    decode = lambda packed, out: codec.decode_rows_into(packed, out)
    expected, got = pytorch_then_fused(decode, rows, torch.empty(11, 3, 5, head_dim, dtype=torch.bfloat16))
    assert torch.equal(got, expected)
    assert (expected.float() - tokens).abs().max() < tokens.abs().max() / 8  # a real decode, not zeros
    groups, direct = 3 * 5 * head_dim // group, torch.empty_like(got)
    assert fused.dequantize_rows(rows, direct, groups, group) and torch.equal(direct, expected)  # the kernel ran
    fused.use(None)
    assert not fused.dequantize_rows(rows, direct, groups, group)  # off: PyTorch's ops run


def test_fused_kernels_leave_what_they_do_not_take_to_pytorch(kernel):
    from flexbatch.kernels import fused

    before = fused._active
    fused.use(kernel.fused)
    try:
        half = torch.randn(4, 32, dtype=torch.float16)
        assert fused.rms_norm(half, torch.ones(32, dtype=torch.float16), 1e-5, False) is None
        strided = torch.randn(4, 64)[:, ::2]  # elements at a stride
        assert fused.rms_norm(strided, torch.ones(32), 1e-5, False) is None
        q, table = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8)
        assert fused.rotary(q, table[:, :, :6].clone(), table) is None  # cos and sin disagree
        assert fused.silu_times(torch.randn(4, 8), torch.randn(4, 4)) is None
    finally:
        fused.use(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_keys_attended_once_equal_each_rows_copy(kernel, dtype):
    """Rows holding copies of one prefix's keys and values at different slots: attending to the
    prefix once for all of them (a matrix product per KV head) and to the rest of each row
    with the kernel, merged by log-sum-exp, gives the attention over each whole row."""
    from flexbatch.kernels import AttentionStep, SharedKeys, cached_attention

    gen = torch.Generator().manual_seed(3)
    rows, heads, kv_heads, dim, capacity, prefix, end = 6, 6, 2, 32, 48, 20, 44
    k_cache, v_cache = (torch.randn(rows, kv_heads, capacity, dim, generator=gen).to(dtype) for _ in range(2))
    shared_k, shared_v = (torch.randn(kv_heads, prefix, dim, generator=gen).to(dtype) for _ in range(2))
    at = torch.tensor([3, 10, 0, 5, 12, 7])  # where each row's copy starts
    readers = torch.tensor([True, True, False, True, True, True])  # row 2 holds other keys there
    visible = torch.rand(rows, end, generator=gen) < 0.7
    for r in range(rows):
        visible[r, :at[r]] = False  # left padding
        visible[r, at[r]:at[r] + prefix] = True
        if readers[r]:
            k_cache[r, :, at[r]:at[r] + prefix], v_cache[r, :, at[r]:at[r] + prefix] = shared_k, shared_v
    visible[:, end - 1] = True
    mask = torch.zeros(rows, 1, 1, end, dtype=dtype).masked_fill(~visible.view(rows, 1, 1, end),
                                                                  torch.finfo(dtype).min)
    copies = torch.zeros(rows, end, dtype=torch.bool)
    for r in range(rows):
        copies[r, at[r]:at[r] + prefix] = readers[r]
    own_mask = mask.masked_fill(copies.view(rows, 1, 1, end), torch.finfo(dtype).min)
    q = torch.randn(rows, heads, 1, dim, generator=gen).to(dtype)
    k_new, v_new = (torch.randn(rows, kv_heads, 1, dim, generator=gen).to(dtype) for _ in range(2))
    plain = AttentionStep(end - 1, mask, dim ** -0.5, decode=kernel)
    expected = cached_attention(q, k_new, v_new, k_cache.clone(), v_cache.clone(), plain)
    step = replace(plain, shared=SharedKeys(shared_k, shared_v, readers, own_mask))
    got = cached_attention(q, k_new, v_new, k_cache, v_cache, step)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), expected.double(), atol=tolerance, rtol=tolerance)
