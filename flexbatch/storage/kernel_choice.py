"""Which kernel multiplies by a 4-bit weight: torch's fused int4 kernel or dequantize + matmul.

The fused kernel reads a quarter of the bytes but computes more slowly; dequantizing costs a
pass over the dense weight but then runs the fast bf16 matmul. The crossover (in rows of the
input) depends on the CPU and the weight's shape, so it is measured per shape, once per
machine, and kept in the cache folder. FLEXBATCH_INT4_FUSED_MAX_ROWS overrides it for every
shape (0 turns the fused kernel off).
"""
from __future__ import annotations

import json
import os
import threading
import time

import torch

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STREAM_BYTES = 48 << 20  # more than a typical L3 cache: the weights stream from RAM, as a model's do

_FORCED: int | None = None  # tests pin the choice here
_measured: dict[str, int] = {}
_lock = threading.Lock()


def fused_max_rows(shape: tuple[int, int]) -> int:
    """Largest number of input rows for which the fused kernel beats dequantize + matmul on
    an [N, K] weight of this shape."""
    if _FORCED is not None:
        return _FORCED
    forced = os.environ.get("FLEXBATCH_INT4_FUSED_MAX_ROWS")
    if forced is not None:
        return int(forced)
    key = f"{shape[0]}x{shape[1]}"
    with _lock:  # weights are used from one compute thread; the lock only guards the cache file
        if key not in _measured:
            _measured.update(_load())
            if key not in _measured:
                _measured[key] = measure(shape)
                _save(_measured)
    return _measured[key]


def measure(shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> int:
    """Time both kernels at 1, 2, 4, ... 256 rows, cycling through copies of the weight
    (STREAM_BYTES of dense weights in all) so that neither runs from cache."""
    from .packed_linear import TILE, PackedLinear, _fused, _fused_kernel_matches, dequantize_transposed

    n, k = shape
    if not _fused_kernel_matches() or n % TILE or k % 32:
        return 0
    copies = max(2, min(64, STREAM_BYTES // (2 * n * k)))
    # random levels and scales: the kernels' speed does not depend on the values, and this
    # costs no more memory than the packed copies (a job may be measuring under a tight budget)
    weights = [PackedLinear(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8),
                            torch.rand(k // 32, n, 2).to(dtype), 4, 32) for _ in range(copies)]
    buffer = torch.empty(k, n, dtype=dtype)
    best = 0
    for rows in ROWS:
        x = torch.randn(rows, k, dtype=dtype)
        fused = _seconds(lambda: [_fused(x, p) for p in weights])
        dense = _seconds(lambda: [torch.matmul(x, dequantize_transposed(p, buffer)) for p in weights])
        if fused >= dense:
            break
        best = rows
    return best


def _seconds(fn, repeat: int = 2) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def _cache_file():
    from ..default_model import cache_dir

    return cache_dir() / "int4-crossover.json"


def _machine() -> str:
    from ..devices import cpu_name

    return f"{cpu_name()}|{os.cpu_count()}|torch {torch.__version__}"


def _load() -> dict[str, int]:
    try:
        saved = json.loads(_cache_file().read_text())
        if saved["machine"] == _machine():
            return {k: int(v) for k, v in saved["fused_max_rows"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # absent, stale or damaged: measured again
    return {}


def _save(rows: dict[str, int]) -> None:
    try:
        file = _cache_file()
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps({"machine": _machine(), "fused_max_rows": rows}, indent=1))
    except OSError:
        pass  # a read-only cache folder only costs the measurement next time
