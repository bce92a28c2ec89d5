"""What a model runs with, decided above the engine: its policy as the model's files amend
it (a compressed store's packing, the source's quantization grid), and which kernel
multiplies by its 4-bit weights."""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .config import Policy
from .default_model import kernels_dir
from .errors import ConfigError
from .kernels import DecodeKernel, KernelChoice, NativeBuildError, build_decode_kernel, fused
from .models import get_family
from .weights.loader import layer_weight_grid

INT4_ROWS_ENV = "FLEXBATCH_INT4_FUSED_MAX_ROWS"
NATIVE_ENV = "FLEXBATCH_NATIVE_KERNELS"


def decode_kernel() -> DecodeKernel | None:
    """The C decode attention kernel (kernels/native.py), built on first use into the cache
    folder with the machine's C compiler; None with FLEXBATCH_NATIVE_KERNELS=0, or if it
    cannot be built (a warning says why, once): PyTorch's attention runs instead. The fused
    elementwise kernels built with it are switched on (or off) with it."""
    wanted = os.environ.get(NATIVE_ENV, "1").strip() != "0"
    kernel = _built_decode_kernel(str(kernels_dir())) if wanted else None
    fused.use(kernel and kernel.fused)  # the models' elementwise steps too, process-wide
    return kernel


@functools.cache
def _built_decode_kernel(folder: str) -> DecodeKernel | None:
    try:
        return build_decode_kernel(Path(folder))
    except NativeBuildError as e:
        print(f"flexbatch: decoding without the C attention kernel, which reads only the keys each "
              f"sequence sees ({e}). Install a C compiler with OpenMP (gcc) on an AVX-512 CPU for it, "
              f"or set {NATIVE_ENV}=0 to silence this.", file=sys.stderr)
        return None


def kernel_choice(policy: Policy, device: torch.device, dtype: torch.dtype,
                  offload_dir: str | Path | None = None) -> KernelChoice:
    """Which kernel multiplies by 4-bit weights, decided once here, above the engine: the
    FLEXBATCH_INT4_FUSED_MAX_ROWS override (0: never the fused kernel), else the rates of the
    hardware profile the planner uses (`flexbatch profile`; measured now if there is none)."""
    quant = policy.weight_quant
    if quant is None or quant.bits != 4 or device.type != "cpu":
        return KernelChoice()  # the fused kernel is CPU-only and 4-bit only
    forced = os.environ.get(INT4_ROWS_ENV)
    if forced is not None:
        if not forced.strip().isdigit():
            raise ConfigError(f"{INT4_ROWS_ENV} must be a row count >= 0, got {forced!r}")
        return KernelChoice(int(forced))
    from .profiling import hardware_profile

    profile = hardware_profile(offload_dir, log=lambda msg: print(msg, file=sys.stderr))
    return profile.kernel_choice(dtype)


def effective_policy(opened, policy: Policy | None, batch_size: int) -> Policy | None:
    """The policy a model runs with: a compressed store's packing, and the source's
    quantization grid for compressed weights without a group size, filled in."""
    return with_source_grid(opened, get_family(opened.config), with_store_compression(opened, policy, batch_size))


def with_store_compression(opened, policy: Policy | None, batch_size: int) -> Policy | None:
    """A store converted with --compress-weight runs with its weights compressed: the policy
    (everything in memory if none was given) gets the store's bits and group size."""
    packing = getattr(opened.source, "packing", None)
    found = {packing(n) for n in opened.source.names()} - {None} if packing else set()
    if not found or (policy is not None and policy.compress_weight):
        return policy
    bits, group = found.pop()
    base = policy or Policy(gpu_batch_size=batch_size)
    return replace(base, compress_weight=True, compress_bits=bits, compress_group=group)


def with_source_grid(opened, family, policy: Policy | None) -> Policy | None:
    """Compressed weights with no group size given are grouped on the grid the source was
    quantized on, if it was (see Policy.group_size): the default model is Q4_1, where groups
    of 64 cost 44% perplexity and groups of 32 nothing. Weights and KV cache share the size."""
    if policy is None or not policy.compress_weight or policy.compress_group is not None:
        return policy
    grid = layer_weight_grid(opened.config, family, opened.source)
    return policy if grid is None else replace(policy, compress_group=grid)
