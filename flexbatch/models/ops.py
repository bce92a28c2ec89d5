"""Shared tensor operations: norms, rotary embeddings, attention masks, and the step's
attention (the kernel itself, and the cache it runs over, are in kernels/).

Shapes in comments: B batch, S new tokens this step, T keys (cache length after this step),
H query heads, Hkv key/value heads, D head dim, C hidden size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels
from ..kernels import AttentionStep
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
    # compressed cache; see kernels/attention.py). None: the cache holds them as computed.
    kv_rotation: torch.Tensor | None = None


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


def segment_mask(positions: torch.Tensor, segments: torch.Tensor, dtype: torch.dtype,
                 sliding_window: int | None = None) -> torch.Tensor:
    """Additive mask [B, 1, S, S] for rows that pack several sequences sharing a prefix, with no
    KV cache before them: segment 0 is the shared prefix, segment i > 0 one continuation of it,
    -1 padding. A token sees the prefix and its own segment up to its position, so each
    continuation is scored as if it followed the prefix alone. A token always sees itself.
    """
    q_pos, k_pos = positions.unsqueeze(2), positions.unsqueeze(1)  # [B, S, 1], [B, 1, S]
    q_seg, k_seg = segments.unsqueeze(2), segments.unsqueeze(1)
    allowed = (k_pos <= q_pos) & ((k_seg == 0) | (k_seg == q_seg))
    if sliding_window is not None:
        allowed &= q_pos - k_pos < sliding_window
    allowed |= torch.eye(positions.shape[1], dtype=torch.bool)
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


def cached_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache, v_cache,
                     ctx: StepContext, scale: float | None = None) -> torch.Tensor:
    """Write this step's keys/values into the cache, then attend over [0, start + S)
    (`kernels.cached_attention`; the cache may be split into `CacheSegments`).

    q: [B, H, S, D]; k_new, v_new: [B, Hkv, S, D]. Returns [B, H, S, D].
    """
    step = AttentionStep(ctx.start, ctx.attn_mask, q.shape[-1] ** -0.5 if scale is None else scale,
                         ctx.attn_keep, ctx.kv_rotation)
    return kernels.cached_attention(q, k_new, v_new, k_cache, v_cache, step)
