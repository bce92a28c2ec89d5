"""The server's engine thread with a real model, in process: online requests that arrive
while an online block runs join it, are answered as they finish, and get what the model
generates for each alone; a batch job waiting for its turn stops the joining."""
from __future__ import annotations

import random
import threading

from flexbatch import LLM, SamplingParams
from flexbatch.serve.engine import Engine


def test_online_requests_join_the_running_block_until_a_batch_waits(tiny_model):
    folder, _ = tiny_model("llama_gqa_tied_llama3")
    rng = random.Random(3)
    prompt = lambda: [rng.randrange(2, 256) for _ in range(rng.randint(3, 9))]
    params = lambda n: SamplingParams(max_new_tokens=n, ignore_eos=True)
    llm = LLM(folder, dtype="float32", batch_size=8)
    engine = Engine(llm)
    sent: list[tuple[list[int], SamplingParams, object]] = []
    gate, follow_ups, batch_turn = threading.Event(), threading.Event(), []

    def send(ids, p):
        future = engine.submit_online(ids, p)
        sent.append((ids, p, future))
        return future

    def after_short(_future):
        # Runs on the engine thread while the block decodes the long request: the first follow-up
        # joins; then a batch's block waits for the engine, so the second one does not.
        if follow_ups.is_set():
            return
        follow_ups.set()
        send(prompt(), params(3)).add_done_callback(lambda _: (
            batch_turn.append(engine.submit(lambda: None)), send(prompt(), params(2))))

    try:
        engine.submit(gate.wait)  # holds the engine until the first four are all queued
        long = send(prompt(), params(40))
        send(prompt(), params(2)).add_done_callback(after_short)
        for n in (3, 4):
            send(prompt(), params(n))
        gate.set()
        long.result(timeout=120)
        for _, _, future in sent:
            future.result(timeout=120)
        batch_turn[0].result(timeout=120)
    finally:
        engine.close()  # the collector has counted every block once it has stopped
    stats = engine.stats
    assert len(sent) == 6
    assert stats.joined_requests == 1 and stats.online_requests == 6 and stats.online_blocks == 2
    alone = [llm.generate_ids([ids], p)[0].token_ids for ids, p, _ in sent]
    assert [future.result().token_ids for _, _, future in sent] == alone


def test_a_request_is_not_blamed_for_a_failure_with_arrivals_joined():
    """When a block with online arrivals fails, its own requests run again alone before any
    is reported as the one the engine failed on (an arrival, or the larger block, may be
    the cause; unfinished arrivals are the server's to run again)."""
    from types import SimpleNamespace

    from flexbatch.jobs.runner import generate_isolated

    class FailsWithArrivals:
        def generate_ids(self, prompt_ids, params, on_finish=None, stats=None, arrivals=None):
            if arrivals is not None:
                raise RuntimeError("a joined request broke the block")
            return [f"out {ids}" for ids in prompt_ids]

    segment = [SimpleNamespace(token_ids=[7, 8], params=None)]
    assert generate_isolated(FailsWithArrivals(), segment, arrivals=object()) == ["out [7, 8]"]
