"""The executor: runs token steps' schedules, the one loop of prefetch -> compute -> write
back -> sync.

Loads and stores go to an I/O pool (a thread pool when overlapping, inline otherwise) and
run on the I/O side's CUDA streams on a GPU (streams.py); compute runs on the calling
thread and waits on a load only when it needs it. A step ends with a barrier on its
stores, so the next step's loads see this step's cache rows. Layer weights come from a
`WeightHome`-like object (load -> a held load, release); cache loads, compute and stores
from the step's `StepWork`. The overlapped schedule loads the next step's first layer
during this step's last (schedule.py): the executor keeps that load across steps.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any, Protocol

from .schedule import Op, OpKind, token_schedule
from .streams import CopyStreams


class StepWork(Protocol):
    """What one token step's cache and compute operations do."""

    def load_cache(self, layer: int, batch: int) -> Any: ...

    def compute(self, layer: int, batch: int, weights: Any, cache: Any) -> None: ...

    def store_cache(self, layer: int, batch: int) -> None: ...


class WeightLoader(Protocol):
    def load(self, layer: int) -> Any: ...

    def release(self, loaded: Any) -> None: ...


class InlineIO:
    """Runs each submitted function at once: the sequential mode (and recording tests)."""

    def submit(self, fn, *args, **kwargs) -> Future:
        future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


class Executor:
    def __init__(self, weights: WeightLoader, io, streams: CopyStreams, overlap: bool):
        self.weights, self.io, self.streams, self.overlap = weights, io, streams, overlap
        self.trace: list[list[Op]] | None = None  # set to a list to record each step's operations
        self._next_first: Future | None = None  # the next step's first layer, loaded ahead

    def run_step(self, work: StepWork, num_layers: int, num_gpu_batches: int) -> float:
        """Run one token step; returns the seconds compute waited for loads (I/O not hidden)."""
        ops = token_schedule(num_layers, num_gpu_batches, self.overlap, self._next_first is not None)
        if self.trace is not None:
            self.trace.append(ops)
        step = _Step(self, work, num_gpu_batches)
        if self._next_first is not None:
            step.weights[0], self._next_first = self._next_first, None
        try:
            for op in ops:
                step.handlers[op.kind](op)
        finally:
            step.release_held()  # only after an error: a finished step holds none
            for future in step.stores:
                future.result()
        return step.waited

    def carry_to_next_step(self, first_layer: Future) -> None:
        self._next_first = first_layer

    def drain(self) -> None:
        """Give back a load kept for a step that will not come (the batch ended)."""
        if self._next_first is not None:
            self.weights.release(self._next_first.result())
            self._next_first = None

    def submit(self, fn, *args, after=None) -> Future:
        return self.io.submit(self.streams.run, fn, *args, after=after)


class _Step:
    """The state of one step's run: loads in flight, stores to wait for, time spent waiting."""

    def __init__(self, executor: Executor, work: StepWork, num_gpu_batches: int):
        self.executor, self.work, self.last_batch = executor, work, num_gpu_batches - 1
        self.weights: dict[int, Future] = {}
        self.caches: dict[tuple[int, int], Future] = {}
        self.stores: list[Future] = []
        self.waited = 0.0
        self.handlers = {OpKind.LOAD_WEIGHT: self.load_weight, OpKind.LOAD_CACHE: self.load_cache,
                         OpKind.COMPUTE: self.compute, OpKind.STORE_CACHE: self.store_cache}

    def load_weight(self, op: Op) -> None:
        future = self.executor.submit(self.executor.weights.load, op.layer)
        if op.token == 0:
            self.weights[op.layer] = future
        else:
            self.executor.carry_to_next_step(future)

    def load_cache(self, op: Op) -> None:
        self.caches[op.layer, op.batch] = self.executor.submit(self.work.load_cache, op.layer, op.batch)

    def compute(self, op: Op) -> None:
        began = time.perf_counter()
        cache = self.caches.pop((op.layer, op.batch)).result()
        weights = self.weights[op.layer].result()
        self.waited += time.perf_counter() - began
        self.work.compute(op.layer, op.batch, weights, cache)
        if op.batch == self.last_batch:  # every GPU batch has used this layer's weights
            self.executor.weights.release(self.weights.pop(op.layer).result())

    def release_held(self) -> None:
        """Give back weight loads no compute released, so a failed step does not keep read slots."""
        for future in self.weights.values():
            if future.exception() is None:
                self.executor.weights.release(future.result())
        self.weights = {}

    def store_cache(self, op: Op) -> None:
        # issued after the compute that wrote the rows it stores (the mark orders it on a GPU)
        after = self.executor.streams.mark()
        self.stores.append(self.executor.submit(self.work.store_cache, op.layer, op.batch, after=after))
