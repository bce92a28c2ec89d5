"""Several blocks in flight at once, one per runner: the lanes of pipeline stages
(engine/pipeline.py), each decoded by a thread of its own."""
from __future__ import annotations

import threading

from .generation import Arrivals, BlockStats, Completion, Request, Vocabulary, generate
from .runner import Runner


def generate_in_lanes(runners: list[Runner], requests: list[Request], block_size: int, vocab: Vocabulary,
                      on_step=None, on_finish=None, stats: BlockStats | None = None,
                      arrivals: Arrivals | None = None) -> list[Completion]:
    """`generate` with one block in flight per runner at once. Requests are dealt to the
    lanes in turn, longest first, so their blocks are alike; callbacks are called one at a
    time. `arrivals` join a block only with one lane (else they wait for the next call)."""
    if len(runners) == 1:
        return generate(runners[0], requests, block_size, vocab, on_step, on_finish, stats, arrivals)
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].token_ids), i))
    shares = [order[t::len(runners)] for t in range(len(runners))]
    results: list[Completion | None] = [None] * len(requests)
    lane_stats = [BlockStats() for _ in runners]
    errors: list[BaseException] = []
    lock = threading.Lock()

    def serialized(callback):
        def call(*args):
            with lock:
                callback(*args)
        return call if callback is not None else None

    def run_lane(t: int) -> None:
        share = shares[t]
        finished = serialized(on_finish and (lambda j, completion: on_finish(share[j], completion)))
        try:
            done = generate(runners[t], [requests[i] for i in share], block_size, vocab, serialized(on_step),
                            finished, lane_stats[t])
            for i, completion in zip(share, done):
                results[i] = completion
        except BaseException as error:  # raised below, once every lane has stopped
            errors.append(error)

    threads = [threading.Thread(target=run_lane, args=(t,), name=f"flexbatch-lane{t}") for t in range(len(runners))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    if stats is not None:
        for lane in lane_stats:
            for name in vars(lane):
                setattr(stats, name, getattr(stats, name) + getattr(lane, name))
    return results
