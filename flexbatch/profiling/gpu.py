"""Measuring the GPU: the host-GPU link, the GPU's compute rates, and the CPU's attention
beside it (the GPU part of the hardware profile)."""
from __future__ import annotations

import threading
import time

import torch

from ..planner.profile import ComputeRates, GpuRates
from .cpu import measure_attention, measure_dequantize, measure_kv_decode, measure_matmul, measure_prompt_attention
from .engine_probe import operation_seconds

GPU_MATMUL_ROWS = (1, 8, 32, 128, 512, 2048, 8192)  # a GPU reaches its peak at more rows


def measure_gpu_link(nbytes: int = 256 << 20) -> tuple[float, float]:
    """(host to GPU, GPU to host) bytes/s of one large copy between pinned host memory and
    the GPU, best of 3: how fast weights and KV rows kept off the GPU reach it."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def copy(dst, src) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    return tuple(nbytes / min(copy(dst, src) for _ in range(3)) for dst, src in ((gpu, host), (host, gpu)))


def while_copying_to_gpu(fn, nbytes: int = 256 << 20):
    """fn() while another thread keeps the host-to-GPU link busy with pinned copies, as the
    engine's weight streaming does: both read host memory, so CPU work bound by memory
    bandwidth runs slower then."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()

    def copy() -> None:
        with torch.cuda.stream(stream):
            gpu.copy_(host, non_blocking=True)
        stream.synchronize()

    return while_repeating(fn, copy)


def while_repeating(fn, background):
    """fn()'s result, with background() called over and over on another thread meanwhile."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            background()

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    try:
        return fn()
    finally:
        stop.set()
        worker.join()


def measure_gpu(log=lambda msg: None) -> GpuRates:
    """The GPU's part of the profile: the pinned link both ways, then the CPU's compute
    measurements repeated on the GPU (at a hidden size of 4096: models that need offloading
    on a GPU are that large or larger, and a GPU's rate depends on the matrix size)."""
    from ..devices import default_dtype

    gpu = torch.device("cuda")
    dtype = default_dtype(gpu)  # bf16, or fp16 on GPUs without bf16
    log("measuring the host-GPU link (pinned copies)...")
    to_gpu, to_host = measure_gpu_link()
    log("measuring GPU matmul, attention and dequantization speed...")
    flops = {str(dtype).removeprefix("torch."): measure_matmul(dtype, 4096, rows_list=GPU_MATMUL_ROWS, device=gpu)}
    dequantize = {f"int{bits}": measure_dequantize(bits, 4096, device=gpu) for bits in (4, 8)}
    attention = {str(dtype).removeprefix("torch."): measure_attention(dtype, batch=64, device=gpu)}
    kv_decode = measure_kv_decode(dtype, batch=64, device=gpu)
    prompt_attention = measure_prompt_attention(dtype, batch=64, device=gpu)
    log("measuring CPU attention over host-RAM rows and the engine's per-operation time...")
    # as large as a GPU batch's cache and laid out as host rows are (a server's L3 holds the
    # small probe), while the link streams weights out of the same host memory
    cpu_attention = while_copying_to_gpu(
        lambda: measure_attention(dtype, batch=64, heads=32, tokens=256, token_major=True))
    return GpuRates(torch.cuda.get_device_name(gpu), torch.cuda.get_device_properties(gpu).total_memory, to_gpu,
                    to_host, ComputeRates(flops, attention, kv_decode, dequantize, prompt_attention), cpu_attention,
                    operation_seconds(gpu, dtype))


