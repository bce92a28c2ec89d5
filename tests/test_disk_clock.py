"""The disk's busy clock: the seconds at least one request was in flight, which benchmarks
divide the bytes a run moved by to tell the disk's own rate from the run's."""
from __future__ import annotations

import threading

import torch

from flexbatch.storage import disk
from flexbatch.storage.aligned import aligned_bytes
from flexbatch.storage.disk import BusyClock, DiskFile, Traffic


class FakeTime:
    """perf_counter() returns what the test sets."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_busy_clock_counts_the_union_of_overlapping_requests(monkeypatch):
    """Requests A [0, 2], B [1, 3] overlap and C [5, 6] stands alone: busy 3 + 1 = 4 s, not
    the 5 s their durations add up to, nor the 6 s the whole span takes."""
    fake = FakeTime()
    monkeypatch.setattr(disk, "time", fake)
    clock = BusyClock()
    events = [(0, "A starts"), (1, "B starts"), (2, "A ends"), (3, "B ends"), (5, "C starts"), (6, "C ends")]
    for at, event in events:
        fake.now = at
        if event.endswith("starts"):
            clock.__enter__()
        else:
            clock.__exit__(None, None, None)
    assert clock.seconds == 4.0
    fake.now = 10  # a reset while idle starts from zero; one while a request is in flight counts from then
    clock.reset()
    clock.__enter__()
    fake.now = 11
    clock.reset()
    fake.now = 12.5
    clock.__exit__(None, None, None)
    assert clock.seconds == 1.5


def test_disk_files_of_one_disk_share_its_busy_clock(tmp_path, monkeypatch):
    """Reads and writes through two Traffics on one clock (weights and KV cache of a runner)
    are timed on it, each request from its start to its end; a file without traffic
    counting times nothing."""
    fake = FakeTime()
    monkeypatch.setattr(disk, "time", fake)
    real_preadv, real_pwritev = disk.os.preadv, disk.os.pwritev

    def slow(call, seconds):
        def run(*args):
            fake.now += seconds  # the request takes `seconds` of the clock
            return call(*args)
        return run

    monkeypatch.setattr(disk.os, "preadv", slow(real_preadv, 2.0))
    monkeypatch.setattr(disk.os, "pwritev", slow(real_pwritev, 0.5))
    weights = Traffic()
    kv = Traffic(weights.clock)
    buf = aligned_bytes(1 << 16)
    buf.copy_(torch.arange(1 << 16, dtype=torch.int32).to(torch.uint8))
    a = DiskFile(tmp_path / "a", 1 << 16, traffic=weights)
    b = DiskFile(tmp_path / "b", 1 << 16, traffic=kv)
    untimed = DiskFile(tmp_path / "c", 1 << 16)
    b.write_from(buf, 0, 1 << 16)
    a.read_into(buf, 0, 4096)
    untimed.write_from(buf, 0, 4096)
    fake.now += 7  # idle
    assert weights.clock is kv.clock and kv.clock.seconds == 2.5
    assert (weights.read, kv.written) == (4096, 1 << 16)
    for f in (a, b, untimed):
        f.close()


def test_busy_clock_is_consistent_across_threads():
    """Many threads entering and leaving at once leave it idle with a finite, positive count."""
    clock = BusyClock()

    def work():
        for _ in range(2000):
            with clock:
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clock._in_flight == 0 and 0 < clock.seconds < 60
