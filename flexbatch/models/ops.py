"""Shared tensor operations: norms, rotary embeddings, attention masks, and the step's
attention (the kernel itself, and the cache it runs over, are in kernels/).

Shapes in comments: B batch, S new tokens this step, T keys (cache length after this step),
H query heads, Hkv key/value heads, D head dim, C hidden size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
    # Sliding-window layers of families that alternate them with global ones (Gemma): their
    # mask, and their rotary tables where their rope differs (Gemma 3's local base).
    local_mask: torch.Tensor | None = None
    local_cos: torch.Tensor | None = None
    local_sin: torch.Tensor | None = None
    attn_keep: float = 1.0  # decode attends to this top fraction of keys per query (sparse attention)
    # [B, T] position of each key: a cache row may hold padding between a sequence's tokens,
    # and packed rows that share a prefix (engine/scoring.py) hold keys out of position
    # order; None: slot distance is position distance
    key_positions: torch.Tensor | None = None
    # [D, D] orthonormal, compute dtype: the KV cache holds keys and values times it (a
    # compressed cache; see kernels/attention.py). None: the cache holds them as computed.
    kv_rotation: torch.Tensor | None = None
    # No query of the step sees a key before this slot (found once per step, used by every layer)
    first_key: int = 0
    # On a CPU, the C kernels (kernels/native.py): decode attention that reads only the keys
    # each query sees, and prompts' attention
    decode: kernels.DecodeKernel | None = None
    # [B] int64: the cache rows the step's sequences read and write (a step over the rows in
    # flight, with `decode`); None: sequence i is cache row i
    rows: torch.Tensor | None = None
    # With `decode`: a prompt prefix that several rows hold copies of, attended once for them
    # (kernels.SharedKeys), and the layer being computed, whose keys of it to use
    shared: SharedPrefix | None = None
    layer: int = 0


@dataclass(frozen=True)
class SharedPrefix:
    """A prompt prefix's keys and values [1, Hkv, P, D] per layer, held as copies by the rows
    `readers` [B] bool marks; own_mask [B, 1, 1, T]: the step's mask with those copies hidden."""

    caches: list[tuple[torch.Tensor, torch.Tensor]]
    readers: torch.Tensor
    own_mask: torch.Tensor

    def keys_of(self, layer: int) -> kernels.SharedKeys:
        keys, values = self.caches[layer]
        return kernels.SharedKeys(keys[0], values[0], self.readers, self.own_mask)


def attention_mask(key_valid: torch.Tensor, start: int, dtype: torch.dtype,
                   sliding_window: int | None = None) -> torch.Tensor:
    """Additive causal + padding mask for queries at slots [start, T) over keys [0, T).

    key_valid: [B, T] bool, False at padding (left of a prompt, or between a shared prefix
    and the rest of a prompt: engine/generation.py). A sliding window counts positions, not
    slots. A padding query may attend to itself, so no row is fully masked (a fully masked
    row would give NaN that could leak into the cache).
    """
    num_keys = key_valid.shape[1]
    q_idx = torch.arange(start, num_keys).unsqueeze(1)  # [S, 1]
    k_idx = torch.arange(num_keys).unsqueeze(0)  # [1, T]
    allowed = (k_idx <= q_idx).unsqueeze(0) & key_valid.unsqueeze(1)  # [B, S, T]
    if sliding_window is not None:
        key_pos = positions_from_mask(key_valid, 0)  # [B, T]
        allowed &= key_pos[:, start:].unsqueeze(2) - key_pos.unsqueeze(1) < sliding_window
    allowed |= (k_idx == q_idx).unsqueeze(0)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def sliding_window_mask(ctx: StepContext, window: int) -> torch.Tensor:
    """The step's mask [B, 1, S, T] further restricted to keys less than `window` positions
    back (q - k < window, as transformers counts), by the keys' positions where the context
    gives them, else by slot distance (a cache without gaps between a sequence's tokens)."""
    mask = ctx.attn_mask
    if ctx.key_positions is not None:
        distance = ctx.positions.unsqueeze(2) - ctx.key_positions.unsqueeze(1)  # [B, S, T]
        return mask.masked_fill((distance >= window).unsqueeze(1), torch.finfo(mask.dtype).min)
    s, t = mask.shape[-2:]
    q_idx = torch.arange(ctx.start, ctx.start + s, device=mask.device).unsqueeze(1)  # [S, 1]
    k_idx = torch.arange(t, device=mask.device).unsqueeze(0)  # [1, T]
    return mask.masked_fill(q_idx - k_idx >= window, torch.finfo(mask.dtype).min)


