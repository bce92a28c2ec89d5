"""Measuring the CPU and the disk: the rates of the hardware profile (planner/profile.py).

Each probe runs what the engine runs (O_DIRECT requests of the engine's size, a layer's mix
of matmuls, the attention and dequantization kernels) and reports a rate.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..kernels import DecodeKernel

CPU = torch.device("cpu")
MATMUL_ROWS = (1, 8, 32, 128, 512, 2048)  # token rows per matmul: decode batches .. prefill chunks
PROBE_BYTES = 512 << 20
CHUNK = 4 << 20  # a weight read request: several in flight
KV_REQUEST = 32 << 20  # a K or V prefix of one (layer, GPU batch) as decode reads it: one request
DRIFT_PROBE_BYTES = 256 << 20
ATTENTION_BYTES = 512 << 20  # K and V a decode attention probe reads: more than any L3 here (480 MiB on one)


def measure_disk(folder: Path, dtype: torch.dtype,
                 nbytes: int = PROBE_BYTES) -> tuple[float, float, float, float, float]:
    """(read, write, read while computing) bytes/s with O_DIRECT, 4 MiB requests, 4 in
    flight, as the engine reads weights; the third with `dtype` matmuls running on the main
    thread, whose speed then, as a share of their speed alone, is the fourth. The fifth:
    reads while computing as decode reads the KV cache, KV_REQUEST at a time, one in flight.
    The share depends on the dtype: on an AVX2-only CPU fp32 matmuls lose 38% to the reads,
    bf16 ones (emulated, 5x slower) 30%."""
    from ..storage.aligned import aligned_bytes
    from ..storage.disk import DiskFile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flexbatch-disk-probe"
    buf = aligned_bytes(nbytes)
    buf.fill_(1)
    file = DiskFile(path, nbytes)
    chunks = range(0, nbytes, CHUNK)
    multiply = _probe_multiply(dtype)
    try:
        with ThreadPoolExecutor(4) as pool:
            start = time.perf_counter()
            list(pool.map(lambda s: file.write_from(buf, s, s + CHUNK), chunks))
            os.fsync(file.fd)
            write = nbytes / (time.perf_counter() - start)
            start = time.perf_counter()
            list(pool.map(lambda s: file.read_into(buf, s, s + CHUNK), chunks))
            read = nbytes / (time.perf_counter() - start)
            busy, share = _read_while_computing(pool, file, buf, nbytes, CHUNK, multiply=multiply)
        with ThreadPoolExecutor(1) as one:
            kv_busy, _ = _read_while_computing(one, file, buf, nbytes, KV_REQUEST, passes=1, multiply=multiply)
    finally:
        file.close()
        path.unlink(missing_ok=True)
    return read, write, busy, share, kv_busy


def disk_read_now(folder: Path, nbytes: int = DRIFT_PROBE_BYTES) -> float | None:
    """O_DIRECT read bytes/s of a fresh file, as `measure_disk` reads (about half a second):
    how fast the disk is now, against a profile measured earlier. None where the folder's
    disk cannot take the probe file (full, read-only): the profile's rates stand then."""
    from ..storage.aligned import aligned_bytes
    from ..storage.disk import DiskFile

    path = Path(folder) / "flexbatch-disk-drift-probe"
    buf = aligned_bytes(nbytes)
    try:
        file = DiskFile(path, nbytes)
        try:
            file.write_from(buf, 0, nbytes)
            with ThreadPoolExecutor(4) as pool:
                start = time.perf_counter()
                list(pool.map(lambda s: file.read_into(buf, s, s + CHUNK), range(0, nbytes, CHUNK)))
                return nbytes / (time.perf_counter() - start)
        finally:
            file.close()
            path.unlink(missing_ok=True)
    except OSError:
        return None


def _probe_multiply(dtype: torch.dtype):
    """A [512, 2048] x [2048, 8192] matmul in `dtype`: it releases the GIL and keeps every
    core busy, as a layer's matmuls do."""
    x = torch.randn(512, 2048, dtype=dtype)
    w = torch.randn(8192, 2048, dtype=dtype)
    return lambda: torch.nn.functional.linear(x, w)


def _read_while_computing(pool, file, buf, nbytes: int, request: int, multiply, passes: int = 3) -> tuple[float, float]:
    """Read the probe `passes` times over in `request`-byte reads on `pool` while the main
    thread multiplies matrices; the matmul rate is compared with its rate alone, measured
    just before and just after. The reads are timed to the last one's end: one multiply can
    outlast them all (a bf16 [512, 2048] x [2048, 8192] takes 0.9 s on an AVX2-only CPU,
    where 512 MiB read in 0.2 s), so timing them by the multiplies measured those instead."""
    def rate(until) -> float:
        start, count = time.perf_counter(), 0
        while not until(time.perf_counter() - start):
            multiply()
            count += 1
        return count / (time.perf_counter() - start)

    def read(offset: int) -> float:
        file.read_into(buf, offset, min(offset + request, nbytes))
        return time.perf_counter()

    multiply()
    alone = rate(lambda elapsed: elapsed > 0.5)
    start = time.perf_counter()
    pending = [pool.submit(read, offset) for _ in range(passes) for offset in range(0, nbytes, request)]
    during = rate(lambda elapsed: all(f.done() for f in pending))
    last_read_end = max(f.result() for f in pending)
    alone = (alone + rate(lambda elapsed: elapsed > 0.5)) / 2
    return passes * nbytes / (last_read_end - start), min(1.0, during / alone)


