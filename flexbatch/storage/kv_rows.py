"""Token-major byte rows for KV cache blocks, plain or quantized.

A block's keys (or values) for n sequences are [n, Hkv, T, D]; stored token-major, token t
is one row of bytes, so the first T tokens are one contiguous range (one disk read) and a
step's new tokens are a short range at the end (one small write). Quantized rows hold each
(sequence, head) vector's packed levels, then the group minimums, then the steps, with
groups along the head dimension (FlexGen's cache compression).
"""
from __future__ import annotations

import torch

from .quantize import QuantConfig, QuantizedTensor, dequantize, quantize, quantized_row_bytes, row_group


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
        tokens = x.permute(2, 0, 1, 3)  # [T, n, Hkv, D]
        t = tokens.shape[0]
        if self.quant is None:
            return tokens.contiguous().view(torch.uint8).reshape(t, self.row_bytes)
        qt = quantize(tokens, self.quant)
        parts = [qt.data, qt.minimum.contiguous().view(torch.uint8), qt.step.contiguous().view(torch.uint8)]
        return torch.cat([p.reshape(t, -1) for p in parts], dim=1)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 [T, row_bytes] -> [n, Hkv, T, D] in the compute dtype."""
        t = rows.shape[0]
        shape = (t, self.sequences, self.heads, self.head_dim)
        if self.quant is None:
            return rows.view(self.dtype).view(shape).permute(1, 2, 0, 3)
        group = self.quant.group_size
        groups = -(-self.head_dim // group)
        data_cols = self.sequences * self.heads * groups * group * self.quant.bits // 8
        scale_cols = (rows.shape[1] - data_cols) // 2
        data, minimum, step = rows.split([data_cols, scale_cols, scale_cols], dim=1)
        grid = (t, self.sequences, self.heads, groups)
        qt = QuantizedTensor(
            data.reshape(*grid, -1),
            minimum.contiguous().view(self.dtype).reshape(*grid, 1),
            step.contiguous().view(self.dtype).reshape(*grid, 1),
            shape, self.dtype, self.quant)
        return dequantize(qt).permute(1, 2, 0, 3)
