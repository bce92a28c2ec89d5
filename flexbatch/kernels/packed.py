"""Compressed linear-layer weights: group-wise 4- or 8-bit, stored the way they are computed.

A weight W [N, K] (output features, input features) is quantized in groups of `group`
consecutive input features (`quant.group_levels`, the quantizer the KV cache uses too) and
kept as two tensors:

  data         uint8. 8 bits: q [N, K]. 4 bits: [N, K/2] in the tile layout of torch's CPU
               int4 kernel: rows in tiles of 64, and for each tile and input feature k, byte i
               holds q[tile*64 + i, k] in its low nibble and q[tile*64 + 32 + i, k] in its high.
  scale_zero   [K/group, N, 2] in the compute dtype: per group the step s and the value z of
               the middle level, so W = (q - 2^(bits-1)) * s + z (the kernel's convention).

Because the packed bytes are the kernel's own input, a 4-bit weight moves from disk to the
matmul with no conversion. Few rows use the fused kernel (`_weight_int4pack_mm_for_cpu`,
which reads 4-bit weights directly); many dequantize once into a dense tensor, cached on the
object so every GPU batch of a block reuses it, and use the ordinary matmul. The weight
carries the `KernelChoice` that says where the crossover is; whoever builds it sets it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import torch

from .choice import KernelChoice
from .quant import QuantConfig, group_levels
from .tensor_pool import TensorPool

TILE = 64  # output rows per tile in the CPU int4 kernel's layout


@dataclass
class PackedLinear:
    data: torch.Tensor
    scale_zero: torch.Tensor
    bits: int
    group: int
    choice: KernelChoice = KernelChoice()
    _dense: torch.Tensor | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.scale_zero.shape[1], self.scale_zero.shape[0] * self.group

    @property
    def dtype(self) -> torch.dtype:
        return self.scale_zero.dtype

    def nbytes(self) -> int:
        return self.data.numel() + self.scale_zero.numel() * self.scale_zero.element_size()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T + bias, by the kernel `choice` names for this many rows."""
        rows = x.numel() // x.shape[-1]
        if self._fused_fits(x.device, rows) and self._dense is None:
            y = fused_int4_matmul(x.reshape(rows, x.shape[-1]), self).reshape(*x.shape[:-1], self.shape[0])
        else:
            y = torch.matmul(x, self.dense_transposed())
        return y if bias is None else y + bias

    def prepare(self, rows: int) -> None:
        """Dequantize now if `rows` (all the rows a block will multiply by this weight before
        it is dropped) is past the fused kernel's crossover: every GPU batch then shares one
        dequantization, where the fused kernel would run once per batch."""
        if self.bits == 4 and self.data.device.type == "cpu" and not self.choice.fused(rows):
            self.dense_transposed()

    def _fused_fits(self, device: torch.device, rows: int) -> bool:
        # a choice handed down from elsewhere may name the fused kernel where this CPU's build
        # of it reads another layout (AVX2-only machines): its products would be garbage
        return self.bits == 4 and device.type == "cpu" and self.choice.fused(rows) and fused_kernel_available()

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
        """A new object on `device` (so a dense copy lives only as long as one load's weights)."""
        return replace(self, data=self.data.to(device, non_blocking=True),
                       scale_zero=self.scale_zero.to(device, non_blocking=True), _dense=None)

    def pin_memory(self) -> "PackedLinear":
        return replace(self, data=self.data.pin_memory(), scale_zero=self.scale_zero.pin_memory(), _dense=None)


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


def pack_linear(w: torch.Tensor, bits: int = 4, group: int = 64, choice: KernelChoice = KernelChoice()) -> PackedLinear:
    if not packable(tuple(w.shape), bits, group):
        raise ValueError(f"a weight of shape {tuple(w.shape)} cannot be packed with {bits} bits, group {group}")
    n, k = w.shape
    q, low, step = group_levels(w.float().reshape(n, k // group, group), bits, dim=2)
    q = q.reshape(n, k)
    middle = low + step * (1 << (bits - 1))  # the kernel's zero point: the middle level's value
    scale_zero = torch.stack([step.squeeze(2), middle.squeeze(2)], dim=-1).transpose(0, 1)
    data = _to_tiles(q) if bits == 4 else q.contiguous()
    return PackedLinear(data, scale_zero.contiguous().to(w.dtype), bits, group, choice)


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


def fused_int4_matmul(x2d: torch.Tensor, p: PackedLinear) -> torch.Tensor:
    """x2d [rows, K] @ W.T by torch's fused CPU kernel, straight from the packed bytes."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.contiguous(), p.data, p.group, p.scale_zero)


@functools.cache
def fused_kernel_available() -> bool:
    """The kernel exists and reads our tile layout as we write it (checked, not assumed)."""
    try:
        q = torch.randint(0, 16, (TILE, 128), dtype=torch.int32)
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except (AttributeError, RuntimeError):
        return False
    return theirs.shape == (TILE, 64) and torch.equal(theirs, _to_tiles(q.to(torch.uint8)))
