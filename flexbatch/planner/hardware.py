"""What the cost model needs to know about this machine, measured once and cached.

A profile is reused while the machine looks the same (CPU model, core count, total memory,
torch version, offload folder's filesystem); `flexbatch profile --force` measures again.
"""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..kernels import KernelChoice
from .engine_probe import operation_seconds
from .rates import GpuRates, int_rows, table_rate

CPU = torch.device("cpu")
MATMUL_ROWS = (1, 8, 32, 128, 512, 2048)  # token rows per matmul: decode batches .. prefill chunks
GPU_MATMUL_ROWS = (1, 8, 32, 128, 512, 2048, 8192)  # a GPU reaches its peak at more rows
PROBE_BYTES = 512 << 20
PROFILE_VERSION = 6  # bump when the measured fields change, so cached profiles are redone
CHUNK = 4 << 20


@dataclass(frozen=True)
class HardwareProfile:
    fingerprint: str
    disk_read_bps: float
    disk_write_bps: float
    memory_bytes: int  # total host RAM
    # matmul FLOP/s by number of rows (interpolated in between): "bfloat16", "float32", and
    # "int4" for torch's fused kernel on 4-bit weights (absent where torch has none)
    matmul_flops: dict[str, dict[int, float]] = field(default_factory=dict)
    # disk reads while the CPU multiplies matrices on all cores, as overlapped I/O runs
    disk_read_busy_bps: float | None = None
    # the share of matmul speed left while the disk reads (overlapped I/O slows compute)
    compute_share_during_reads: float = 1.0
    # decode attention: bytes of K and V (compute dtype) attended per second
    attention_bps: float = float("inf")
    # compressed KV cache: dequantized bytes per second
    kv_decode_bps: float = float("inf")
    # compressed weights: parameters dequantized per second, by format ("int4", "int8")
    dequantize_params_per_s: dict[str, float] = field(default_factory=dict)
    # the GPU's speeds and its link to host RAM (None without a GPU)
    gpu: GpuRates | None = None

    def flops(self, dtype: torch.dtype, rows: int, packed_bits: int | None = None) -> float | None:
        """Measured CPU FLOP/s for a matmul with `rows` rows (see `table_rate`)."""
        return table_rate(self.matmul_flops, dtype, rows, packed_bits)

    def kernel_choice(self, dtype: torch.dtype) -> KernelChoice:
        """Where the engine switches from the fused int4 kernel to dequantize + matmul, from
        the rates measured here: the trade the cost model prices (`weight_matmul_seconds`),
        so the engine and the planner decide alike from one measurement."""
        if not self.matmul_flops.get("int4"):
            return KernelChoice()  # this torch has no fused kernel
        return KernelChoice.from_rates(lambda rows: self.flops(dtype, rows, 4), lambda rows: self.flops(dtype, rows),
                                       self.dequantize_params_per_s.get("int4", 0.0))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "HardwareProfile":
        optional = {k: data[k] for k in ("disk_read_busy_bps", "compute_share_during_reads", "attention_bps",
                                         "kv_decode_bps", "dequantize_params_per_s") if k in data}
        gpu = GpuRates.from_json(data["gpu"]) if data.get("gpu") else None
        return cls(data["fingerprint"], data["disk_read_bps"], data["disk_write_bps"], data["memory_bytes"],
                   int_rows(data["matmul_flops"]), gpu=gpu, **optional)


def fingerprint(folder: Path) -> str:
    import psutil

    from ..devices import cpu_name

    cpu = cpu_name()
    dev = os.stat(folder).st_dev
    gpu = f"|gpu {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"v{PROFILE_VERSION}|{cpu}|{os.cpu_count()}|{psutil.virtual_memory().total}|torch {torch.__version__}"
            f"|dev {dev}{gpu}")


def measure_disk(folder: Path, nbytes: int = PROBE_BYTES) -> tuple[float, float, float, float]:
    """(read, write, read while computing) bytes/s with O_DIRECT, 4 MiB requests, 4 in
    flight, as the engine does; the third with bf16 matmuls running on the main thread, whose
    speed then, as a share of their speed alone, is the fourth."""
    from ..storage.aligned import aligned_bytes
    from ..storage.disk import DiskFile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flexbatch-disk-probe"
    buf = aligned_bytes(nbytes)
    buf.fill_(1)
    file = DiskFile(path, nbytes)
    chunks = range(0, nbytes, CHUNK)
    try:
        with ThreadPoolExecutor(4) as pool:
            start = time.perf_counter()
            list(pool.map(lambda s: file.write_from(buf, s, s + CHUNK), chunks))
            os.fsync(file.fd)
            write = nbytes / (time.perf_counter() - start)
            start = time.perf_counter()
            list(pool.map(lambda s: file.read_into(buf, s, s + CHUNK), chunks))
            read = nbytes / (time.perf_counter() - start)
            busy, share = _read_while_computing(pool, file, buf, chunks, nbytes)
    finally:
        file.close()
        path.unlink(missing_ok=True)
    return read, write, busy, share


