"""Token-major byte rows for KV cache blocks, plain or quantized.

A block's keys (or values) for n sequences are [n, Hkv, T, D]; stored token-major, token t
is one row of bytes, so the first T tokens are one contiguous range (one disk read) and a
step's new tokens are a short range at the end (one small write). Quantized rows hold each
(sequence, head) vector's packed levels, then the group minimums, then the steps, with
groups along the head dimension (FlexGen's cache compression).

A compressed cache holds keys and values multiplied by a fixed orthonormal matrix
(`kernels.attention.orthonormal`, a Hadamard matrix when the head dimension is a power of two). Keys have a
few channels far larger than the rest, which would set every group's range; the rotation
spreads them over all channels, so 4-bit groups keep far more precision (the idea of QuaRot,
Ashkboos et al. 2024). Attention applies it (`StepContext.kv_rotation`): it rotates the
step's queries, keys and values, and rotates the output back, which is exact because
q.k = (qR).(kR) and sum p v = (sum p vR) R^T. So the rows here are never rotated on the way
in or out, and the per-step decode of the whole cache is only unpacking and scaling.
"""
from __future__ import annotations

import torch

from ..kernels import fused
from ..kernels.quant import QuantConfig, dequantize_into, quantize, quantized_row_bytes, row_group

# Values quantized at once by `encode_rows_into`: the quantizer's fp32 temporaries (several
# copies of its input) stay a few MiB, where a whole admission's rows (64 sequences x 32
# tokens of OPT-1.3B) made ~70 MB of them per store, on each I/O thread at once.
ENCODE_CHUNK_VALUES = 1 << 20


class RowCodec:
    def __init__(self, sequences: int, heads: int, head_dim: int, dtype: torch.dtype,
                 quant: QuantConfig | None):
        self.sequences, self.heads, self.head_dim, self.dtype = sequences, heads, head_dim, dtype
        self.quant = None if quant is None else QuantConfig(quant.bits, row_group(head_dim, quant), -1)
        vectors = sequences * heads
        if self.quant is None:
            self.row_bytes = vectors * head_dim * torch.empty((), dtype=dtype).element_size()
        else:
            self.row_bytes = vectors * quantized_row_bytes(head_dim, self.quant, dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[n, Hkv, T, D] -> uint8 [T, row_bytes]."""
        return self.encode_rows(x.permute(2, 0, 1, 3))

    def encode_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """[T, n, Hkv, D] (token-major) -> uint8 [T, row_bytes]."""
        t = tokens.shape[0]
        if self.quant is None:
            return tokens.contiguous().view(torch.uint8).reshape(t, self.row_bytes)
        qt = quantize(tokens.float(), self.quant)  # scales kept in the cache dtype
        scales = [t.to(self.dtype).contiguous().view(torch.uint8) for t in (qt.minimum, qt.step)]
        parts = [qt.data, *scales]
        return torch.cat([p.reshape(t, -1) for p in parts], dim=1)

    def encode_rows_into(self, tokens: torch.Tensor, out: torch.Tensor) -> None:
        """[T, n, Hkv, D] (token-major) encoded into uint8 out [T, row_bytes] (any device), a
        few tokens at a time so that quantizing never holds large temporaries."""
        step = max(1, ENCODE_CHUNK_VALUES // max(1, tokens[0].numel()))
        for first in range(0, tokens.shape[0], step):
            out[first:first + step] = self.encode_rows(tokens[first:first + step])

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 [T, row_bytes] -> [n, Hkv, T, D] in the compute dtype; plain rows as a view
        of `rows` (what is written into it lands in them)."""
        shape = (rows.shape[0], self.sequences, self.heads, self.head_dim)
        if self.quant is None:
            return rows.view(self.dtype).view(shape).permute(1, 2, 0, 3)
        out = torch.empty(shape, dtype=self.dtype, device=rows.device)
        return self.decode_rows_into(rows, out).permute(1, 2, 0, 3)

    def decode_rows_into(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """uint8 [T, row_bytes] -> out [T, n, Hkv, D] (token-major, any device). Decoded in
        place when `out` is contiguous, on the rows' device and the groups tile the head
        dimension (a whole disk group's dense rows, the common case); else through a
        temporary where the rows are, then copied."""
        t = rows.shape[0]
        shape = (t, self.sequences, self.heads, self.head_dim)
        if self.quant is None:
            return out.copy_(rows.view(self.dtype).view(shape))
        group, bits = self.quant.group_size, self.quant.bits
        groups = -(-self.head_dim // group)
        vectors = self.sequences * self.heads
        in_place = out.is_contiguous() and out.device == rows.device and groups * group == self.head_dim
        levels = out.view(t, vectors, groups, group) if in_place else \
            torch.empty(t, vectors, groups, group, dtype=self.dtype, device=rows.device)
        data_cols = vectors * groups * group * bits // 8
        scale_cols = (rows.shape[1] - data_cols) // 2
        if in_place and bits == 4 and out.dtype == self.dtype and scale_cols == 2 * vectors * groups \
                and fused.dequantize_rows(rows, out, vectors * groups, group):
            return out
        data, minimum, step = rows.split([data_cols, scale_cols, scale_cols], dim=1)
        grid = (t, vectors, groups, 1)
        scale = lambda part: part.view(self.dtype).reshape(grid)
        dequantize_into(levels, data.reshape(t, vectors, groups, -1), scale(minimum), scale(step), bits)
        if not in_place:
            out.copy_(levels.view(t, vectors, groups * group)[..., :self.head_dim].reshape(shape))
        return out
