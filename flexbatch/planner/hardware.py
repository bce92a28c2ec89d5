"""What the cost model needs to know about this machine, measured once and cached.

A profile is reused while the machine looks the same (CPU model, core count, total memory,
torch version, offload folder's filesystem); `flexbatch profile --force` measures again.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MATMUL_ROWS = (1, 8, 32, 128, 512, 2048)  # token rows per matmul: decode batches .. prefill chunks
PROBE_BYTES = 512 << 20
PROFILE_VERSION = 3  # bump when the measured fields change, so cached profiles are redone
CHUNK = 4 << 20


@dataclass(frozen=True)
class HardwareProfile:
    fingerprint: str
    disk_read_bps: float
    disk_write_bps: float
    memory_bytes: int  # total host RAM
    # matmul FLOP/s by number of rows (interpolated in between): "bfloat16", "float32", and
    # "int4" / "int8" for compressed bf16 weights (fused kernel or dequantize + matmul)
    matmul_flops: dict[str, dict[int, float]] = field(default_factory=dict)
    # disk reads while the CPU multiplies matrices on all cores, as overlapped I/O runs
    disk_read_busy_bps: float | None = None

    def flops(self, dtype: torch.dtype, rows: int, packed_bits: int | None = None) -> float:
        """Measured FLOP/s for a matmul with `rows` rows, linear between measured points;
        `packed_bits` for weights compressed to that many bits."""
        key = f"int{packed_bits}" if packed_bits else str(dtype).removeprefix("torch.")
        table = self.matmul_flops.get(key)
        if not table:
            table = self.matmul_flops["float32"]
        points = sorted((int(k), v) for k, v in table.items())
        if rows <= points[0][0]:
            return points[0][1] * rows / points[0][0]
        for (r0, f0), (r1, f1) in zip(points, points[1:]):
            if rows <= r1:
                return f0 + (f1 - f0) * (rows - r0) / (r1 - r0)
        return points[-1][1]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "HardwareProfile":
        flops = {k: {int(r): float(f) for r, f in v.items()} for k, v in data["matmul_flops"].items()}
        return cls(data["fingerprint"], data["disk_read_bps"], data["disk_write_bps"], data["memory_bytes"], flops,
                   data.get("disk_read_busy_bps"))


def fingerprint(folder: Path) -> str:
    import psutil

    from ..hardware import cpu_name

    cpu = cpu_name()
    dev = os.stat(folder).st_dev
    return (f"v{PROFILE_VERSION}|{cpu}|{os.cpu_count()}|{psutil.virtual_memory().total}|torch {torch.__version__}"
            f"|dev {dev}")


def measure_disk(folder: Path, nbytes: int = PROBE_BYTES) -> tuple[float, float, float]:
    """(read, write, read while computing) bytes/s with O_DIRECT, 4 MiB requests, 4 in
    flight, as the engine does; the last with bf16 matmuls running on the main thread."""
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
            busy = _read_while_computing(pool, file, buf, chunks, nbytes)
    finally:
        file.close()
        path.unlink(missing_ok=True)
    return read, write, busy


def _read_while_computing(pool, file, buf, chunks, nbytes: int) -> float:
    x = torch.randn(512, 2048, dtype=torch.bfloat16)
    w = torch.randn(8192, 2048, dtype=torch.bfloat16)
    start = time.perf_counter()
    pending = [pool.submit(file.read_into, buf, s, s + CHUNK) for s in chunks]
    while not all(f.done() for f in pending):
        torch.nn.functional.linear(x, w)  # releases the GIL, keeps the cores busy
    for f in pending:
        f.result()
    return nbytes / (time.perf_counter() - start)


def measure_matmul(dtype: torch.dtype, hidden: int = 2048, packed_bits: int | None = None) -> dict[int, float]:
    """FLOP/s of x [rows, hidden] times a [4*hidden, hidden] weight. With packed_bits, the
    weight is a PackedLinear as one layer load gives it: fresh, so large batches pay its
    dequantization on every call (as a layer used by one GPU batch does)."""
    from ..storage.packed_linear import linear, pack_linear

    w = torch.randn(4 * hidden, hidden).to(dtype)
    if packed_bits:
        packed = pack_linear(w, packed_bits)
        multiply = lambda x: linear(x, packed.to(x.device))
    else:
        multiply = lambda x: torch.nn.functional.linear(x, w)
    out = {}
    for rows in MATMUL_ROWS:
        x = torch.randn(rows, hidden).to(dtype)
        multiply(x)
        repeats = max(2, min(50, 4096 // rows))
        start = time.perf_counter()
        for _ in range(repeats):
            multiply(x)
        out[rows] = repeats * 2 * rows * hidden * 4 * hidden / (time.perf_counter() - start)
    return out


def measure(folder: Path, log=lambda msg: None) -> HardwareProfile:
    import psutil

    log("measuring disk bandwidth (O_DIRECT)...")
    read, write, busy = measure_disk(folder)
    flops = {}
    for dtype in (torch.bfloat16, torch.float32):
        log(f"measuring {str(dtype).removeprefix('torch.')} matmul throughput...")
        flops[str(dtype).removeprefix("torch.")] = measure_matmul(dtype)
    for bits in (4, 8):
        log(f"measuring matmul throughput with {bits}-bit compressed weights...")
        flops[f"int{bits}"] = measure_matmul(torch.bfloat16, packed_bits=bits)
    return HardwareProfile(fingerprint(folder), read, write, psutil.virtual_memory().total, flops, busy)


def load_or_measure(cache_file: Path, offload_folder: Path, force: bool = False, log=lambda msg: None) -> HardwareProfile:
    """The cached profile if it matches this machine, else a new measurement (then cached)."""
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
