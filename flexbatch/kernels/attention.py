"""Attention over a KV cache: a cache in one tensor, split by sequence into segments that
live on different devices (`CacheSegments`), or handed over a GPU batch at a time as attention
reaches it (`CacheStream`); plain or rotated (a compressed cache).

Shapes in comments: B batch, S new tokens this step, T keys (cache length after this step),
H query heads, Hkv key/value heads, D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .native import DecodeKernel

ATTENTION_CHUNK_BYTES = 4 << 20  # K and V of one group of sequences: measured best of 1-8 MiB here


@dataclass
class CacheSegments:
    """The K (or V) cache of one GPU batch split by sequence into consecutive groups that
    may live on different devices, [n_i, Hkv, capacity, D] each. Attention runs over each
    group on its own device (the paper's CPU attention delegation, when a GPU computes and
    part of the cache is in host RAM): only queries, new keys and values, and outputs move."""

    parts: list[torch.Tensor]


@runtime_checkable
class CacheStream(Protocol):
    """K and V of a block's sequences, handed over in order of their rows, one group of
    consecutive sequences at a time: the caller (the offloading engine) loads each group
    when attention reaches it and stores it back once attention asks for the next, so a
    decode step multiplies the whole block by each weight at once while its cache streams
    through memory a GPU batch at a time. Passed as both k_cache and v_cache."""

    def caches(self) -> Iterator[tuple]:
        """Each group's (K, V): tensors [n, Hkv, capacity, D] or `CacheSegments`."""
        ...


@dataclass(frozen=True)
class SharedKeys:
    """Keys and values [Hkv, P, D] of a prompt prefix many sequences share, which their cache
    rows hold a copy of or, where their admission ran through the many-query kernel, leave
    out: a decode step attends to them once for all of those sequences, as one attention per
    KV head over all their queries, and to the rest of each row with the decode kernel; an
    admission reads them in place of its rows' first slots."""

    keys: torch.Tensor
    values: torch.Tensor
    readers: torch.Tensor  # [B] bool: the step's sequences whose rows hold them
    own_mask: torch.Tensor  # [B, 1, 1, T] additive: the step's mask, the readers' copies hidden


@dataclass(frozen=True)
class AttentionStep:
    """What attention over a cache needs of one forward step."""

    start: int  # tokens in the cache before this step; the S new ones go to [start, start + S)
    mask: torch.Tensor  # [B or 1, 1, S, T] additive
    scale: float
    keep: float = 1.0  # decode attends to this top fraction of keys per query (sparse attention)
    # [D, D] orthonormal: the cache holds K R and V R (a compressed cache, storage/kv_rows.py)
    rotation: torch.Tensor | None = None
    softcap: float | None = None  # scores become softcap * tanh(scores / softcap) (Gemma 2)
    first: int = 0  # no query sees a key before this slot (left padding, finished sequences' slots)
    # decode steps on a CPU: the kernel that reads only the keys each query sees, if built
    decode: DecodeKernel | None = None
    # [B] int64: the cache row each sequence of the step reads and writes (a decode step over
    # the rows in flight, with `decode`); None: sequence i is cache row i
    rows: torch.Tensor | None = None
    shared: SharedKeys | None = None  # with `decode`: keys read once for many sequences

    def for_rows(self, rows: slice) -> "AttentionStep":
        """The step for a slice of the batch (a mask shared by all sequences stays shared).
        On a CPU it starts at the slice's own first visible key: a decode step over the whole
        block gets the block's first, and reading fewer keys is less work and rounds as a
        step over that slice alone does."""
        if self.mask.shape[0] == 1:
            return self
        mask = self.mask[rows]
        if mask.is_cuda:  # attention there reads every key anyway (`_attend_cache`)
            return replace(self, mask=mask)
        visible = (mask > torch.finfo(mask.dtype).min).flatten(0, 2).any(0)
        return replace(self, mask=mask, first=max(self.first, int(visible.int().argmax())))


def cached_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache, v_cache,
                     step: AttentionStep) -> torch.Tensor:
    """Write this step's keys/values into the cache, then attend over [0, start + S).

    q: [B, H, S, D]; k_new, v_new: [B, Hkv, S, D]; caches: [B, Hkv, capacity, D] tensors,
    CacheSegments, or None for a prompt whose keys and values are not kept (start 0).
    Returns [B, H, S, D]. With a rotation R the cache holds K R and V R;
    queries are rotated to match and the output rotated back (R is orthonormal, so nothing
    changes but rounding).
    """
    rotation = step.rotation
    if rotation is not None:
        q, k_new, v_new = (_times(x, rotation) for x in (q, k_new, v_new))
    out = _attend_cache(q, k_new, v_new, k_cache, v_cache, step)
    return out if rotation is None else _times(out, rotation.T)


