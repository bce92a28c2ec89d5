"""The executor: runs token steps' schedules, the one loop of prefetch -> compute -> write
back -> sync.

Loads and stores go to an I/O pool (a thread pool when overlapping, inline otherwise) and
run on the I/O side's CUDA streams on a GPU (streams.py); compute runs on the calling
thread and waits on a load only when it needs it. A step ends with a barrier on its
stores, so the next step's loads see this step's cache rows. Layer weights come from a
`WeightHome`-like object (load -> a held load, release); cache loads, compute and stores
from the step's `StepWork`. The overlapped schedule loads the next step's first layer
during this step's last (schedule.py): the executor keeps that load across steps.

In a step over the whole block (`schedule.block_schedule`), a layer's one compute is handed
a `BlockCaches` (a `kernels.CacheStream`), which loads, hands over and stores back the GPU
batches' caches one after another as the layer's attention reaches them.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any, Protocol

from ..sizing import CACHES_READ_AHEAD
from .schedule import Op, OpKind, block_cache, token_schedule
from .streams import CopyStreams


class StepWork(Protocol):
    """What one token step's cache and compute operations do."""

    def load_cache(self, layer: int, batch: int) -> Any: ...

    def compute(self, layer: int, batch: int | None, weights: Any, cache: Any) -> None:
        """batch None: the whole block, its caches a `BlockCaches`."""

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

    def run_step(self, work: StepWork, num_layers: int, num_gpu_batches: int, whole_block: bool = False) -> float:
        """Run one token step (`whole_block`: one compute per layer for all GPU batches);
        returns the seconds compute waited for loads (I/O not hidden)."""
        ops = token_schedule(num_layers, num_gpu_batches, self.overlap, self._next_first is not None, whole_block)
        step = _Step(self, work, num_layers, num_gpu_batches)
        if self.trace is not None:
            self.trace.append(step.done)
        if self._next_first is not None:
            step.weights[0], self._next_first = self._next_first, None
        try:
            for op in ops:
                step.run(op)
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

    def __init__(self, executor: Executor, work: StepWork, num_layers: int, num_gpu_batches: int):
        self.executor, self.work = executor, work
        self.num_layers, self.last_batch = num_layers, num_gpu_batches - 1
        self.weights: dict[int, Future] = {}
        self.caches: dict[tuple[int, int], Future] = {}
        self.stores: list[Future] = []
        self.waited = 0.0
        self.done: list[Op] = []  # the operations run, in order (the executor's trace)
        self.handlers = {OpKind.LOAD_WEIGHT: self.load_weight, OpKind.LOAD_CACHE: self.load_cache,
                         OpKind.COMPUTE: self.compute, OpKind.STORE_CACHE: self.store_cache,
                         OpKind.ATTEND: lambda op: None}

    def run(self, op: Op) -> None:
        self.done.append(op)
        self.handlers[op.kind](op)

    def wait(self, future: Future) -> Any:
        began = time.perf_counter()
        result = future.result()
        self.waited += time.perf_counter() - began
        return result

    def load_weight(self, op: Op) -> None:
        future = self.executor.submit(self.executor.weights.load, op.layer)
        if op.token == 0:
            self.weights[op.layer] = future
        else:
            self.executor.carry_to_next_step(future)

    def load_cache(self, op: Op) -> None:
        self.caches[op.layer, op.batch] = self.executor.submit(self.work.load_cache, op.layer, op.batch)

    def compute(self, op: Op) -> None:
        whole = op.batch is None
        cache = BlockCaches(self, op.layer) if whole else self.wait(self.caches.pop((op.layer, op.batch)))
        weights = self.wait(self.weights[op.layer])
        self.work.compute(op.layer, op.batch, weights, cache)
        if whole and not cache.finished:  # its last caches would never be stored nor their buffers freed
            raise RuntimeError(f"layer {op.layer}'s compute of the whole block did not attend every GPU batch's cache")
        if whole or op.batch == self.last_batch:  # every GPU batch has used this layer's weights
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


class BlockCaches:
    """The caches of one layer's GPU batches for a compute over the whole block, as a
    `kernels.CacheStream`: each is waited for when attention reaches it (loaded then, in the
    sequential mode), and stored back once attention asks for the next. Overlapped, reaching
    one issues the load of the one CACHES_READ_AHEAD further (into the next layer's after
    this layer's last), so several are read while one is attended, and the next layer's
    first ones during this layer's matmuls after attention."""

    def __init__(self, step: _Step, layer: int):
        self.step, self.layer = step, layer
        self.finished = False  # every cache handed over and stored

    def caches(self):
        step, layer, overlap = self.step, self.layer, self.step.executor.overlap
        n = step.last_batch + 1
        for batch in range(n):
            if not overlap:
                step.run(Op(OpKind.LOAD_CACHE, layer, batch))
            cache = step.wait(step.caches.pop((layer, batch)))
            ahead = block_cache(layer * n + batch + CACHES_READ_AHEAD, n)
            if overlap and ahead[0] < step.num_layers:
                step.run(Op(OpKind.LOAD_CACHE, *ahead))
            step.run(Op(OpKind.ATTEND, layer, batch))
            yield cache
            step.run(Op(OpKind.STORE_CACHE, layer, batch))
        self.finished = True
