"""Decode attention (`kernels.grouped_attention`) against torch's SDPA in fp32, for every way the
engine hands it a cache: contiguous, a slice of a longer cache, a strided view of token-major
disk rows; with GQA, padding, and the sequences split into groups or not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexbatch import kernels
from flexbatch.models import ops


def _layouts(batch, kv_heads, length, dim, capacity):
    g = torch.Generator().manual_seed(3)
    sliced = torch.randn(batch, kv_heads, capacity, dim, generator=g)[:, :, :length]
    token_major = torch.randn(capacity, batch, kv_heads, dim, generator=g).permute(1, 2, 0, 3)[:, :, :length]
    return {"contiguous": sliced.contiguous(), "sliced": sliced, "token_major": token_major}


@pytest.mark.parametrize("layout", ["contiguous", "sliced", "token_major"])
@pytest.mark.parametrize("chunk_bytes", [1, 3000, 1 << 30], ids=["per-sequence", "groups", "whole"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_grouped_attention_matches_sdpa(monkeypatch, layout, chunk_bytes, heads, kv_heads):
    monkeypatch.setattr(kernels.attention, "ATTENTION_CHUNK_BYTES", chunk_bytes)
    batch, length, dim = 5, 9, 8
    keys = _layouts(batch, kv_heads, length, dim, 12)[layout]
    values = _layouts(batch, kv_heads, length, dim, 12)[layout].flip(-1)
    q = torch.randn(batch, heads, 1, dim, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(batch, 1, 1, length)
    mask[1, ..., :4] = torch.finfo(mask.dtype).min  # a left-padded sequence
    expected = F.scaled_dot_product_attention(q, keys.contiguous(), values.contiguous(), attn_mask=mask,
                                              scale=0.3, enable_gqa=heads != kv_heads)
    got = kernels.grouped_attention(q, keys, values, mask, 0.3)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_a_rotated_cache_gives_the_same_attention(heads, kv_heads):
    """A compressed cache holds K R and V R; attention through it equals plain attention."""
    from flexbatch.kernels.attention import orthonormal

    g = torch.Generator().manual_seed(5)
    batch, dim, prompt = 3, 16, 6
    valid = torch.ones(batch, prompt + 2, dtype=torch.bool)
    valid[0, :2] = False  # left padding
    caches = {name: [torch.zeros(batch, kv_heads, prompt + 2, dim) for _ in range(2)] for name in ("plain", "rotated")}
    rotation = orthonormal(dim)
    for start, width in ((0, prompt), (prompt, 1), (prompt + 1, 1)):  # prefill, then two decode steps
        q = torch.randn(batch, heads, width, dim, generator=g)
        k, v = (torch.randn(batch, kv_heads, width, dim, generator=g) for _ in range(2))
        mask = ops.attention_mask(valid[:, :start + width], start, torch.float32)
        outs = {}
        for name, kv_rotation in (("plain", None), ("rotated", rotation)):
            ctx = ops.StepContext(positions=torch.zeros(batch, width, dtype=torch.long), start=start,
                                  attn_mask=mask, kv_rotation=kv_rotation)
            outs[name] = ops.cached_attention(q, k, v, *caches[name], ctx)
        assert torch.allclose(outs["rotated"], outs["plain"], atol=1e-5)
    # the rotated cache really is rotated: K R, not K
    assert torch.allclose(caches["rotated"][0], caches["plain"][0] @ rotation, atol=1e-5)


@pytest.mark.parametrize("sizes", [(1, 2), (2, 1), (1, 1, 1)])
def test_attention_over_cache_segments_equals_one_cache(sizes):
    """A cache split by sequence into segments (one per tier) attends like one tensor, for a
    prompt and for decode steps, and each segment ends up holding its own sequences' keys."""
    g = torch.Generator().manual_seed(6)
    batch, heads, kv_heads, dim, prompt = sum(sizes), 6, 2, 8, 5
    valid = torch.ones(batch, prompt + 2, dtype=torch.bool)
    valid[-1, :3] = False
    whole = [torch.zeros(batch, kv_heads, prompt + 2, dim) for _ in range(2)]
    split = [kernels.CacheSegments([torch.zeros(n, kv_heads, prompt + 2, dim) for n in sizes]) for _ in range(2)]
    for start, width in ((0, prompt), (prompt, 1), (prompt + 1, 1)):
        q = torch.randn(batch, heads, width, dim, generator=g)
        k, v = (torch.randn(batch, kv_heads, width, dim, generator=g) for _ in range(2))
        ctx = ops.StepContext(positions=torch.zeros(batch, width, dtype=torch.long), start=start,
                              attn_mask=ops.attention_mask(valid[:, :start + width], start, torch.float32))
        expected = ops.cached_attention(q, k, v, *whole, ctx)
        assert torch.allclose(ops.cached_attention(q, k, v, *split, ctx), expected, atol=1e-6)
    assert torch.equal(torch.cat(split[0].parts), whole[0])
