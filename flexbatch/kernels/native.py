"""Kernels written in C (decode_attention.c, prefill_attention.c, greedy.c, fused.c, sharing
simd.h), built into one library with the machine's C compiler at first use and called through
ctypes: no Python or torch headers, so a build takes about a second.

`build_decode_kernel` compiles into a folder it is given and returns a `DecodeKernel`; which
folder, and whether to use it at all, is decided above the engine (model_policy.py), which
hands the kernel to the runners.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError
from .fused import FusedOps
from .many_query import ManyQueryAttention

HERE = Path(__file__).parent
SOURCES = [HERE / "decode_attention.c", HERE / "prefill_attention.c", HERE / "greedy.c", HERE / "fused.c"]
HEADERS = [HERE / "simd.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
LIBRARIES = ["-lm"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class NativeBuildError(ConfigError):
    """The C kernels could not be built on this machine."""


class _DecodeArgs(ctypes.Structure):
    # the field order and types of DecodeArgs in decode_attention.c
    _fields_ = [("q", ctypes.c_void_p), ("k_new", ctypes.c_void_p), ("v_new", ctypes.c_void_p),
                ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("k_strides", ctypes.c_int64 * 3), ("v_strides", ctypes.c_int64 * 3),
                ("rows", ctypes.c_void_p), ("mask", ctypes.c_void_p), ("mask_stride", ctypes.c_int64),
                ("hidden_below", ctypes.c_float), ("n", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("dim", ctypes.c_int64), ("end", ctypes.c_int64),
                ("scale", ctypes.c_float), ("softcap", ctypes.c_float), ("out", ctypes.c_void_p),
                ("lse", ctypes.c_void_p)]


class DecodeKernel:
    """The C kernels of a decode step. Called: attention of one new token per sequence over
    its cache row's visible keys, reading only those (decode_attention.c): on a CPU, a block
    whose rows joined at different times reads a fraction of what SDPA does, and only the rows
    named are computed. `greedy`: the next tokens of greedy rows with their log-probabilities."""

    def __init__(self, library: ctypes.CDLL):
        self._call = library.decode_attention
        self._call.argtypes = [ctypes.POINTER(_DecodeArgs), ctypes.c_int, ctypes.c_int]
        self._call.restype = ctypes.c_int
        self._greedy = library.greedy_pick
        self._greedy.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self._greedy.restype = ctypes.c_int
        self.fused = FusedOps(library)  # the elementwise kernels built with these (kernels/fused.py)
        # many queries per sequence (prefill, a shared prefix), where the CPU has AVX512-BF16
        self.many = ManyQueryAttention(library) if ManyQueryAttention.built(library) else None

    def greedy(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """logits [n, V] on the CPU, fp32 or as the model computed them (bf16, fp16) ->
        (the first index of each row's maximum [n] int64, its log-probability [n] fp32), as
        argmax and log_softmax give them on `logits.float()`; None if a row holds a NaN
        (PyTorch's rules for it then apply)."""
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        n, vocab = logits.shape
        tokens, logprobs = torch.empty(n, dtype=torch.int64), torch.empty(n)
        nan = self._greedy(logits.data_ptr(), DTYPES[logits.dtype], n, vocab, logits.stride(0), tokens.data_ptr(),
                           logprobs.data_ptr(), torch.get_num_threads())
        return None if nan else (tokens, logprobs)

    @staticmethod
    def handles(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        """Whether decode steps of a model of this head dim, in `dtype` on `device`, run here."""
        return device.type == "cpu" and dtype in DTYPES and head_dim % 16 == 0 and head_dim <= 256

    def supports(self, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        """Whether this kernel computes queries q [B, H, 1, D] over a cache like k_cache."""
        return self.handles(q.device, q.dtype, q.shape[-1]) and q.shape[2] == 1 and k_cache.dtype == q.dtype \
            and k_cache.stride(-1) == 1

    def __call__(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, rows: torch.Tensor | None, mask: torch.Tensor, end: int, scale: float,
                 softcap: float | None = None) -> torch.Tensor:
        """q [n, H, 1, D]; k_new, v_new [n, Hkv, 1, D], written into slot end - 1 of each
        sequence's cache row; caches [N, Hkv, capacity, D] (any strides but the last); rows
        [n] int64, the cache row of each sequence (None: row i); mask [n, 1, 1, >= end] additive. Keys are
        slots [0, end). Returns [n, H, 1, D] in q's dtype."""
        out = self._attend(q, k_new, v_new, k_cache, v_cache, rows, mask, end, scale, softcap, None)
        return out.to(q.dtype)

    def with_lse(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, rows: torch.Tensor | None, mask: torch.Tensor, end: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """As calling it, but the output [n, H, 1, D] stays fp32 and comes with each query's
        log-sum-exp of its scores [n, H, 1]: attention over more keys elsewhere merges with it."""
        lse = torch.empty(q.shape[0], q.shape[1], 1)
        return self._attend(q, k_new, v_new, k_cache, v_cache, rows, mask, end, scale, None, lse), lse

    def _attend(self, q, k_new, v_new, k_cache, v_cache, rows, mask, end, scale, softcap, lse) -> torch.Tensor:
        n, heads, _, dim = q.shape
        queries = q.reshape(n, heads, dim).float().contiguous()
        k_new, v_new = (x.to(k_cache.dtype).contiguous() for x in (k_new, v_new))
        visible = mask.reshape(n, mask.shape[-1]).float()
        if visible.stride(-1) != 1:
            visible = visible.contiguous()
        rows = None if rows is None else rows.contiguous()
        out = torch.empty(n, heads, dim)
        args = _DecodeArgs(queries.data_ptr(), k_new.data_ptr(), v_new.data_ptr(),
                           k_cache.data_ptr(), v_cache.data_ptr(),
                           (ctypes.c_int64 * 3)(*k_cache.stride()[:3]), (ctypes.c_int64 * 3)(*v_cache.stride()[:3]),
                           None if rows is None else rows.data_ptr(), visible.data_ptr(), visible.stride(0),
                           torch.finfo(mask.dtype).min / 2,
                           n, heads, k_cache.shape[1], dim, end, scale, softcap or 0.0, out.data_ptr(),
                           None if lse is None else lse.data_ptr())
        status = self._call(ctypes.byref(args), DTYPES[k_cache.dtype], torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"decode attention failed (status {status}): out of memory for its score buffers")
        return out.view(n, heads, 1, dim)


def build_decode_kernel(folder: Path, compiler: str = "cc") -> DecodeKernel:
    """Compile the C kernels into `folder` (once per source, compiler and CPU: the build
    targets this CPU's instructions) and load them. Raises NativeBuildError, saying why."""
    cpu = _cpu_flags()
    if cpu and "avx512f" not in cpu.split():
        # known before compiling: a compiler run that must fail costs seconds and, in a
        # process under a memory limit, the compiler's memory beside the model's
        raise NativeBuildError("this CPU has no AVX-512 (its flags lack avx512f), which the kernels are written for")
    version = _run([compiler, "--version"]).splitlines()[0]
    settings = " ".join([version, *FLAGS, *LIBRARIES, cpu])
    code = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
    key = hashlib.sha256(code + settings.encode()).hexdigest()[:16]
    library = Path(folder) / f"flexbatch-kernels-{key}.so"
    try:
        if not library.exists():
            library.parent.mkdir(parents=True, exist_ok=True)
            # built beside its final name and moved there: processes starting together never
            # load a half-written file
            fd, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
            os.close(fd)
            try:
                _run([compiler, *FLAGS, "-o", partial, *map(str, SOURCES), *LIBRARIES])
                os.replace(partial, library)
            finally:
                Path(partial).unlink(missing_ok=True)
        return DecodeKernel(ctypes.CDLL(str(library)))
    except OSError as e:  # an unwritable folder, a library this system cannot load
        raise NativeBuildError(f"{library}: {e}") from e


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeBuildError(f"`{command[0]}` could not run: {e}") from e
    if done.returncode != 0:
        raise NativeBuildError(f"`{' '.join(command)}` failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""
