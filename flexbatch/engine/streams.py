"""Ordering copies against compute when the compute device is a GPU.

Loads and stores run on I/O threads. On a GPU each I/O thread issues its copies on its own
CUDA stream, so they overlap the kernels of the compute stream, and three rules keep that
correct:

1. A load finishes its copies before it returns (the thread waits on its own stream), so
   compute may use what it loaded, and a host buffer it copied from may be reused at once.
2. A store first waits for an event the compute thread recorded after the kernels that
   produced what it stores, so it never copies a cache row before it is written.
3. Compute claims the tensors a load allocated (`record_stream`): the caching allocator then
   reuses their memory only after the compute stream's kernels that read them have run.

On a CPU there are no streams and every function here does nothing special.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable

import torch


class CopyStreams:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._local = threading.local()

    def _stream(self):
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return stream

    def run(self, fn, *args, after=None):
        """fn(*args) with its GPU copies on this thread's stream, issued after the event
        `after` (from `mark`) and complete when it returns."""
        if not self.cuda:
            return fn(*args)
        stream = self._stream()
        if after is not None:
            stream.wait_event(after)
        with torch.cuda.stream(stream):
            result = fn(*args)
        stream.synchronize()
        return result

    def mark(self):
        """An event after all compute issued so far (None on a CPU)."""
        if not self.cuda:
            return None
        return torch.cuda.current_stream(self.device).record_event()

    def claim(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tell the allocator that the compute stream uses these (loaded) GPU tensors."""
        if not self.cuda:
            return
        compute = torch.cuda.current_stream(self.device)
        for t in tensors:
            if t.is_cuda:
                t.record_stream(compute)
