"""One thread owns the model; online requests and batch jobs take turns on it.

Everything that runs the model is a task on a single-worker executor, served first come first
served: a batch job submits one block at a time, so an online request waits for at most one
block of a running batch. Online requests pass through a small collecting queue first:
those that arrive while the engine is busy (or within `collect_seconds` of each other) are
generated together as one block, because throughput comes from large blocks. Each is
answered as soon as it is done, and those that arrive while an online block runs join it as
its rows free up (`OnlineArrivals`), so under steady load the block stays full. The block
stops taking them when a batch job waits for its turn.

The model is also loaded on the engine thread (`compute_thread`): torch's OpenMP runtime
keeps one thread team per thread that runs parallel work, and once two threads have run
model compute, both run at about half speed on a small CPU (measured: a block of 64 x 16
tokens took 1.7 s on one thread, 2.9 s once a second thread had run the same model).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config import SamplingParams
from ..engine.generation import BlockStats, Request
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
    largest_online_block: int = 0  # requests one online block generated, those that joined it included
    joined_requests: int = 0  # online requests that joined a block already running
    online_admissions: int = 0  # prefill passes of online blocks (the first, then one per group that joined)
    online_occupancy: float = 1.0  # the share of online blocks' decode rows that held a request
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
        self._tasks = 0  # submitted to the engine thread and not finished
        self._tasks_lock = threading.Lock()
        self._online: queue.Queue[OnlineItem | None] = queue.Queue()
        self.demand = Demand()
        self._online_rows = BlockStats()
        self._deferred: deque[OnlineItem] = deque()  # arrived, did not fit the block in flight: first next
        self._collector = threading.Thread(target=self._collect_forever, name="flexbatch-collector", daemon=True)
        self._collector.start()

    def submit(self, fn, *args, **kwargs) -> Future:
        """Run `fn` on the engine thread, after the tasks already waiting."""
        with self._tasks_lock:
            self._tasks += 1
        future = self._pool.submit(fn, *args, **kwargs)
        future.add_done_callback(self._task_done)
        return future

    def _task_done(self, _future) -> None:
        with self._tasks_lock:
            self._tasks -= 1

    def others_waiting(self) -> bool:
        """Whether a task (a batch job's block) waits behind the one running."""
        return self._tasks > 1

    def call(self, fn, *args, **kwargs):
        return self.submit(fn, *args, **kwargs).result()

    def submit_online(self, token_ids: list[int], params: SamplingParams) -> Future:
        """A future of the request's RequestOutput, or of a message if the engine failed on it."""
        item = OnlineItem(token_ids, params)
        self.demand.add(1)
        item.future.add_done_callback(lambda _: self.demand.add(-1))
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

    def poll(self, timeout: float | None = 0.0) -> OnlineItem | None:
        """The next online request (one set aside first), waiting up to `timeout` (None:
        forever); None if none came or the engine is closing (the close stays queued)."""
        if self._deferred:
            return self._deferred.popleft()
        while True:
            try:
                item = self._online.get(block=timeout is None or timeout > 0, timeout=timeout)
            except queue.Empty:
                return None
            if item is None:
                self._online.put(None)
                return None
            # from here its future cannot be cancelled; one its client cancelled is skipped
            if item.future.set_running_or_notify_cancel():
                return item

    def set_aside(self, item: OnlineItem) -> None:
        self._deferred.appendleft(item)

    def waiting(self) -> int:
        return len(self._deferred) + self._online.qsize()

    def _next_block(self) -> list[OnlineItem] | None:
        """Wait for a request, then gather what else arrives within the window, up to a block."""
        first = self.poll(timeout=None)
        if first is None:
            return None
        items, deadline = [first], time.monotonic() + self.collect_seconds
        while len(items) < self.llm.batch_size:
            item = self.poll(timeout=max(1e-6, deadline - time.monotonic()))
            if item is None:  # the window closed, or the engine is closing: answer what was gathered
                break
            items.append(item)
        return items

    def _run_online_block(self, items: list[OnlineItem]) -> None:
        arrivals = OnlineArrivals(self, items)

        def answer(i: int, output) -> None:
            if not arrivals.items[i].future.done():
                arrivals.items[i].future.set_result(output)

        try:
            outputs = self.call(generate_isolated, self.llm, items, answer, self._online_rows, arrivals)
        except BaseException as e:  # a disk failure: every request of the block gets it
            outputs = [f"the engine failed ({type(e).__name__}: {e})"] * len(arrivals.items)
        unfinished = []  # joined, then the block failed on another request: first in the next block
        for i, item in enumerate(arrivals.items):
            if i < len(outputs):
                answer(i, outputs[i])
            elif not item.future.done():
                unfinished.append(item)
        self._deferred.extendleft(reversed(unfinished))
        self.stats.online_blocks += 1
        self.stats.online_requests += len(arrivals.items)
        self.stats.joined_requests += len(arrivals.items) - len(items)
        self.stats.largest_online_block = max(self.stats.largest_online_block, len(arrivals.items))
        self.stats.online_admissions = self._online_rows.admissions
        self.stats.online_occupancy = round(self._online_rows.occupancy, 4)


class OnlineArrivals:
    """Online requests that arrive while an online block runs, as the block takes them
    (engine.generation.Arrivals); `items` are the block's requests in the order the block
    numbers them. None are taken once a batch job waits for the engine."""

    def __init__(self, engine: Engine, items: list[OnlineItem]):
        self.engine, self.items = engine, list(items)
        self.closed = False

    def waiting(self) -> int:
        return self.engine.waiting()

    def expected(self) -> int:
        return max(self.waiting(), self.engine.demand.recent_peak() - len(self.items))

    def take(self, limit: int, fits) -> list[Request]:
        taken: list[Request] = []
        while not self.closed and len(taken) < limit and not self.engine.others_waiting():
            item = self.engine.poll()
            if item is None:
                break
            request = Request(item.token_ids, item.params)
            if not fits(request):
                self.engine.set_aside(item)
                self.closed = True
                break
            self.items.append(item)
            taken.append(request)
        return taken


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


class Demand:
    """Online requests in flight (submitted, not answered), and their peak over the last
    `window` seconds: clients that were just answered send their next request a moment
    later, so a block starting between the two is sized for them too."""

    def __init__(self, window: float = 2.0):
        self.window, self.now, self.peak, self.peak_at = window, 0, 0, 0.0
        self._lock = threading.Lock()

    def add(self, change: int) -> None:
        with self._lock:
            self.now += change
            if self.now >= self.peak or time.monotonic() - self.peak_at > self.window:
                self.peak, self.peak_at = self.now, time.monotonic()

    def recent_peak(self) -> int:
        with self._lock:
            return self.peak if time.monotonic() - self.peak_at <= self.window else self.now