def _read_while_computing(pool, file, buf, chunks, nbytes: int, passes: int = 3) -> tuple[float, float]:
    """Read the probe `passes` times over while the main thread multiplies matrices; the
    matmul rate is compared with its rate alone, measured just before and just after."""
    x = torch.randn(512, 2048, dtype=torch.bfloat16)
    w = torch.randn(8192, 2048, dtype=torch.bfloat16)
    multiply = lambda: torch.nn.functional.linear(x, w)  # releases the GIL, keeps the cores busy

    def rate(until) -> float:
        start, count = time.perf_counter(), 0
        while not until(time.perf_counter() - start):
            multiply()
            count += 1
        return count / (time.perf_counter() - start)

    multiply()
    alone = rate(lambda elapsed: elapsed > 0.5)
    pending = [pool.submit(file.read_into, buf, s, s + CHUNK) for _ in range(passes) for s in chunks]
    start = time.perf_counter()
    during = rate(lambda elapsed: all(f.done() for f in pending))
    seconds = time.perf_counter() - start
    for f in pending:
        f.result()
    alone = (alone + rate(lambda elapsed: elapsed > 0.5)) / 2
    return passes * nbytes / seconds, min(1.0, during / alone)


def measure_attention(dtype: torch.dtype, batch: int = 16, heads: int = 16, tokens: int = 512,
                      head_dim: int = 64, device: torch.device = CPU, token_major: bool = False) -> float:
    """Decode attention's speed in K and V bytes per second, over a cache larger than L3;
    token_major: over K and V laid out token by token, as host-RAM rows are on a GPU machine."""
    from ..kernels import grouped_attention

    q = torch.randn(batch, heads, 1, head_dim, device=device).to(dtype)
    if token_major:
        keys, values = (torch.randn(tokens, batch, heads, head_dim, device=device).to(dtype).permute(1, 2, 0, 3)
                        for _ in range(2))
    else:
        keys, values = (torch.randn(batch, heads, tokens, head_dim, device=device).to(dtype) for _ in range(2))
    mask = torch.zeros(batch, 1, 1, tokens, dtype=dtype, device=device)
    seconds = _best_seconds(lambda: grouped_attention(q, keys, values, mask, head_dim ** -0.5), device=device)
    return 2 * keys.numel() * keys.element_size() / seconds


def measure_kv_decode(dtype: torch.dtype, batch: int = 16, heads: int = 16, tokens: int = 512,
                      head_dim: int = 64, device: torch.device = CPU) -> float:
    """Dequantization of a 4-bit KV cache block, in bytes of the compute dtype per second."""
    from ..kernels.quant import QuantConfig
    from ..storage.kv_rows import RowCodec

    codec = RowCodec(batch, heads, head_dim, dtype, QuantConfig(4, 64))
    rows = codec.encode(torch.randn(batch, heads, tokens, head_dim, device=device).to(dtype))
    seconds = _best_seconds(lambda: codec.decode(rows), device=device)
    return batch * heads * tokens * head_dim * torch.empty((), dtype=dtype).element_size() / seconds