def _times(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ matrix [D, D] as one 2-D matmul: broadcast over x's batch dimensions it
    becomes a batched matmul of many one-row products, 100x slower on a CPU."""
    return (x.reshape(-1, x.shape[-1]) @ matrix).view(x.shape)


def _attend_cache(q, k_new, v_new, k_cache, v_cache, step: AttentionStep) -> torch.Tensor:
    if isinstance(k_cache, CacheSegments):
        return _attend_segments(q, k_new, v_new, zip(k_cache.parts, v_cache.parts), step)
    if isinstance(k_cache, CacheStream):
        return _attend_segments(q, k_new, v_new, _stream_segments(k_cache), step)
    if step.decode is not None and k_cache is not None and step.keep == 1.0 and step.decode.supports(q, k_cache):
        return _decode(q, k_new, v_new, k_cache, v_cache, step)
    assert step.rows is None, "only the decode kernel computes a subset of a cache's rows"
    if k_cache is None:  # a prefill that keeps no cache (scoring): its own keys are all there are
        keys, values = k_new, v_new
    else:
        end = step.start + q.shape[2]
        k_cache[:, :, step.start:end] = k_new
        v_cache[:, :, step.start:end] = v_new
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
    if step.softcap is not None or (q.shape[2] == 1 and step.keep < 1.0):
        # SDPA cannot soft-cap scores or keep only the largest; for everything else it is
        # the fastest here (torch 2.13, one query token in bf16 over a 64 x 300-token cache,
        # strided views: 3.3x faster than grouped_attention's chunked matmuls)
        return grouped_attention(q, keys, values, step.mask, step.scale, step.keep, step.softcap)
    if step.shared is not None and q.shape[2] > 1:  # a prompt whose rows hold no copy of their prefix
        done = step.decode.many(q, keys, values, step.mask, step.scale, prefix=(step.shared.keys, step.shared.values))
        if done is None:
            raise RuntimeError("the many-query kernel refused an admission whose rows hold no copy of their prefix")
        return done[0]
    first = 0 if q.is_cuda else step.first  # on a CPU, skip what no query sees
    keys, values, mask = keys[:, :, first:], values[:, :, first:], step.mask[..., first:]
    many = step.decode.many if step.decode is not None and q.shape[2] > 1 else None
    done = many(q, keys, values, mask, step.scale) if many is not None else None
    if done is not None:
        return done[0]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=step.scale,
                                          enable_gqa=q.shape[1] != keys.shape[1])


def _decode(q, k_new, v_new, k_cache: torch.Tensor, v_cache: torch.Tensor, step: AttentionStep) -> torch.Tensor:
    """One token per sequence, written at slot `start` of its cache row, then attention over
    the keys its mask leaves visible (`DecodeKernel`); with `shared` keys, those once for all
    their readers, merged with the rest of each row by log-sum-exp."""
    if step.shared is None or step.softcap is not None:
        return step.decode(q, k_new, v_new, k_cache, v_cache, step.rows, step.mask, step.start + 1, step.scale,
                           step.softcap)
    shared = step.shared
    own, own_lse = step.decode.with_lse(q, k_new, v_new, k_cache, v_cache, step.rows, shared.own_mask,
                                        step.start + 1, step.scale)
    if bool(shared.readers.all()):
        return _merge(own, own_lse, *_attend_shared(q, shared, step)).to(q.dtype)
    readers = shared.readers.nonzero().squeeze(1)
    own[readers] = _merge(own[readers], own_lse[readers], *_attend_shared(q[readers], shared, step))
    return own.to(q.dtype)


def _merge(a: torch.Tensor, a_lse: torch.Tensor, b: torch.Tensor, b_lse: torch.Tensor) -> torch.Tensor:
    """Attention outputs [..., S, D] fp32 over two disjoint sets of keys, with each query's
    log-sum-exp of scores [..., S], as the output over both: b's share of the softmax mass is
    e^b_lse / (e^a_lse + e^b_lse) = sigmoid(b_lse - a_lse)."""
    return torch.lerp(a, b, torch.sigmoid(b_lse - a_lse).unsqueeze(-1))


def _attend_shared(q: torch.Tensor, shared: SharedKeys, step: AttentionStep) -> tuple[torch.Tensor, torch.Tensor]:
    """q [m, H, 1, D] over the shared keys/values [Hkv, P, D] that every sequence sees whole:
    the queries of each KV head's group, all m sequences' at once, as one attention over the
    same keys (the many-query C kernel, else PyTorch's CPU flash attention, which also
    returns the log-sum-exp: 3x faster here than matmul, softmax and matmul; both keep scores
    fp32). Returns the output [m, H, 1, D] fp32 and each query's log-sum-exp [m, H, 1]."""
    m, heads, _, dim = q.shape
    kv_heads = shared.keys.shape[0]
    grouped = q.reshape(m, kv_heads, heads // kv_heads, dim).transpose(0, 1).reshape(1, kv_heads, -1, dim)
    keys, values = shared.keys.unsqueeze(0), shared.values.unsqueeze(0)
    many = step.decode.many
    done = many(grouped, keys, values, None, step.scale, lse=True) if many is not None else None
    if done is None:  # [1, Hkv, m * g, D], [1, Hkv, m * g]
        done = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(grouped, keys, values, scale=step.scale)
    out, lse = done[0], done[1]
    unfold = lambda x: x.view(kv_heads, m, heads // kv_heads, -1).transpose(0, 1).reshape(m, heads, 1, -1)
    return unfold(out[0].float()), unfold(lse[0].unsqueeze(-1)).squeeze(-1)


def _stream_segments(stream: CacheStream) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A stream's groups as (K, V) tensors of consecutive sequences, in order."""
    for keys, values in stream.caches():
        if isinstance(keys, CacheSegments):
            yield from zip(keys.parts, values.parts)
        else:
            yield keys, values


def _attend_segments(q, k_new, v_new, segments: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     step: AttentionStep) -> torch.Tensor:
    """Attention over (K, V) segments of consecutive sequences, each where it lives."""
    out, first = torch.empty_like(q), 0
    end = step.start + q.shape[2]
    for keys, values in segments:
        rows = slice(first, first + keys.shape[0])
        first = rows.stop
        part_step = step.for_rows(rows)
        q_part, k_part, v_part = q[rows], k_new[rows], v_new[rows]
        if keys.device != q.device and step.start == 0:
            # A prompt: its own keys are all the keys there are, so attend where the queries
            # are (the new keys serve as the cache) and only store them where they live.
            out[rows] = _attend_cache(q_part, k_part, v_part, k_part, v_part, part_step)
            keys[:, :, :end] = k_part
            values[:, :, :end] = v_part
            continue
        there = keys.device
        part_step = replace(part_step, mask=part_step.mask.to(there))
        out[rows] = _attend_cache(q_part.to(there), k_part.to(there), v_part.to(there), keys, values,
                                  part_step).to(q.device)
    return out


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor, scale: float, keep: float = 1.0,
                      softcap: float | None = None) -> torch.Tensor:
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
    b = q.shape[0]
    per_sequence = 2 * keys[0].numel() * keys.element_size()
    chunk = b if q.is_cuda else max(1, ATTENTION_CHUNK_BYTES // max(per_sequence, 1))  # a CPU cache effect
    out = torch.empty_like(q)
    for i in range(0, b, chunk):
        rows = slice(i, i + chunk)
        rows_mask = mask if mask.shape[0] == 1 else mask[rows]
        first = 0 if q.is_cuda else _first_visible_key(rows_mask)  # on a CPU, skip what no row sees
        out[rows] = _attend(q[rows], keys[rows, :, first:].contiguous(), values[rows, :, first:].contiguous(),
                            rows_mask[..., first:], scale, keep, softcap)
    return out


def _first_visible_key(mask: torch.Tensor) -> int:
    """The first key any query sees under the additive mask [b, 1, S, T]: keys before it (left
    padding, slots of finished sequences) are neither copied nor multiplied."""
    visible = (mask > torch.finfo(mask.dtype).min / 2).flatten(0, 2).any(0)  # [T]
    return int(visible.int().argmax())


def _attend(q, keys, values, mask, scale, keep, softcap):
    b, h, s, d = q.shape
    hkv, t = keys.shape[1], keys.shape[2]
    g = h // hkv  # query head i uses KV head i // g
    scores = torch.matmul(q.reshape(b, hkv, g * s, d), keys.transpose(-1, -2)).view(b, hkv, g, s, t)
    scores = scores.float() * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + mask.unsqueeze(2)
    if keep < 1.0:
        scores = _keep_top(scores, mask.unsqueeze(2), keep)
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(b, hkv, g * s, t)
    return torch.matmul(probs, values).view(b, h, s, d)


def _keep_top(scores: torch.Tensor, mask: torch.Tensor, keep: float) -> torch.Tensor:
    """-inf all but each row's ceil(keep * visible) largest scores (ties at the cut stay);
    a key is visible where the additive mask is not (close to) the dtype's minimum."""
    visible = (mask > torch.finfo(mask.dtype).min / 2).sum(-1, keepdim=True)
    kept = torch.clamp(torch.ceil(visible * keep), min=1).long()
    ranked = scores.sort(dim=-1, descending=True).values
    threshold = ranked.gather(-1, (kept - 1).expand(*ranked.shape[:-1], 1))  # gather does not broadcast
    return scores.masked_fill(scores < threshold, float("-inf"))


def orthonormal(n: int) -> torch.Tensor:
    """A fixed orthonormal [n, n] fp32 matrix: normalised Sylvester-Hadamard for powers of
    two (scipy's, the same construction), else the Q of a QR decomposition of a seeded
    Gaussian matrix. The rotation a compressed KV cache is kept in (storage/kv_rows.py)."""
    if n & (n - 1) == 0:
        from scipy.linalg import hadamard

        return torch.from_numpy(hadamard(n)).float() / n ** 0.5
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0)))
    return q
