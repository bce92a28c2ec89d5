"""Compressed linear-layer weights: group-wise 4- or 8-bit, stored the way they are computed.

A weight W [N, K] (output features, input features) is quantized in groups of `group`
consecutive input features, asymmetrically (min/max per group, as `storage.quantize` does),
and kept as two tensors:

  data         uint8. 8 bits: q [N, K]. 4 bits: [N, K/2] in the tile layout of torch's CPU
               int4 kernel: rows in tiles of 64, and for each tile and input feature k, byte i
               holds q[tile*64 + i, k] in its low nibble and q[tile*64 + 32 + i, k] in its high.
  scale_zero   [K/group, N, 2] in the compute dtype: per group the step s and the value z of
               the middle level, so W = (q - 2^(bits-1)) * s + z (the kernel's convention).

Because the packed bytes are the kernel's own input, a 4-bit weight moves from disk to the
matmul with no conversion. Small batches use the fused kernel (`_weight_int4pack_mm_for_cpu`,
which reads 4-bit weights directly); large ones dequantize once into a dense tensor, cached
on the object so every GPU batch of a block reuses it, and use the ordinary matmul. Which
is faster depends on the machine and the shape: see `kernel_choice`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .kernel_choice import fused_max_rows
from .quantize import QuantConfig
from .tensor_pool import TensorPool

TILE = 64  # output rows per tile in the CPU int4 kernel's layout


@dataclass
class PackedLinear:
    data: torch.Tensor
    scale_zero: torch.Tensor
    bits: int
    group: int
    _dense: torch.Tensor | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.scale_zero.shape[1], self.scale_zero.shape[0] * self.group

    @property
    def dtype(self) -> torch.dtype:
        return self.scale_zero.dtype

    def nbytes(self) -> int:
        return self.data.numel() + self.scale_zero.numel() * self.scale_zero.element_size()

    def dense_transposed(self) -> torch.Tensor:
        """W.T [K, N] in the compute dtype (computed once per object, into a pooled buffer)."""
        if self._dense is None:
            n, k = self.shape
            self._dense = dequantize_transposed(self, _DENSE_POOL.take((k, n), self.dtype, self.data.device))
        return self._dense

    def release_dense(self) -> None:
        if self._dense is not None:
            _DENSE_POOL.give(self._dense)
        self._dense = None

    def to(self, device: torch.device) -> "PackedLinear":
        return PackedLinear(self.data.to(device, non_blocking=True), self.scale_zero.to(device, non_blocking=True),
                            self.bits, self.group)


def packable(shape: tuple[int, ...], bits: int, group: int) -> bool:
    """Whether a weight of this shape can be stored as a PackedLinear."""
    if len(shape) != 2:
        return False
    n, k = shape
    return k % group == 0 and (bits == 8 or n % TILE == 0)


def stored_parts(shape: tuple[int, ...], dtype: torch.dtype, quant: QuantConfig | None) -> dict[str, tuple]:
    """How a layer tensor is stored: {"": (shape, dtype)} plain, or a PackedLinear's parts."""
    if quant is not None and packable(shape, quant.bits, quant.group_size):
        n, k = shape
        return {"data": ((n, k * quant.bits // 8), torch.uint8), "scale_zero": ((k // quant.group_size, n, 2), dtype)}
    return {"": (shape, dtype)}


def stored_bytes(shape: tuple[int, ...], dtype: torch.dtype, quant: QuantConfig | None) -> int:
    return sum(math.prod(s) * element_size(d) for s, d in stored_parts(shape, dtype, quant).values())


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def pack_linear(w: torch.Tensor, bits: int = 4, group: int = 64) -> PackedLinear:
    if not packable(tuple(w.shape), bits, group):
        raise ValueError(f"a weight of shape {tuple(w.shape)} cannot be packed with {bits} bits, group {group}")
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    low, high = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
    levels = (1 << bits) - 1
    step = (high - low) / levels
    q = torch.round((g - low) / torch.where(step > 0, step, torch.ones_like(step)))
    q = q.clamp(0, levels).to(torch.uint8).reshape(n, k)
    middle = low + step * (1 << (bits - 1))
    scale_zero = torch.stack([step.squeeze(2), middle.squeeze(2)], dim=-1).transpose(0, 1)
    data = _to_tiles(q) if bits == 4 else q.contiguous()
    return PackedLinear(data, scale_zero.contiguous().to(w.dtype), bits, group)


def _to_tiles(q: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    t = q.reshape(n // TILE, TILE, k).transpose(1, 2)  # [tiles, K, 64]
    half = TILE // 2
    return (t[..., :half] | (t[..., half:] << 4)).contiguous().reshape(n, k // 2)


def _from_tiles(data: torch.Tensor) -> torch.Tensor:
    n, half_k = data.shape
    t = data.reshape(n // TILE, 2 * half_k, TILE // 2)
    q = torch.cat([t & 0x0F, t >> 4], dim=2)  # [tiles, K, 64]
    return q.transpose(1, 2).reshape(n, 2 * half_k)


def unpack_levels(p: PackedLinear) -> torch.Tensor:
    """The integer levels q [N, K] as uint8."""
    return _from_tiles(p.data) if p.bits == 4 else p.data


def dequantize_transposed(p: PackedLinear, out: torch.Tensor | None = None) -> torch.Tensor:
    """W.T [K, N] in the compute dtype, contiguous (written into `out` when given).

    Built in that orientation because it is the cheap one: a tile's bytes are already
    K-major, and each group's step and zero are then rows of scale_zero, so the levels are
    written once (strided) and scaled in place, one group of rows at a time.
    """
    n, k = p.shape
    if out is None:
        out = torch.empty(k, n, dtype=p.dtype, device=p.data.device)
    if p.bits == 4:
        tiles = p.data.view(n // TILE, k, TILE // 2)
        view = out.view(k, n // TILE, TILE).permute(1, 0, 2)  # [tiles, K, 64]
        view[..., :TILE // 2] = tiles & 0x0F
        view[..., TILE // 2:] = tiles >> 4
    else:
        out.copy_(p.data.T)
    _scale_groups(out, p)
    return out


def _scale_groups(levels: torch.Tensor, p: PackedLinear) -> None:
    """levels [K, N] -> (levels - 2^(bits-1)) * step + zero, in place.

    Group by group through a float32 scratch: torch's bf16 kernels do not vectorize a
    broadcast row (3x slower than this on a 2048 x 8192 weight), and the scratch of one
    group stays in cache.
    """
    step = p.scale_zero[..., 0].float()
    low = p.scale_zero[..., 1].float() - step * (1 << (p.bits - 1))
    grouped = levels.view(-1, p.group, levels.shape[1])
    if levels.dtype == torch.float32:
        torch.addcmul(low.unsqueeze(1), grouped, step.unsqueeze(1), out=grouped)
        return
    if levels.is_cuda:  # one broadcast pass: a GPU has no cache to keep a group in, only launches to save
        grouped.copy_(torch.addcmul(low.unsqueeze(1), grouped.float(), step.unsqueeze(1)))
        return
    scratch = torch.empty(p.group, levels.shape[1], dtype=torch.float32, device=levels.device)
    for g, rows in enumerate(levels.split(p.group)):
        scratch.copy_(rows)
        torch.addcmul(low[g], scratch, step[g], out=scratch)
        rows.copy_(scratch)


_DENSE_POOL = TensorPool()


def free_dense_buffers() -> None:
    """Return the pooled dense-weight buffers to the allocator (when a runner closes)."""
    _DENSE_POOL.clear()


def dequantize_linear(p: PackedLinear) -> torch.Tensor:
    """W [N, K] in the compute dtype (a transposed view)."""
    return dequantize_transposed(p).T


def linear(x: torch.Tensor, p: PackedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if p.bits == 4 and x.device.type == "cpu" and p._dense is None and rows <= fused_max_rows(p.shape):
        y = _fused(x.reshape(rows, x.shape[-1]), p).reshape(*x.shape[:-1], p.shape[0])
        return y if bias is None else y + bias
    y = torch.matmul(x, p.dense_transposed())
    return y if bias is None else y + bias


def dequantize_for_block(weights, rows: int) -> None:
    """Dequantize the 4-bit weights for which `rows` (all the rows the block will multiply
    by them before the layer is dropped) is past the fused kernel's crossover. Every GPU
    batch then shares one dequantization, where the fused kernel would run once per batch."""
    for w in weights:
        if isinstance(w, PackedLinear) and w.bits == 4 and w.data.device.type == "cpu" \
                and rows > fused_max_rows(w.shape):
            w.dense_transposed()


def _fused(x2d: torch.Tensor, p: PackedLinear) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.contiguous(), p.data, p.group, p.scale_zero)


def _fused_kernel_matches() -> bool:
    """The kernel exists and reads our tile layout as we write it (checked, not assumed)."""
    try:
        q = torch.randint(0, 16, (TILE, 128), dtype=torch.int32)
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except (AttributeError, RuntimeError):
        return False
    return theirs.shape == (TILE, 64) and torch.equal(theirs, _to_tiles(q.to(torch.uint8)))