def _best_seconds(fn, repeats: int = 5, device: torch.device = CPU) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # GPU kernels run async
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_matmul(dtype: torch.dtype, hidden: int = 2048, fused_int4: bool = False,
                   rows_list: tuple[int, ...] = MATMUL_ROWS, device: torch.device = CPU) -> dict[int, float]:
    """FLOP/s of one transformer layer's matmuls (four [h, h] projections, an [4h, h] and an
    [h, 4h] MLP matrix, h = hidden) on x of `rows` rows, best of a few runs. Small square
    matrices run at a lower rate than the MLP's at few rows, so a layer's mix is what the
    cost model needs. With fused_int4: torch's fused kernel on the matrices packed to 4 bits
    ({} without one)."""
    from ..kernels.packed import fused_int4_matmul, fused_kernel_available, pack_linear

    shapes = [(hidden, hidden)] * 4 + [(4 * hidden, hidden), (hidden, 4 * hidden)]
    weights = [torch.randn(n, k, dtype=dtype, device=device) for n, k in shapes]
    if fused_int4:
        if not fused_kernel_available():
            return {}
        packed = [pack_linear(w, 4) for w in weights]
        multiply = lambda x, i: fused_int4_matmul(x, packed[i])
    else:
        multiply = lambda x, i: torch.nn.functional.linear(x, weights[i])
    flop_per_row = sum(2 * n * k for n, k in shapes)
    out = {}
    for rows in rows_list:
        inputs = {k: torch.randn(rows, k, dtype=dtype, device=device) for k in (hidden, 4 * hidden)}
        layer = lambda: [multiply(inputs[k], i) for i, (_, k) in enumerate(shapes)]
        repeats = max(1, min(10, 512 // rows))
        seconds = _best_seconds(lambda: [layer() for _ in range(repeats)], repeats=3, device=device) / repeats
        out[rows] = rows * flop_per_row / seconds
    return out


SPOT_ROWS = 512  # a spot check of compute speed: one point of the matmul table, about a second


def at_current_speed(profile: HardwareProfile, dtype: torch.dtype = torch.bfloat16) -> HardwareProfile:
    """The profile with its compute-bound rates (matmul tables, dequantization) scaled by how
    fast the machine multiplies now against when it was profiled. A shared or throttled CPU
    drifts: this VM measured 0.42 and then 0.35 TFLOP/s on the same bf16 matmul within a day,
    which the cost model would otherwise take for its own error. Memory-bound rates stay."""
    key = str(dtype).removeprefix("torch.")
    then = profile.matmul_flops.get(key, {}).get(SPOT_ROWS)
    if not then:
        return profile
    factor = measure_matmul(dtype, rows_list=(SPOT_ROWS,))[SPOT_ROWS] / then
    scaled = {name: {rows: v * factor for rows, v in table.items()} for name, table in profile.matmul_flops.items()}
    dequantize = {name: v * factor for name, v in profile.dequantize_params_per_s.items()}
    return replace(profile, matmul_flops=scaled, dequantize_params_per_s=dequantize)


def measure_dequantize(bits: int, hidden: int = 2048, device: torch.device = CPU) -> float:
    """Parameters per second dequantized from `bits`-bit packed weights into a dense buffer."""
    from ..kernels.packed import dequantize_transposed, pack_linear

    packed = pack_linear(torch.randn(4 * hidden, hidden, dtype=torch.bfloat16), bits).to(device)
    buffer = torch.empty(hidden, 4 * hidden, dtype=torch.bfloat16, device=device)
    return 4 * hidden * hidden / _best_seconds(lambda: dequantize_transposed(packed, buffer), device=device)


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
    attention = measure_attention(dtype, batch=64, device=gpu)
    kv_decode = measure_kv_decode(dtype, batch=64, device=gpu)
    log("measuring CPU attention over host-RAM rows and the engine's per-operation time...")
    # as large as a GPU batch's cache and laid out as host rows are (a server's L3 holds the
    # small probe), while the link streams weights out of the same host memory
    cpu_attention = while_copying_to_gpu(
        lambda: measure_attention(dtype, batch=64, heads=32, tokens=256, token_major=True))
    return GpuRates(torch.cuda.get_device_name(gpu), torch.cuda.get_device_properties(gpu).total_memory, to_gpu,
                    to_host, flops, attention, kv_decode, dequantize, cpu_attention, operation_seconds(gpu, dtype))


def measure(folder: Path, log=lambda msg: None) -> HardwareProfile:
    import psutil

    log("measuring disk bandwidth (O_DIRECT)...")
    read, write, busy, share = measure_disk(folder)
    flops = {}
    for dtype in (torch.bfloat16, torch.float32):
        log(f"measuring {str(dtype).removeprefix('torch.')} matmul throughput...")
        flops[str(dtype).removeprefix("torch.")] = measure_matmul(dtype)
    log("measuring compressed weights: the fused int4 kernel and dequantization...")
    fused = measure_matmul(torch.bfloat16, fused_int4=True)
    if fused:
        flops["int4"] = fused
    dequantize = {f"int{bits}": measure_dequantize(bits) for bits in (4, 8)}
    log("measuring decode attention and KV cache dequantization...")
    attention, kv_decode = measure_attention(torch.bfloat16), measure_kv_decode(torch.bfloat16)
    gpu = measure_gpu(log) if torch.cuda.is_available() else None
    return HardwareProfile(fingerprint(folder), read, write, psutil.virtual_memory().total, flops, busy, share,
                           attention, kv_decode, dequantize, gpu)


def load_or_measure(cache_file: Path, offload_folder: Path, force: bool = False, log=lambda msg: None,
                    disk_only: bool = False) -> HardwareProfile:
    """The cached profile if it matches this machine, else a new measurement (then cached).
    disk_only re-measures only the disk fields of a matching profile: a shared or virtual
    disk's speed drifts over hours (compute drifts too; see `at_current_speed`)."""
    if disk_only and cache_file.is_file():
        profile = load_or_measure(cache_file, offload_folder, log=log)
        log("measuring disk bandwidth (O_DIRECT)...")
        read, write, busy, share = measure_disk(offload_folder)
        profile = replace(profile, disk_read_bps=read, disk_write_bps=write, disk_read_busy_bps=busy,
                          compute_share_during_reads=share)
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
