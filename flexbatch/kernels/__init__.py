"""Compute kernels below the model families: linear layers over each weight format
(`linear`), attention over a KV cache wherever its segments live (`attention`), and the one
group-wise quantizer weights and KV cache share (`quant`); decode attention, the greedy pick
and fused elementwise steps (`fused`) in C (`native`), built at first use.

Nothing here imports models/, storage/, weights/ or engine/ (docs/ARCHITECTURE.md). What a
kernel cannot know from its inputs, such as which 4-bit kernel is faster on this machine,
is handed to it (`KernelChoice`), never measured or read from the environment here.
"""
from . import fused
from .attention import AttentionStep, CacheSegments, CacheStream, SharedKeys, cached_attention, grouped_attention
from .choice import KernelChoice
from .linear import dequantize_for_block, linear
from .native import DecodeKernel, NativeBuildError, build_decode_kernel

__all__ = ["fused", "AttentionStep", "CacheSegments", "CacheStream", "DecodeKernel", "KernelChoice", "NativeBuildError",
           "SharedKeys", "build_decode_kernel", "cached_attention", "dequantize_for_block", "grouped_attention",
           "linear"]
