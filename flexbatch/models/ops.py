"""Shared tensor operations: norms, rotary embeddings, attention masks and attention.

Shapes in comments: B batch, S new tokens this step, T keys (cache length after this step),
H query heads, Hkv key/value heads, D head dim, C hidden size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..storage.packed_linear import PackedLinear
from ..storage.packed_linear import linear as packed_linear
from .spec import RopeConfig


@dataclass
class StepContext:
    """What every layer of one forward step shares: positions, mask, rotary tables.

    The KV cache holds `start` tokens before this step; the step appends S tokens at
    `start`, so attention covers keys [0, start + S).
    """

    positions: torch.Tensor  # [B, S] int64, position of each new token (0 for padding)
    start: int
    attn_mask: torch.Tensor  # [B, 1, S, T] additive, compute dtype
    cos: torch.Tensor | None = None  # [B, S, D] rotary tables (Llama family)
    sin: torch.Tensor | None = None
    attn_keep: float = 1.0  # decode attends to this top fraction of keys per query (sparse attention)
    # [D, D] orthonormal, compute dtype: the KV cache holds keys and values times it (a
    # compressed cache; see storage/kv_rows.py). None: the cache holds them as computed.
    kv_rotation: torch.Tensor | None = None

    @property
    def num_new(self) -> int:
        return self.positions.shape[1]


@dataclass
class CacheSegments:
    """The K (or V) cache of one GPU batch split by sequence into consecutive groups that
    may live on different devices, [n_i, Hkv, capacity, D] each. Attention runs over each
    group on its own device (the paper's CPU attention delegation, when a GPU computes and
    part of the cache is in host RAM): only queries, new keys and values, and outputs move."""

    parts: list[torch.Tensor]


def attention_mask(key_valid: torch.Tensor, start: int, dtype: torch.dtype,
                   sliding_window: int | None = None) -> torch.Tensor:
    """Additive causal + padding mask for queries at slots [start, T) over keys [0, T).

    key_valid: [B, T] bool, False at left padding. A padding query may attend to itself, so no
    row is fully masked (a fully masked row would give NaN that could leak into the cache).
    """
    num_keys = key_valid.shape[1]
    q_idx = torch.arange(start, num_keys).unsqueeze(1)  # [S, 1]
    k_idx = torch.arange(num_keys).unsqueeze(0)  # [1, T]
    allowed = (k_idx <= q_idx).unsqueeze(0) & key_valid.unsqueeze(1)  # [B, S, T]
    if sliding_window is not None:
        allowed &= (q_idx - k_idx < sliding_window).unsqueeze(0)
    allowed |= (k_idx == q_idx).unsqueeze(0)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def positions_from_mask(key_valid: torch.Tensor, start: int) -> torch.Tensor:
    """Position of each token counted over valid tokens only (left padding -> 0)."""
    pos = key_valid.long().cumsum(-1) - 1
    pos.clamp_(min=0)
    return pos[:, start:]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32, as the reference implementation does, then cast back.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, for a dense weight or a compressed `PackedLinear`."""
    if isinstance(weight, PackedLinear):
        return packed_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32, including linear and Llama 3 scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def rotary_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin [B, S, D] for the half-split rotary layout used by HF Llama checkpoints."""
    freqs = positions.unsqueeze(-1).float() * inv_freq  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, S, D]; cos/sin: [B, S, D]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    # [B, S, heads*D] -> [B, heads, S, D]
    b, s, _ = x.shape
    return x.view(b, s, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    # [B, heads, S, D] -> [B, S, heads*D]
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def cached_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: StepContext,
                     scale: float | None = None) -> torch.Tensor:
    """Write this step's keys/values into the cache, then attend over [0, start + S).

    q: [B, H, S, D]; k_new, v_new: [B, Hkv, S, D]; caches: [B, Hkv, capacity, D].
    Returns [B, H, S, D]. With ctx.kv_rotation R the cache holds K R and V R; queries are
    rotated to match and the output rotated back (R is orthonormal, so nothing changes but
    rounding).
    """
    rotation = ctx.kv_rotation
    if rotation is not None:
        q, k_new, v_new = q @ rotation, k_new @ rotation, v_new @ rotation
    out = _attend_cache(q, k_new, v_new, k_cache, v_cache, ctx, scale)
    return out if rotation is None else out @ rotation.T


def _attend_cache(q, k_new, v_new, k_cache, v_cache, ctx: StepContext, scale: float | None) -> torch.Tensor:
    if isinstance(k_cache, CacheSegments):
        return _attend_segments(q, k_new, v_new, k_cache, v_cache, ctx, scale)
    end = ctx.start + ctx.num_new
    k_cache[:, :, ctx.start:end] = k_new
    v_cache[:, :, ctx.start:end] = v_new
    keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if ctx.num_new == 1:
        # torch's CPU SDPA is ~10x slower than two matmuls for one query token in bf16.
        return grouped_attention(q, keys, values, ctx.attn_mask, scale, ctx.attn_keep)
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=ctx.attn_mask, scale=scale,
        enable_gqa=q.shape[1] != keys.shape[1],
    )


def _attend_segments(q, k_new, v_new, k_cache: CacheSegments, v_cache: CacheSegments, ctx: StepContext,
                     scale: float | None) -> torch.Tensor:
    out, first = torch.empty_like(q), 0
    end = ctx.start + ctx.num_new
    for keys, values in zip(k_cache.parts, v_cache.parts):
        rows = slice(first, first + keys.shape[0])
        first = rows.stop
        part_ctx = replace(ctx, attn_mask=ctx.attn_mask if ctx.attn_mask.shape[0] == 1 else ctx.attn_mask[rows])
        q_part, k_part, v_part = q[rows], k_new[rows], v_new[rows]
        if keys.device != q.device and ctx.start == 0:
            # A prompt: its own keys are all the keys there are, so attend where the queries
            # are (the new keys serve as the cache) and only store them where they live.
            out[rows] = _attend_cache(q_part, k_part, v_part, k_part, v_part, part_ctx, scale)
            keys[:, :, :end] = k_part
            values[:, :, :end] = v_part
            continue
        there = keys.device
        part_ctx = replace(part_ctx, attn_mask=part_ctx.attn_mask.to(there))
        out[rows] = _attend_cache(q_part.to(there), k_part.to(there), v_part.to(there), keys, values,
                                  part_ctx, scale).to(q.device)
    return out


def _keep_top(scores: torch.Tensor, mask: torch.Tensor, keep: float) -> torch.Tensor:
    """-inf all but each row's ceil(keep * visible) largest scores (ties at the cut stay);
    a key is visible where the additive mask is not (close to) the dtype's minimum."""
    visible = (mask > torch.finfo(mask.dtype).min / 2).sum(-1, keepdim=True)
    kept = torch.clamp(torch.ceil(visible * keep), min=1).long()
    ranked = scores.sort(dim=-1, descending=True).values
    threshold = ranked.gather(-1, (kept - 1).expand(*ranked.shape[:-1], 1))  # gather does not broadcast
    return scores.masked_fill(scores < threshold, float("-inf"))


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor, scale: float, keep: float = 1.0) -> torch.Tensor:
    """Attention as matmuls, query heads grouped over their shared KV head (GQA), softmax
    in fp32. q: [B, H, S, D]; keys, values: [B, Hkv, T, D] (any strides); mask: [B, 1, S, T]
    additive.

    keep < 1 is FlexGen's sparse attention: each query keeps the ceil(keep * n) highest of
    its n visible keys' scores (padding does not count) and the softmax runs over those alone.

    Runs over a few sequences at a time, each group's K and V first copied contiguous: a
    group then stays in cache from the score matmul to the value matmul. On a 75 MB cache
    (64 sequences x 144 tokens x 32 heads) that is 5x faster than one pass over all of it,
    and 9x when the cache is a strided view of token-major disk rows.
    """
    b, h, s, d = q.shape
    per_sequence = 2 * keys[0].numel() * keys.element_size()
    chunk = b if q.is_cuda else max(1, ATTENTION_CHUNK_BYTES // max(per_sequence, 1))  # a CPU cache effect
    out = torch.empty_like(q)
    for i in range(0, b, chunk):
        rows = slice(i, i + chunk)
        out[rows] = _attend(q[rows], keys[rows].contiguous(), values[rows].contiguous(),
                            mask if mask.shape[0] == 1 else mask[rows], scale, keep)
    return out


ATTENTION_CHUNK_BYTES = 4 << 20  # K and V of one group of sequences: measured best of 1-8 MiB here


def _attend(q, keys, values, mask, scale, keep):
    b, h, s, d = q.shape
    hkv, t = keys.shape[1], keys.shape[2]
    g = h // hkv  # query head i uses KV head i // g
    scores = torch.matmul(q.reshape(b, hkv, g * s, d), keys.transpose(-1, -2)).view(b, hkv, g, s, t)
    scores = scores.float() * scale + mask.unsqueeze(2)
    if keep < 1.0:
        scores = _keep_top(scores, mask.unsqueeze(2), keep)
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(b, hkv, g * s, t)
    return torch.matmul(probs, values).view(b, h, s, d)
