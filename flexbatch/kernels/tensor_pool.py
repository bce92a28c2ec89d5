"""Reused tensors for buffers that are made and dropped over and over (a layer's dense copy of
its compressed weights, once per load): a fresh large allocation comes from new pages, and
faulting them in cost about a third of the time of dequantizing a 32 MB weight here."""
from __future__ import annotations

import threading

import torch


class TensorPool:
    """Free tensors by (shape, dtype, device); holds at most as many as were live at once."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()  # loads run on I/O threads

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of that shape (the caller fills all of it that it reads)."""
        with self._lock:
            free = self._free.get((tuple(shape), dtype, torch.device(device)))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, tensor: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(tensor)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
