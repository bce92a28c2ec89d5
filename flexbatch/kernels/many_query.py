"""The many-query attention kernel of prefill_attention.c, bound with ctypes: a prompt's
prefill over its keys, and a decode step's queries of many sequences over a prefix they all
share, in bf16 on AVX512-BF16 dot products.

It comes with the C decode kernels (one library, kernels/native.py); `DecodeKernel.many` is
None where the CPU has no AVX512-BF16, and `__call__` returns None for what it does not take
(another dtype or device, a head dim that is not a multiple of 64): the caller then runs
PyTorch's attention. Soft-capped scores never reach it (kernels/attention.py).
"""
from __future__ import annotations

import ctypes

import torch

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_Strides = _I64 * 3


class _ManyArgs(ctypes.Structure):
    # the field order and types of ManyArgs in prefill_attention.c
    _fields_ = [("q", _PTR), ("k", _PTR), ("v", _PTR), ("q_strides", _Strides), ("k_strides", _Strides),
                ("v_strides", _Strides), ("mask", _PTR), ("mask_strides", _I64 * 2), ("hidden_below", ctypes.c_float),
                ("batch", _I64), ("heads", _I64), ("kv_heads", _I64), ("queries", _I64), ("keys", _I64),
                ("dim", _I64), ("scale", ctypes.c_float), ("out", _PTR), ("out_strides", _Strides), ("lse", _PTR),
                ("prefix_k", _PTR), ("prefix_v", _PTR), ("prefix_strides", _I64 * 2), ("prefix_len", _I64)]


class ManyQueryAttention:
    def __init__(self, library: ctypes.CDLL):
        self._call = library.many_query_attention
        self._call.argtypes = [ctypes.POINTER(_ManyArgs), ctypes.c_int]
        self._call.restype = ctypes.c_int

    @staticmethod
    def built(library: ctypes.CDLL) -> bool:
        """Whether the library was compiled for a CPU with AVX512-BF16 (else it has no kernel)."""
        return bool(library.many_query_attention_built())

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                 scale: float, lse: bool = False, prefix: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """q [B, H, S, D] over keys/values [B, Hkv, T, D] (H a multiple of Hkv, the grouped
        heads consecutive), mask [B or 1, 1, S, T] additive or None -> (output [B, H, S, D] bf16,
        each query's log-sum-exp of scores [B, H, S] fp32 if `lse`), or None if not taken.
        prefix: keys and values [Hkv, P, D] that every sequence has at positions [0, P),
        read instead of the sequences' own first P slots (which need hold nothing)."""
        if not self.takes(q, keys, values, mask) or (prefix is not None and not (
                self.takes(q, *prefix, None) and prefix[0].shape[0] == keys.shape[1]
                and prefix[0].shape[1] <= keys.shape[2])):
            return None
        b, heads, s, dim = q.shape
        out = torch.empty(q.shape, dtype=q.dtype)
        log_sum = torch.empty(b, heads, s) if lse else None
        if mask is not None:
            mask = mask.squeeze(1)
            if mask.stride(-1) != 1:
                mask = mask.contiguous()
        args = _ManyArgs(q.data_ptr(), keys.data_ptr(), values.data_ptr(), _Strides(*q.stride()[:3]),
                         _Strides(*keys.stride()[:3]), _Strides(*values.stride()[:3]),
                         None if mask is None else mask.data_ptr(),
                         (_I64 * 2)(0 if mask is None or mask.shape[0] == 1 else mask.stride(0),
                                    0 if mask is None else mask.stride(1)),
                         torch.finfo(q.dtype).min / 2, b, heads, keys.shape[1], s, keys.shape[2], dim, scale,
                         out.data_ptr(), _Strides(*out.stride()[:3]), None if log_sum is None else log_sum.data_ptr(),
                         *_prefix_fields(prefix))
        status = self._call(ctypes.byref(args), torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"many-query attention failed (status {status}): out of memory for its buffers")
        return out, log_sum

    @staticmethod
    def handles(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        """Whether attention of a model of this head dim, in `dtype` on `device`, runs here."""
        return device.type == "cpu" and dtype == torch.bfloat16 and head_dim % 64 == 0

    @staticmethod
    def takes(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether it computes q over keys and values [(B,) Hkv, T, D] with this mask."""
        tensors = (q, keys, values) if mask is None else (q, keys, values, mask)
        return ManyQueryAttention.handles(q.device, q.dtype, q.shape[-1]) \
            and all(t.device == q.device and t.dtype == q.dtype and t.stride(-1) == 1 for t in tensors) \
            and q.shape[1] % keys.shape[-3] == 0 and keys.shape == values.shape and keys.shape[-1] == q.shape[-1] \
            and (keys.dim() == 3 or q.shape[0] == keys.shape[0]) \
            and (mask is None or mask.shape[-2:] == (q.shape[2], keys.shape[2]))


def _prefix_fields(prefix: tuple[torch.Tensor, torch.Tensor] | None) -> tuple:
    if prefix is None:
        return None, None, (_I64 * 2)(0, 0), 0
    keys, values = prefix
    assert keys.stride() == values.stride(), "a prefix's keys and values are laid out alike"
    return keys.data_ptr(), values.data_ptr(), (_I64 * 2)(keys.stride(0), keys.stride(1)), keys.shape[1]
