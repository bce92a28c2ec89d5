"""The block schedule as a value across token steps, and the executor running it against a
recording weight home and step (no model): the next token's first layer is read during
this token's last layer and used by the next step, and no more layers are held than the
home has read slots."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from flexbatch.engine.executor import Executor, InlineIO
from flexbatch.engine.schedule import Op, OpKind, token_schedules
from flexbatch.engine.streams import CopyStreams
from flexbatch.engine.weight_home import READ_SLOTS
from flexbatch.sizing import CACHES_READ_AHEAD, KV_IN_FLIGHT

LOAD_FIRST_AHEAD = Op(OpKind.LOAD_WEIGHT, 0, token=1)


def computes(ops, layer):
    return [n for n, op in enumerate(ops) if op.kind is OpKind.COMPUTE and op.layer == layer]


@pytest.mark.parametrize("num_layers,num_gpu_batches", [(1, 1), (2, 3), (4, 2)])
def test_next_tokens_first_layer_loads_during_the_last_layer(num_layers, num_gpu_batches):
    steps = token_schedules(num_layers, num_gpu_batches, overlap=True, num_tokens=3)
    for i, ops in enumerate(steps):
        ahead = ops.index(LOAD_FIRST_AHEAD)
        last = computes(ops, num_layers - 1)
        assert ahead < last[0]  # issued before the last layer computes, so its read overlaps it
        if num_layers > 1:  # and after the layer before has finished with its weights
            assert ahead > computes(ops, num_layers - 2)[-1]
        assert ops.count(LOAD_FIRST_AHEAD) == 1
        assert (Op(OpKind.LOAD_WEIGHT, 0) in ops) == (i == 0)  # later steps start with it loaded


def test_sequential_schedule_never_loads_ahead():
    for ops in token_schedules(3, 2, overlap=False, num_tokens=2):
        assert all(op.token == 0 for op in ops)
        assert [op.layer for op in ops if op.kind is OpKind.LOAD_WEIGHT] == [0, 1, 2]


class RecordingHome:
    """A weight home with READ_SLOTS slots that records loads and releases, and fails (instead
    of hanging) when a load would need a slot none has given back."""

    def __init__(self, events: list):
        self.events, self.held, self.most_held = events, set(), 0
        self._slots = threading.Semaphore(READ_SLOTS)
        self._lock = threading.Lock()
        self._count = 0

    def load(self, layer: int):
        if not self._slots.acquire(timeout=5):
            raise AssertionError("a load waited for a read slot that was never given back")
        with self._lock:
            self._count += 1
            loaded = (layer, self._count)
            self.held.add(loaded)
            self.most_held = max(self.most_held, len(self.held))
            self.events.append(("load", loaded))
        return loaded

    def release(self, loaded) -> None:
        with self._lock:
            self.held.remove(loaded)  # KeyError if released twice
            self.events.append(("release", loaded))
        self._slots.release()


class RecordingStep:
    """Records computes; a compute of the whole block (batch None) reads its caches' stream
    and records each GPU batch it reaches. Counts the caches loaded and not yet stored."""

    def __init__(self, token: int, events: list):
        self.token, self.events = token, events
        self.held, self.most_held = set(), 0
        self._lock = threading.Lock()

    def load_cache(self, layer, batch):
        with self._lock:
            self.held.add((layer, batch))
            self.most_held = max(self.most_held, len(self.held))
        return (layer, batch)

    def compute(self, layer, batch, weights, cache):
        assert weights[0] == layer
        if batch is not None:
            assert cache == (layer, batch)
            self.events.append(("compute", self.token, layer, batch, weights))
            return
        for k, reached in enumerate(cache.caches()):
            assert reached == (layer, k)
            self.events.append(("compute", self.token, layer, k, weights))

    def store_cache(self, layer, batch):
        with self._lock:
            self.held.remove((layer, batch))  # KeyError if stored twice or never loaded


def run_tokens(io, overlap: bool, num_layers: int = 3, num_gpu_batches: int = 2, num_tokens: int = 3,
               whole_block: bool = False):
    events: list = []
    home = RecordingHome(events)
    executor = Executor(home, io, CopyStreams(torch.device("cpu")), overlap)
    for token in range(num_tokens):
        executor.run_step(RecordingStep(token, events), num_layers, num_gpu_batches, whole_block)
    executor.drain()
    return events, home


def test_executor_uses_the_first_layer_loaded_by_the_previous_step():
    events, home = run_tokens(InlineIO(), overlap=True)
    computes_at = {(e[1], e[2], e[3]): n for n, e in enumerate(events) if e[0] == "compute"}
    for token in (0, 1):
        used = events[computes_at[token + 1, 0, 0]][4]  # the load the next step's first compute used
        loaded_at = events.index(("load", used))
        assert computes_at[token, 2, 0] > loaded_at > computes_at[token, 1, 1]
    loads = [e[1] for e in events if e[0] == "load"]
    assert [layer for layer, _ in loads] == [0, 1, 2] * 3 + [0]  # the last one ahead for no step
    assert sorted(e[1] for e in events if e[0] == "release") == sorted(loads) and not home.held
    assert home.most_held == READ_SLOTS


@pytest.mark.parametrize("whole_block", [False, True])
@pytest.mark.parametrize("overlap", [True, False])
def test_threaded_executor_holds_at_most_the_read_slots(overlap, whole_block):
    with ThreadPoolExecutor(max_workers=3) as pool:
        events, home = run_tokens(pool if overlap else InlineIO(), overlap, num_layers=4, num_gpu_batches=3,
                                  num_tokens=4, whole_block=whole_block)
    assert not home.held and home.most_held <= READ_SLOTS
    reached = [e[1:4] for e in events if e[0] == "compute"]
    assert reached == [(t, j, k) for t in range(4) for j in range(4) for k in range(3)]  # in order, each once


@pytest.mark.parametrize("overlap", [True, False])
def test_a_whole_block_compute_holds_one_cache_and_reads_a_few_ahead(overlap):
    """Streaming a layer's caches to a compute of the whole block keeps no more of them
    loaded than the KV buffers hold (sizing.KV_IN_FLIGHT): the one attended and, overlapped,
    the CACHES_READ_AHEAD after it, across layers too (3 layers of 2 GPU batches)."""
    step = RecordingStep(0, [])
    executor = Executor(RecordingHome([]), InlineIO(), CopyStreams(torch.device("cpu")), overlap)
    executor.run_step(step, 3, 2, whole_block=True)
    executor.drain()
    assert not step.held and step.most_held == (1 + CACHES_READ_AHEAD if overlap else 1) <= KV_IN_FLIGHT
    assert len(step.events) == 3 * 2


def test_a_failed_step_gives_its_read_slots_back():
    events: list = []
    home = RecordingHome(events)
    executor = Executor(home, InlineIO(), CopyStreams(torch.device("cpu")), overlap=True)

    class Failing(RecordingStep):
        def compute(self, layer, batch, weights, cache):
            if layer == 1:
                raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        executor.run_step(Failing(0, events), 3, 2)
    executor.drain()
    assert not home.held
    executor.run_step(RecordingStep(1, events), 3, 2)  # the slots are free for the next batch


def test_a_whole_block_compute_that_skips_caches_is_an_error():
    """A layer that did not attend every GPU batch's cache would leave it unstored (its new
    token lost, its buffers never freed): the executor says so instead of going on."""
    class SkipsLast(RecordingStep):
        def compute(self, layer, batch, weights, cache):
            for k, _ in zip(range(1), cache.caches()):
                pass

    with pytest.raises(RuntimeError, match="did not attend every GPU batch's cache"):
        Executor(RecordingHome([]), InlineIO(), CopyStreams(torch.device("cpu")), True).run_step(
            SkipsLast(0, []), 3, 2, whole_block=True)
