"""One thread owns the model; online requests and batch jobs take turns on it.

Everything that runs the model is a task on a single-worker executor, served first come first
served: a batch job submits one block at a time, so an online request waits for at most one
block of a running batch. Online requests pass through a small collecting queue first:
those that arrive while the engine is busy (or within `collect_seconds` of each other) are
generated together as one block, because throughput comes from large blocks.

The model is also loaded on the engine thread (`compute_thread`): torch's OpenMP runtime
keeps one thread team per thread that runs parallel work, and once two threads have run
model compute, both run at about half speed on a small CPU (measured: a block of 64 x 16
tokens took 1.7 s on one thread, 2.9 s once a second thread had run the same model).
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config import SamplingParams
from ..jobs.runner import generate_isolated


class JobStopped(BaseException):
    """Raised between blocks to stop a batch job (cancelled, or the server is stopping). A
    BaseException, so the job runner's per-request isolation does not swallow it."""


@dataclass
class OnlineItem:
    token_ids: list[int]
    params: SamplingParams
    future: Future = field(default_factory=Future)


@dataclass
class EngineStats:
    online_blocks: int = 0
    online_requests: int = 0
    largest_online_block: int = 0
    batch_blocks: int = 0


def compute_thread() -> ThreadPoolExecutor:
    """The one thread that runs the model: load the LLM on it, then give it to Engine."""
    return ThreadPoolExecutor(1, thread_name_prefix="flexbatch-engine")


class Engine:
    def __init__(self, llm, collect_seconds: float = 0.01, pool: ThreadPoolExecutor | None = None):
        self.llm = llm
        self.collect_seconds = collect_seconds
        self.stats = EngineStats()
        self._pool = pool or compute_thread()
        self._online: queue.Queue[OnlineItem | None] = queue.Queue()
        self._collector = threading.Thread(target=self._collect_forever, name="flexbatch-collector", daemon=True)
        self._collector.start()

    def submit(self, fn, *args, **kwargs) -> Future:
        """Run `fn` on the engine thread, after the tasks already waiting."""
        return self._pool.submit(fn, *args, **kwargs)

    def call(self, fn, *args, **kwargs):
        return self.submit(fn, *args, **kwargs).result()

    def submit_online(self, token_ids: list[int], params: SamplingParams) -> Future:
        """A future of the request's RequestOutput, or of a message if the engine failed on it."""
        item = OnlineItem(token_ids, params)
        self._online.put(item)
        return item.future

    def close(self) -> None:
        self._online.put(None)
        self._collector.join(timeout=60)
        self._pool.shutdown(wait=True)

    def _collect_forever(self) -> None:
        while (items := self._next_block()) is not None:
            if items:
                self._run_online_block(items)

    def _next_block(self) -> list[OnlineItem] | None:
        """Wait for a request, then gather what else arrives within the window, up to a block."""
        first = self._online.get()
        if first is None:
            return None
        items, deadline = [first], time.monotonic() + self.collect_seconds
        while len(items) < self.llm.batch_size:
            try:
                item = self._online.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:  # closing: answer what was gathered, then stop
                self._online.put(None)
                break
            items.append(item)
        return items

    def _run_online_block(self, items: list[OnlineItem]) -> None:
        self.stats.online_blocks += 1
        self.stats.online_requests += len(items)
        self.stats.largest_online_block = max(self.stats.largest_online_block, len(items))
        try:
            outputs = self.call(generate_isolated, self.llm, items)
        except BaseException as e:  # a disk failure: every request of the block gets it
            outputs = [f"the engine failed ({type(e).__name__}: {e})"] * len(items)
        for item, out in zip(items, outputs):
            item.future.set_result(out)


class EngineLLM:
    """The LLM as a batch job sees it: generation runs on the engine thread one block at a
    time, and `should_stop()` (checked before each block) ends the job with JobStopped.
    Everything else (tokenizer, config, batch_size ...) is the real LLM's."""

    def __init__(self, engine: Engine, should_stop, before_block=None):
        self._engine, self._should_stop, self._before_block = engine, should_stop, before_block

    def __getattr__(self, name):
        return getattr(self._engine.llm, name)

    def generate_ids(self, prompt_ids, params=None, **kwargs):
        if self._before_block is not None:
            self._before_block()
        if self._should_stop():
            raise JobStopped()
        self._engine.stats.batch_blocks += 1
        return self._engine.call(self._engine.llm.generate_ids, prompt_ids, params, **kwargs)
