"""The offloading benchmarks' hardware figures: the disk's read bandwidth, the matmul speed,
a policy's roofline (the least time the hardware needs for it), and what a run moved over
the disk (offload_bench.py, moe_offload_bench.py, gpu_bench.py)."""
from __future__ import annotations

import os
import time
from pathlib import Path


def disk_read_bandwidth(folder: Path, nbytes: int = 1 << 30) -> float:
    """Bytes/s of O_DIRECT reads in 4 MiB requests, 4 in flight (what flexbatch issues)."""
    from concurrent.futures import ThreadPoolExecutor

    from flexbatch.storage.aligned import aligned_bytes
    from flexbatch.storage.disk import DiskFile

    buf = aligned_bytes(nbytes)
    buf.fill_(7)
    f = DiskFile(folder / "bandwidth.probe", nbytes)
    f.write_from(buf, 0, nbytes)
    os.sync()
    chunk = 4 << 20
    with ThreadPoolExecutor(4) as pool:
        start = time.perf_counter()
        list(pool.map(lambda s: f.read_into(buf, s, s + chunk), range(0, nbytes, chunk)))
        elapsed = time.perf_counter() - start
    f.close()
    (folder / "bandwidth.probe").unlink()
    return nbytes / elapsed


def matmul_flops(rows: int, hidden: int, dtype: str = "bfloat16") -> float:
    import torch
    import torch.nn.functional as F

    x = torch.randn(rows, hidden, dtype=getattr(torch, dtype))
    w = torch.randn(4 * hidden, hidden, dtype=getattr(torch, dtype))
    F.linear(x, w)
    start = time.perf_counter()
    for _ in range(3):
        F.linear(x, w)
    return 3 * 2 * rows * hidden * 4 * hidden / (time.perf_counter() - start)


def disk_read_GBps(r: dict) -> float:
    """The disk bytes a run read (weights and KV cache) per second of its generation."""
    return (r["weight_read_bytes"] + r["kv_read_bytes"]) / 1e9 / (r["prefill_s"] + r["decode_s"])


def disk_moved_bytes(r: dict) -> int:
    return r["weight_read_bytes"] + r["kv_read_bytes"] + r["kv_written_bytes"]


def disk_figures(r: dict, bandwidth: float) -> dict:
    """What the run moved over the disk: read and write GB/s over its generation, their
    share of the probes' read bandwidth, the share of the run the disk was busy, and the
    rate it gave the run while busy (which the probes, seconds long, may miss by 2x on a
    shared disk)."""
    seconds = r["prefill_s"] + r["decode_s"]
    moved = disk_moved_bytes(r)
    busy = r["disk_busy_s"]
    return {"disk_read_GBps": disk_read_GBps(r), "disk_write_GBps": r["kv_written_bytes"] / 1e9 / seconds,
            "disk_GBps": moved / 1e9 / seconds, "disk_share_of_probe": moved / seconds / bandwidth,
            "disk_busy_share": busy / seconds, "disk_busy_GBps": moved / 1e9 / busy if busy else None}


def roofline(cfg: dict, policy: dict, prompt_len: int, gen_len: int, bandwidth: float,
             dtype: str = "bfloat16", compute_share: float = 1.0) -> dict:
    """The least time the hardware needs for `policy` computing in `dtype`: per step, the
    larger of the disk time (its weights' and KV cache's bytes on disk, read and written,
    over the measured O_DIRECT read bandwidth) and the compute time (FLOPs at the dtype's
    matmul speed for the whole block, even for compressed weights: a lower bound).
    `roofline_contended_s`: the same where the matmuls run at `compute_share` of their speed
    while the disk reads (the profile's `compute_share_during_reads`; 0.62-0.67 for fp32 on
    this 2-core AVX2 VM), so a step computing longer than it reads takes its compute plus
    (1 - share) x its reads."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    batch = policy["gpu_batch_size"] * policy["num_gpu_batches"]
    layer_params = 12 * h * h + 9 * h
    size = 4 if dtype == "float32" else 2  # bytes per value
    # 4-bit data is the same bytes whatever the dtype; its steps and zeros are in the dtype
    packed = lambda values: values * (0.5 + 2 * size / 64)
    weight_bytes = packed(layer_params) if policy["compress_weight"] else size * layer_params
    weight_bytes *= layers
    weight_io = weight_bytes * (1 - policy["weights_device"] - policy["weights_host"]) / bandwidth
    cache_disk = 1 - policy["cache_device"] - policy["cache_host"]
    values = 2 * h * layers  # a token's K and V, all layers
    compressed, window = policy["compress_cache"], policy.get("cache_window", 0)
    # a compressed cache reads its rows packed, and its last `window` tokens dense as well
    stored = lambda tokens: tokens * packed(values) + min(window, tokens) * size * values if compressed \
        else tokens * size * values
    cache_io = lambda tokens: batch * cache_disk * stored(tokens + 1) / bandwidth  # the prefix read, a token written
    f_prefill = matmul_flops(min(batch * prompt_len, 8192), h, dtype)
    f_decode = matmul_flops(batch, h, dtype)
    head = 2 * cfg["vocab_size"] * h
    prefill_flops = batch * prompt_len * (2 * layer_params * layers + 2 * prompt_len * h * layers) + batch * head
    # (disk, compute) seconds of the prefill, then of each decode step
    steps = [(weight_io + cache_io(prompt_len), prefill_flops / f_prefill)]
    for i in range(1, gen_len):
        ctx = prompt_len + i
        flops = batch * (2 * layer_params * layers + 4 * ctx * h * layers + head)
        steps.append((weight_io + cache_io(ctx), flops / f_decode))
    prefill, decode = max(steps[0]), sum(max(step) for step in steps[1:])
    contended = sum(max(io, compute + (1 - compute_share) * io) for io, compute in steps)
    return {"roofline_s": prefill + decode, "roofline_prefill_s": prefill, "roofline_decode_s": decode,
            "roofline_contended_s": contended, "weight_io_s_per_step": weight_io, "flops_prefill": f_prefill,
            "flops_decode": f_decode}


def run_figures(cfg: dict, r: dict, prompt_len: int, gen_len: int, dtype: str = "bfloat16",
                compute_share: float = 1.0) -> dict:
    """A flexbatch run's roofline, disk figures and prediction error: against the mean of
    the disk probes just before and after it, and against the rate the disk gave the run
    while busy (`_at_run_disk`), which separates the cost model's own error from the disk's
    drift. With the profile's `compute_share` of matmul speed left while the disk reads,
    also the roofline of a machine whose reads slow its matmuls that much (`_contended`)."""
    seconds = r["prefill_s"] + r["decode_s"]
    around = (r["probe_before_Bps"] + r["probe_after_Bps"]) / 2
    out = roofline(cfg, r["policy"], prompt_len, gen_len, around, dtype, compute_share)
    out.update(disk_figures(r, around), roofline_fraction=out["roofline_s"] / seconds,
               compute_share_during_reads=compute_share,
               roofline_fraction_contended=out["roofline_contended_s"] / seconds,
               prediction_error=r["predicted_throughput"] / r["throughput"] - 1)
    if out["disk_busy_GBps"]:
        at_run = roofline(cfg, r["policy"], prompt_len, gen_len, out["disk_busy_GBps"] * 1e9, dtype)["roofline_s"]
        out.update(roofline_fraction_at_run_disk=at_run / seconds,
                   prediction_error_at_run_disk=r["predicted_throughput_at_run_disk"] / r["throughput"] - 1)
    return out
