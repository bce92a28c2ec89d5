"""The server SIGKILLed during a batch and restarted on the same data dir: the batch completes
with exactly one result per request, identical to an uninterrupted run of the job."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from flexbatch import LLM, SamplingParams  # noqa: E402
from flexbatch.jobs.runner import run_job  # noqa: E402

from serve_util import (  # noqa: E402
    BLOCK,
    MAX_NEW_TOKENS,
    ServerProcess,
    batch_lines,
    batch_results,
    records_by_id,
    wait_batch,
    write_jsonl,
)

NUM_REQUESTS = 64
KILLS = 2


def _kill_mid_batch(server: ServerProcess, batch_id: str, done_before: int) -> int:
    """SIGKILL the server once at least one more block has finished; returns results seen."""
    client = server.client()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        done = batch.request_counts.completed
        if batch.status == "completed":
            pytest.fail("the batch finished before the server could be killed; give it more requests")
        if done >= done_before + BLOCK:
            server.kill()
            return done
        time.sleep(0.1)
    raise TimeoutError(server.log_text())


def test_sigkill_during_a_batch_loses_and_duplicates_nothing(default_model_store, tmp_path):
    name = default_model_store.name
    requests = write_jsonl(tmp_path / "requests.jsonl", batch_lines(NUM_REQUESTS, name, "/v1/chat/completions"))
    data_dir = tmp_path / "data"
    server = ServerProcess(default_model_store, data_dir)
    try:  # whatever fails, the server running then is stopped
        client = server.client()
        uploaded = client.files.create(file=requests.open("rb"), purpose="batch")
        batch_id = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                         completion_window="24h").id
        done = 0
        for _ in range(KILLS):
            done = _kill_mid_batch(server, batch_id, done)
            server = ServerProcess(default_model_store, data_dir)
        client = server.client()
        batch = wait_batch(client, batch_id)
        assert batch.status == "completed", batch
        served = batch_results(client, batch)  # raises on a duplicated custom_id
        assert batch.request_counts.total == NUM_REQUESTS == len(served)
        assert client.files.retrieve(uploaded.id).bytes == requests.stat().st_size  # the upload survived
    finally:
        server.stop()

    with LLM(default_model_store, dtype="float32", batch_size=BLOCK) as llm:
        run_job(llm, requests, tmp_path / "uninterrupted.jsonl", fmt="openai",
                defaults=SamplingParams(max_new_tokens=MAX_NEW_TOKENS), progress=False, model_name=name)
    assert served == records_by_id((tmp_path / "uninterrupted.jsonl").read_text())