def measure_attention(dtype: torch.dtype, batch: int = 64, heads: int = 16, tokens: int = 256,
                      head_dim: int = 64, device: torch.device = CPU, token_major: bool = False,
                      kernel: DecodeKernel | None = None, kv_heads: int = 4) -> float:
    """Decode attention's speed as the engine computes it (with `kernel`, the C kernels on a
    CPU), in bytes of the K and V read per second. A step reads every layer's cache once, so
    the probe cycles through copies of the cache that together exceed any L3 (ATTENTION_BYTES);
    token_major: over K and V laid out token by token, as host-RAM rows are on a GPU machine."""
    from ..kernels import AttentionStep, cached_attention

    q = torch.randn(batch, heads, 1, head_dim, device=device).to(dtype)
    new = torch.randn(batch, kv_heads, 1, head_dim, device=device).to(dtype)
    shape = (tokens, batch, kv_heads, head_dim) if token_major else (batch, kv_heads, tokens, head_dim)
    layout = (lambda t: t.permute(1, 2, 0, 3)) if token_major else (lambda t: t)
    per_copy = 2 * batch * kv_heads * tokens * head_dim * torch.empty((), dtype=dtype).element_size()
    copies = [[layout(torch.randn(shape, device=device).to(dtype)) for _ in range(2)]
              for _ in range(max(1, ATTENTION_BYTES // per_copy))]
    mask = torch.zeros(batch, 1, 1, tokens, dtype=dtype, device=device)
    step = AttentionStep(start=tokens - 1, mask=mask, scale=head_dim ** -0.5, decode=kernel)
    seconds = best_seconds(lambda: [cached_attention(q, new, new, k, v, step) for k, v in copies], device=device)
    return len(copies) * per_copy / seconds


def measure_prompt_attention(dtype: torch.dtype, batch: int = 8, heads: int = 16, kv_heads: int = 4,
                             queries: int = 128, before: int = 256, head_dim: int = 64, device: torch.device = CPU,
                             kernel: DecodeKernel | None = None) -> float:
    """The attention of a prompt's `queries` tokens over `before` cached keys and causally
    over each other, as the engine computes it (with `kernel`, the C kernels on a CPU), in
    FLOP/s of the scores and weighted values (planner.terms.attention_flop)."""
    from ..kernels import AttentionStep, cached_attention

    end = before + queries
    q = torch.randn(batch, heads, queries, head_dim, device=device).to(dtype)
    new = torch.randn(batch, kv_heads, queries, head_dim, device=device).to(dtype)
    keys, values = (torch.randn(batch, kv_heads, end, head_dim, device=device).to(dtype) for _ in range(2))
    causal = torch.ones(queries, end, dtype=torch.bool, device=device).tril(before)
    mask = torch.zeros(1, 1, queries, end, dtype=dtype, device=device).masked_fill(~causal, torch.finfo(dtype).min)
    step = AttentionStep(start=before, mask=mask, scale=head_dim ** -0.5, decode=kernel)
    seconds = best_seconds(lambda: cached_attention(q, new, new, keys, values, step), device=device)
    return batch * 4 * queries * (before + queries / 2) * heads * head_dim / seconds


def measure_kv_decode(dtype: torch.dtype, batch: int = 16, heads: int = 16, tokens: int = 512,
                      head_dim: int = 64, device: torch.device = CPU, fused_ops=None) -> float:
    """Dequantization of a 4-bit KV cache block, in bytes of the compute dtype per second,
    with the C kernels' `fused_ops` where the engine has them (it decodes with them then)."""
    from ..kernels import fused
    from ..kernels.quant import QuantConfig
    from ..storage.kv_rows import RowCodec

    codec = RowCodec(batch, heads, head_dim, dtype, QuantConfig(4, 64))
    rows = codec.encode(torch.randn(batch, heads, tokens, head_dim, device=device).to(dtype))
    before = fused.active()
    fused.use(fused_ops)
    try:
        seconds = best_seconds(lambda: codec.decode(rows), device=device)
    finally:
        fused.use(before)
    return batch * heads * tokens * head_dim * torch.empty((), dtype=dtype).element_size() / seconds


def best_seconds(fn, repeats: int = 5, device: torch.device = CPU) -> float:
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
        seconds = best_seconds(lambda: [layer() for _ in range(repeats)], repeats=3, device=device) / repeats
        out[rows] = rows * flop_per_row / seconds
    return out


def measure_dequantize(bits: int, hidden: int = 2048, device: torch.device = CPU) -> float:
    """Parameters per second dequantized from `bits`-bit packed weights into a dense buffer."""
    from ..kernels.packed import dequantize_transposed, pack_linear

    packed = pack_linear(torch.randn(4 * hidden, hidden, dtype=torch.bfloat16), bits).to(device)
    buffer = torch.empty(hidden, 4 * hidden, dtype=torch.bfloat16, device=device)
    return 4 * hidden * hidden / best_seconds(lambda: dequantize_transposed(packed, buffer), device=device)


