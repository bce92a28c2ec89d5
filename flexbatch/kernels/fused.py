"""The fused elementwise kernels of fused.c (RMSNorm, rotary embedding, the SiLU gate, the
4-bit KV cache's decode), bound with ctypes, and the switch that lets the models' ops and the
cache's rows (storage/kv_rows.py) use them.

They come with the C decode kernels (one library, kernels/native.py). Whether to use them
is decided above the engine, as for the decode kernel (model_policy.py), and set here for
the process with `use`: the ops run in every model family and in the head, where no step
context reaches. Each function returns None where its kernel does not apply (not on a CPU,
another dtype, a layout it does not take), and the caller runs PyTorch's operations.
"""
from __future__ import annotations

import ctypes

import torch

DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


class FusedOps:
    def __init__(self, library: ctypes.CDLL):
        self._rms_norm, self._rotary, self._silu = library.rms_norm, library.rotary, library.silu_times
        self._rms_norm.argtypes = [_PTR, _I64, _I64, _I64, _PTR, ctypes.c_float, _INT, _PTR, _INT, _INT]
        self._rotary.argtypes = [_PTR, _I64, _I64, _I64, _I64, ctypes.POINTER(_I64), _PTR, _PTR, _I64, _PTR, _INT,
                                 _INT]
        self._silu.argtypes = [_PTR, _PTR, _I64, _INT, _INT]
        self._dequantize = library.dequantize_rows
        self._dequantize.argtypes = [_PTR, _I64, _I64, _I64, _I64, _PTR, _INT]
        for fn in (self._rms_norm, self._rotary, self._silu, self._dequantize):
            fn.restype = None


_active: FusedOps | None = None


def active() -> FusedOps | None:
    """The kernels the models' ops run with now (None: PyTorch's)."""
    return _active


def use(ops: FusedOps | None) -> None:
    """Run the models' ops with these kernels from now on (None: with PyTorch's)."""
    global _active
    _active = ops


def _takes(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return _active is not None and first.device.type == "cpu" and first.dtype in DTYPES \
        and all(t.dtype == first.dtype and t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor | None:
    """ops.rms_norm in one pass per row, or None."""
    if not _takes(x, weight) or not weight.is_contiguous():
        return None
    dim = x.shape[-1]
    try:
        rows = x.view(-1, dim)  # rows at one stride, or none of this
    except RuntimeError:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    _active._rms_norm(rows.data_ptr(), rows.shape[0], dim, rows.stride(0), weight.data_ptr(), eps, int(unit_offset),
                      out.data_ptr(), DTYPES[x.dtype], torch.get_num_threads())
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """ops.apply_rotary for x [B, H, S, D] and cos/sin [B, S, R] in one pass, or None."""
    if not _takes(x, cos, sin) or x.dim() != 4 or not (cos.is_contiguous() and sin.is_contiguous()):
        return None
    b, heads, s, dim = x.shape
    if cos.shape != sin.shape or cos.shape[:2] != (b, s) or cos.shape[2] % 2 or cos.shape[2] > dim:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    strides = (_I64 * 3)(*x.stride()[:3])
    _active._rotary(x.data_ptr(), b, heads, s, dim, strides, cos.data_ptr(), sin.data_ptr(), cos.shape[2],
                    out.data_ptr(), DTYPES[x.dtype], torch.get_num_threads())
    return out


def silu_times(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up, written into gate (a projection's fresh output), or None."""
    if not _takes(gate, up) or gate.shape != up.shape or not (gate.is_contiguous() and up.is_contiguous()):
        return None
    _active._silu(gate.data_ptr(), up.data_ptr(), gate.numel(), DTYPES[gate.dtype], torch.get_num_threads())
    return gate


def dequantize_rows(rows: torch.Tensor, out: torch.Tensor, groups: int, group: int) -> bool:
    """4-bit KV cache rows (uint8 [T, row_bytes], storage/kv_rows.py's layout: `groups`
    groups of `group` values a row, bf16 minimums and steps) decoded into contiguous bf16
    `out` (T x groups x group values) in one pass, bit for bit as dequantize_into; False
    where the kernel does not apply. One thread: it runs on an I/O thread beside the
    compute's threads."""
    if not _takes(out) or out.dtype != torch.bfloat16 or not out.is_contiguous() or group % 2 \
            or rows.device.type != "cpu" or rows.dtype != torch.uint8 or rows.stride(1) != 1:
        return False
    _active._dequantize(rows.data_ptr(), rows.shape[0], rows.stride(0), groups, group, out.data_ptr(), 1)
    return True