def segment_mask(positions: torch.Tensor, groups: torch.Tensor, segments: torch.Tensor, dtype: torch.dtype,
                 sliding_window: int | None = None) -> torch.Tensor:
    """Additive mask [B, 1, S, S] for packed scoring rows (engine/scoring.py), with no KV cache
    before them. A row holds groups (ids in `groups`, -1 padding), each a shared prefix
    (segment 0) and continuations of it (segments i > 0). A token sees its own group's prefix
    and its own segment up to its position, so each continuation is scored as if it followed
    its prefix alone. A token always sees itself.
    """
    q_pos, k_pos = positions.unsqueeze(2), positions.unsqueeze(1)  # [B, S, 1], [B, 1, S]
    q_seg, k_seg = segments.unsqueeze(2), segments.unsqueeze(1)
    allowed = (k_pos <= q_pos) & (groups.unsqueeze(2) == groups.unsqueeze(1)) & ((k_seg == 0) | (k_seg == q_seg))
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    fused = kernels.fused.rms_norm(x, weight, eps, unit_offset)
    if fused is not None:
        return fused
    # Normalise in fp32, as the reference implementation does, then cast back.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:  # Gemma stores w - 1 and scales by (1 + w), in fp32 before the cast
        return (xf * (1.0 + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): Gemma 2 bounds its logits smoothly to (-cap, cap)."""
    return x if cap is None else torch.tanh(x / cap) * cap


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [R/2] in fp32 over the R = head_dim * partial_rotary_factor rotary
    dims, including linear and Llama 3 scaling (LongRoPE: `longrope_inv_freq`)."""
    dim = int(head_dim * rope.partial_rotary_factor)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
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


def longrope_inv_freq(rope: RopeConfig, head_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """LongRoPE inverse frequencies [B, 1, R/2]: a sequence whose furthest position this step
    is beyond the original context uses `long_factor`, else `short_factor` (as transformers
    switches, per sequence here so a batch computes what each prompt alone would)."""
    plain = rope_inv_freq(replace(rope, kind="default"), head_dim)
    short, long = (torch.tensor(f, dtype=torch.float32) for f in (rope.short_factor, rope.long_factor))
    beyond = (positions.max(dim=1).values + 1 > rope.original_max_position_embeddings).cpu()  # [B]
    factors = torch.where(beyond.unsqueeze(1), long, short)  # [B, R/2]
    return (plain / factors).unsqueeze(1).to(positions.device)


def rope_tables(rope: RopeConfig, head_dim: int, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin [B, S, R] of `rope` at `positions` [B, S], whichever its scaling."""
    if rope.kind == "longrope":
        return rotary_tables(longrope_inv_freq(rope, head_dim, positions), positions, dtype,
                             rope.attention_factor)
    return rotary_tables(rope_inv_freq(rope, head_dim).to(positions.device), positions, dtype)


def rotary_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos/sin [B, S, R] for the half-split rotary layout used by HF Llama checkpoints;
    inv_freq [R/2], or [B, 1, R/2] per sequence. LongRoPE scales both by `scale`."""
    freqs = positions.unsqueeze(-1).float() * inv_freq  # [B, S, R/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, S, D]; cos/sin: [B, S, R], R <= D: dims past R pass unrotated (Phi-3's partial rotary)
    fused = kernels.fused.rotary(x, cos, sin)
    if fused is not None:
        return fused
    if cos.shape[-1] < x.shape[-1]:
        rotary = cos.shape[-1]
        return torch.cat((apply_rotary(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def silu_times(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, gate a projection's fresh output (overwritten)."""
    fused = kernels.fused.silu_times(gate, up)
    return fused if fused is not None else F.silu(gate, inplace=True) * up


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    # [B, S, heads*D] -> [B, heads, S, D]
    b, s, _ = x.shape
    return x.view(b, s, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    # [B, heads, S, D] -> [B, S, heads*D]
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def cached_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache, v_cache,
                     ctx: StepContext, scale: float | None = None, local: bool = False,
                     softcap: float | None = None) -> torch.Tensor:
    """Write this step's keys/values into the cache, then attend over [0, start + S)
    (`kernels.cached_attention`; the cache may be split into `CacheSegments`). `local`: a
    sliding-window layer (ctx.local_mask); `softcap`: scores soft-capped before the mask.

    q: [B, H, S, D]; k_new, v_new: [B, Hkv, S, D]. Returns [B, H, S, D].
    """
    # a sliding window would hide part of the shared prefix: those layers read the rows' copies
    shared = ctx.shared.keys_of(ctx.layer) if ctx.shared is not None and not local else None
    step = AttentionStep(ctx.start, ctx.local_mask if local else ctx.attn_mask,
                         q.shape[-1] ** -0.5 if scale is None else scale,
                         ctx.attn_keep, ctx.kv_rotation, softcap, ctx.first_key, ctx.decode, ctx.rows, shared)
    return kernels.cached_attention(q, k_new, v_new, k_cache, v_cache, step)


def route_top_k(router_logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture-of-experts routing: softmax over experts in fp32, the k most probable per token,
    their probabilities renormalised to sum to 1 if `normalize` (Mixtral; Qwen2-MoE's
    norm_topk_prob). router_logits [N, E] -> weights [N, k] fp32, expert ids [N, k]."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, chosen = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, chosen


def mix_experts(x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, num_experts: int,
                expert) -> torch.Tensor:
    """sum_k weights[n, k] * expert(chosen[n, k], x[n]) for every token n, computed grouped by
    expert: one call per expert over all the tokens routed to it, so each expert's weights
    are multiplied once per step by a block's tokens however they are spread.
    x [N, C]; weights, chosen [N, k]; expert(e, rows [n_e, C]) -> [n_e, C]."""
    k = chosen.shape[1]
    order = chosen.flatten().argsort(stable=True)  # (token, slot) pairs grouped by expert, tokens ascending
    counts = torch.bincount(chosen.flatten(), minlength=num_experts).tolist()  # the one host sync
    token, routed_weight = order // k, weights.flatten()[order].unsqueeze(-1)
    out, first = torch.zeros_like(x), 0
    for e, count in enumerate(counts):
        if count:
            rows = slice(first, first + count)
            first += count
            tokens = token[rows]  # distinct: a token picks an expert at most once
            # a gather, add and scatter: index_add_ is ~50x slower on CPU in bf16 (measured)
            out[tokens] += (expert(e, x[tokens]) * routed_weight[rows]).to(out.dtype)
    return out
