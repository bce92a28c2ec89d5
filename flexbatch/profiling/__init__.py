"""Measuring this machine for the planner: the hardware profile, measured once and cached.

A profile is reused while the machine looks the same (CPU model, core count, total memory,
torch version, offload folder's filesystem); `flexbatch profile --force` measures again.
The planner (planner/) reads profiles and measures nothing; the probes live here, above both
the planner and the engine, because one of them runs the engine itself (engine_probe.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from ..malloc import gives_back_freed_memory
from ..planner.profile import ComputeRates, DiskRates, HardwareProfile
from .cpu import (
    disk_read_now,
    measure_attention,
    measure_dequantize,
    measure_disk,
    measure_kv_decode,
    measure_matmul,
    measure_prompt_attention,
)

# bump when what is measured changes (11: probes read into huge pages; 12: reads while computing
# timed by the reads, and attention in both dtypes; 13: reads while computing in the CPU's
# compute dtype): cached profiles are measured again
PROFILE_VERSION = 13

__all__ = ["at_current_speed", "hardware_profile", "load_or_measure", "measure"]


def hardware_profile(offload_dir: Path | None = None, force: bool = False, log=lambda msg: None,
                     disk_only: bool = False) -> HardwareProfile:
    """This machine's profile, cached in flexbatch's cache folder; the disk measured is the
    one `offload_dir` is on (default: the cache folder's)."""
    from ..default_model import cache_dir

    folder = Path(offload_dir) if offload_dir else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return load_or_measure(cache_dir() / "hardware.json", folder, force=force, log=log, disk_only=disk_only)


def fingerprint(folder: Path) -> str:
    """What identifies the machine a profile was measured on (and this code's measurements)."""
    import psutil

    from ..devices import cpu_name

    cpu = cpu_name()
    dev = os.stat(folder).st_dev
    gpu = f"|gpu {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"v{PROFILE_VERSION}|{cpu}|{os.cpu_count()}|{psutil.virtual_memory().total}|torch {torch.__version__}"
            f"|dev {dev}{gpu}")


SPOT_ROWS = 512  # a spot check of compute speed: one point of the matmul table, about a second


@gives_back_freed_memory  # its fp32 spot check frees ~140 MB of heap
def at_current_speed(profile: HardwareProfile, dtype: torch.dtype = torch.bfloat16,
                     disk_folder: Path | None = None) -> HardwareProfile:
    """The profile with its compute-bound rates (matmul tables, dequantization) scaled by how
    fast the machine multiplies now against when it was profiled, and with `disk_folder`
    its disk rates by how fast that disk reads now. A shared or throttled machine drifts:
    this VM measured 0.42 and then 0.35 TFLOP/s on the same bf16 matmul within a day, and its
    disk 2.1 and then 1.5 GB/s, which the cost model would otherwise take for its own error.
    Memory-bound rates stay."""
    now = disk_read_now(disk_folder) if disk_folder is not None else None
    if now:
        profile = replace(profile, disk=profile.disk.scaled(now / profile.disk.read_bps))
    key = str(dtype).removeprefix("torch.")
    then = profile.cpu.matmul_flops.get(key, {}).get(SPOT_ROWS)
    if not then:
        return profile
    factor = measure_matmul(dtype, rows_list=(SPOT_ROWS,))[SPOT_ROWS] / then
    return replace(profile, cpu=profile.cpu.scaled(factor))


def measure(folder: Path, log=lambda msg: None) -> HardwareProfile:
    import psutil

    log("measuring disk bandwidth (O_DIRECT)...")
    disk = measure_disk_rates(folder)
    flops = {}
    for dtype in (torch.bfloat16, torch.float32):
        log(f"measuring {str(dtype).removeprefix('torch.')} matmul throughput...")
        flops[str(dtype).removeprefix("torch.")] = measure_matmul(dtype)
    log("measuring compressed weights: the fused int4 kernel and dequantization...")
    fused = measure_matmul(torch.bfloat16, fused_int4=True)
    if fused:
        flops["int4"] = fused
    dequantize = {f"int{bits}": measure_dequantize(bits) for bits in (4, 8)}
    log("measuring attention and KV cache dequantization...")
    kernel = native_kernels()
    attention = {str(dtype).removeprefix("torch."): measure_attention(dtype, kernel=kernel)
                 for dtype in (torch.bfloat16, torch.float32)}
    kv_decode = measure_kv_decode(torch.bfloat16, fused_ops=kernel and kernel.fused)
    prompt_attention = measure_prompt_attention(torch.bfloat16, kernel=kernel)
    cpu = ComputeRates(flops, attention, kv_decode, dequantize, prompt_attention)
    gpu = None
    if torch.cuda.is_available():
        from .gpu import measure_gpu

        gpu = measure_gpu(log)
    return HardwareProfile(fingerprint(folder), psutil.virtual_memory().total, cpu, disk, gpu)


def measure_disk_rates(folder: Path) -> DiskRates:
    """The disk's rates, its reads overlapped with matmuls in the dtype the engine computes
    in on this CPU by default (`devices.default_dtype`): how much the reads slow the matmuls
    depends on the dtype, and the planner prices overlapped reads with it."""
    from ..devices import default_dtype

    return DiskRates(*measure_disk(folder, default_dtype(torch.device("cpu"))))


def native_kernels():
    """The C kernels the engine computes attention with on this machine, as it builds them
    (model_policy.decode_kernel, whose folder this is), or None where they cannot be built:
    the profile measures what the engine will run."""
    from ..default_model import kernels_dir
    from ..kernels import NativeBuildError, build_decode_kernel

    try:
        return build_decode_kernel(kernels_dir())
    except NativeBuildError:
        return None


@gives_back_freed_memory
def load_or_measure(cache_file: Path, offload_folder: Path, force: bool = False, log=lambda msg: None,
                    disk_only: bool = False) -> HardwareProfile:
    """The cached profile if it matches this machine, else a new measurement (then cached).
    disk_only re-measures only the disk fields of a matching profile: a shared or virtual
    disk's speed drifts over hours (compute drifts too; see `at_current_speed`)."""
    if disk_only and cache_file.is_file():
        profile = load_or_measure(cache_file, offload_folder, log=log)
        log("measuring disk bandwidth (O_DIRECT)...")
        profile = replace(profile, disk=measure_disk_rates(offload_folder))
        cache_file.write_text(json.dumps(profile.to_json(), indent=1))
        return profile
    if cache_file.is_file() and not force:
        try:
            profile = HardwareProfile.from_json(json.loads(cache_file.read_text()))
            if profile.fingerprint == fingerprint(offload_folder):
                return profile
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass  # a stale or damaged cache is measured again
    profile = measure(offload_folder, log)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(profile.to_json(), indent=1))
    return profile
