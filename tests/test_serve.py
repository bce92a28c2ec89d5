"""`flexbatch serve` through the official openai client: batches equal `flexbatch run`,
online logprobs equal LLM.score / LLM.generate, OpenAI error objects, blocks shared by
concurrent clients."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from flexbatch import LLM, SamplingParams  # noqa: E402
from flexbatch.jobs.runner import run_job  # noqa: E402

from serve_util import (  # noqa: E402
    API_KEY,
    BLOCK,
    MAX_NEW_TOKENS,
    REPO,
    ServerProcess,
    batch_lines,
    batch_results,
    records_by_id,
    stats,
    wait_batch,
    write_jsonl,
)


@pytest.fixture(scope="module")
def server(default_model_store, tmp_path_factory):
    proc = ServerProcess(default_model_store, tmp_path_factory.mktemp("serve") / "data")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def llm(default_model_store):
    with LLM(default_model_store, dtype="float32", batch_size=BLOCK) as model:
        yield model


@pytest.fixture(scope="module")
def model_name(default_model_store):
    return default_model_store.name


def test_batch_through_the_api_equals_flexbatch_run(server, default_model_store, model_name, tmp_path):
    requests = write_jsonl(tmp_path / "requests.jsonl", batch_lines(20, model_name))
    client = server.client()
    uploaded = client.files.create(file=requests.open("rb"), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == requests.stat().st_size
    assert client.files.retrieve(uploaded.id).filename == "requests.jsonl"
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h",
                                  metadata={"purpose": "test"})
    assert batch.status == "validating" and batch.metadata == {"purpose": "test"}
    assert batch.expires_at is None  # without --expire-batches a batch runs to the end
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 20 and batch.request_counts.failed == 2
    assert batch.request_counts.completed == 18
    served = batch_results(client, batch)
    errors = records_by_id(client.files.content(batch.error_file_id).text)
    assert set(errors) == {"req-6", "req-13"} and errors["req-6"]["response"]["status_code"] == 400

    output = tmp_path / "run.jsonl"
    subprocess.run([sys.executable, "-m", "flexbatch", "run", str(requests), "-o", str(output), "--model",
                    str(default_model_store), "--dtype", "float32", "--no-plan", "--batch-size", str(BLOCK),
                    "--max-new-tokens", str(MAX_NEW_TOKENS)], cwd=REPO, check=True, capture_output=True)
    assert served == records_by_id(output.read_text())
    assert any(b.id == batch.id for b in client.batches.list())
    assert {f.id for f in client.files.list()} >= {uploaded.id, batch.output_file_id, batch.error_file_id}


def test_a_batch_mixing_endpoints_fails_validation(server, model_name, tmp_path):
    lines = batch_lines(3, model_name) + batch_lines(2, model_name, "/v1/chat/completions")
    client = server.client()
    uploaded = client.files.create(file=write_jsonl(tmp_path / "mixed.jsonl", lines).open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    batch = wait_batch(client, batch.id)
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert batch.errors.data[0].code == "invalid_url" and "4, 5" in batch.errors.data[0].message


def test_completion_logprobs_and_echo_equal_score_and_generate(server, llm, model_name):
    prompt = "The capital of France is"
    result = server.client().completions.create(model=model_name, prompt=prompt, max_tokens=5, logprobs=3,
                                                echo=True)
    choice = result.choices[0]
    prompt_ids = llm.encode(prompt)
    expected = llm.generate(prompt, SamplingParams(max_new_tokens=5, top_logprobs=3))[0]
    [prompt_scores] = llm.score([prompt], top_logprobs=3)
    scored = prompt_scores.logprobs
    lp = choice.logprobs
    n = len(prompt_ids)
    assert choice.text == prompt + expected.text
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1:n] == pytest.approx(scored, rel=1e-4, abs=1e-4)
    assert lp.top_logprobs[0] is None  # prompt positions: the 3 most likely tokens there, as LLM.score gives them
    for top, alternatives in zip(lp.top_logprobs[1:n], prompt_scores.top_logprobs):
        assert list(top) == [llm.tokenizer.decode([t]) for t, _ in alternatives]
        assert list(top.values()) == pytest.approx([a[1] for a in alternatives], rel=1e-4, abs=1e-4)
    assert lp.token_logprobs[n:] == pytest.approx(expected.logprobs, rel=1e-4, abs=1e-4)
    assert lp.tokens[n:] == [llm.tokenizer.decode([t]) for t in expected.token_ids]
    for top, alternatives in zip(lp.top_logprobs[n:], expected.top_logprobs):
        assert list(top.values()) == pytest.approx([a[1] for a in alternatives], rel=1e-4, abs=1e-4)
    assert result.usage.prompt_tokens == n and result.usage.completion_tokens == len(expected.token_ids)

    scored_only = server.client().completions.create(model=model_name, prompt=prompt, max_tokens=0, logprobs=1,
                                                     echo=True)
    assert scored_only.choices[0].text == prompt
    assert scored_only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(scored, rel=1e-4, abs=1e-4)


def test_completions_take_lists_token_ids_and_sampling_fields(server, llm, model_name):
    client = server.client()
    prompts = ["Once upon a time", "The best fruit is"]
    result = client.completions.create(model=model_name, prompt=prompts, max_tokens=6, temperature=0.7, seed=3,
                                       top_p=0.9, stop=["\n"], extra_body={"top_k": 20})
    params = SamplingParams(max_new_tokens=6, temperature=0.7, seed=3, top_p=0.9, top_k=20, stop=("\n",))
    expected = llm.generate(prompts, params)
    assert [c.text for c in result.choices] == [e.text for e in expected]
    ids = llm.encode("Hello, my name is")
    by_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=4)
    assert by_ids.choices[0].text == llm.generate([ids], SamplingParams(max_new_tokens=4))[0].text


def test_chat_top_logprobs_equal_generate(server, llm, model_name):
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a planet."}]
    result = server.client().chat.completions.create(model=model_name, messages=messages, max_tokens=6,
                                                     logprobs=True, top_logprobs=2)
    expected = llm.chat(messages, SamplingParams(max_new_tokens=6, top_logprobs=2))[0]
    choice = result.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    content = choice.logprobs.content
    assert [c.logprob for c in content] == pytest.approx(expected.logprobs, rel=1e-4, abs=1e-4)
    for item, alternatives in zip(content, expected.top_logprobs):
        assert [t.token for t in item.top_logprobs] == [llm.tokenizer.decode([a[0]]) for a in alternatives]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([a[1] for a in alternatives], abs=1e-4)
    models = server.client().models.list()
    assert [m.id for m in models] == [model_name]


def _raw(server, method: str, path: str, body: bytes | None = None, key: str | None = API_KEY,
         content_type: str = "application/json") -> tuple[int, dict]:
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(server.base_url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400), (b"[1, 2]", 400), (b'{"model": "M"}', 400), (b'{"model": "M", "prompt": ""}', 400),
    (b'{"model": "M", "prompt": "hi", "max_tokens": "many"}', 400),
    (b'{"model": "M", "prompt": "hi", "temperature": -1}', 400),
    (b'{"model": "M", "prompt": "hi", "stream": true}', 400), (b'{"model": "M", "prompt": "hi", "n": 3}', 400),
    (b'{"model": "M", "prompt": "hi", "logprobs": 99}', 400), (b'{"model": "M", "prompt": [99999999]}', 400),
    (b'{"model": "other-model", "prompt": "hi"}', 404),
])
def test_bad_completion_bodies_get_openai_errors(server, model_name, body, status):
    code, answer = _raw(server, "POST", "/completions", body.replace(b'"M"', json.dumps(model_name).encode()))
    assert code == status
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]


def test_bad_chat_and_batch_bodies(server, model_name):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=model_name, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}],
                                       top_logprobs=2)
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-unknown", endpoint="/v1/completions", completion_window="24h")
    uploaded = client.files.create(file=("x.jsonl", b"{}\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.post("/batches", body={"input_file_id": uploaded.id, "endpoint": "/v1/completions",
                                      "completion_window": "1h"}, cast_to=object)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")


def test_unknown_ids_are_404(server):
    client = server.client()
    for call in (lambda: client.files.retrieve("file-nope"), lambda: client.files.content("file-nope"),
                 lambda: client.files.delete("../server.sqlite3"), lambda: client.batches.retrieve("batch-nope"),
                 lambda: client.batches.cancel("batch-nope")):
        with pytest.raises(openai.NotFoundError):
            call()


def test_api_key_is_required_everywhere(server, model_name):
    for key in (None, "", "sk-wrong", API_KEY + "x"):
        for method, path in (("GET", "/models"), ("GET", "/files"), ("GET", "/batches/batch-x"),
                             ("POST", "/completions"), ("GET", "/no-such-endpoint")):
            code, answer = _raw(server, method, path, b"{}" if method == "POST" else None, key=key)
            assert code == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="sk-wrong").completions.create(model=model_name, prompt="hi")


def test_upload_delete_and_size_limit(server):
    client = server.client()
    uploaded = client.files.create(file=("notes.jsonl", b'{"a": 1}\n'), purpose="batch")
    assert client.files.content(uploaded.id).content == b'{"a": 1}\n'
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_concurrent_clients_are_answered_correctly_and_share_blocks(server, llm, model_name):
    prompts = [f"Item {i}: a short story about a {word}" for i, word in
               enumerate(["cat", "dog", "ship", "tree", "robot", "river", "star", "city"] * 3)]
    before = stats(server)

    def ask(prompt):
        client = server.client()
        return client.completions.create(model=model_name, prompt=prompt, max_tokens=6, logprobs=0).choices[0]

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    expected = llm.generate(prompts, SamplingParams(max_new_tokens=6, logprobs=True))
    for answer, want in zip(answers, expected):
        assert answer.logprobs.token_logprobs == pytest.approx(want.logprobs, abs=1e-3)
        assert answer.text == want.text
    after = stats(server)
    requests = after["online_requests"] - before["online_requests"]
    blocks = after["online_blocks"] - before["online_blocks"]
    assert requests == len(prompts) and blocks < requests and after["largest_online_block"] > 1


def test_cancel_keeps_finished_results_and_stops_the_rest(server, model_name, tmp_path):
    requests = write_jsonl(tmp_path / "many.jsonl", batch_lines(64, model_name))
    client = server.client()
    uploaded = client.files.create(file=requests.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait_batch(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    results = batch_results(client, batch)
    counts = batch.request_counts
    assert len(results) == counts.completed + counts.failed < 64
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling again changes nothing


def move_deadline(data_dir: Path, batch_id: str, when: float) -> None:
    """Set a batch's `expires_at` in the server's own SQLite store, as its 24-hour window
    running out would (the server reads it before each block)."""
    db = sqlite3.connect(data_dir / "server.sqlite3", timeout=30)
    with db:
        doc = json.loads(db.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])
        db.execute("UPDATE batches SET doc = ? WHERE id = ?", (json.dumps({**doc, "expires_at": int(when)}), batch_id))
    db.close()


@pytest.mark.parametrize("when", ["running", "server down"])
def test_a_batch_whose_window_closes_expires_with_what_it_answered(default_model_store, llm, model_name, tmp_path,
                                                                     when):
    """With --expire-batches, a batch past its completion window stops after the running block
    (or at the start of a server that was down when it closed) and expires: the answered
    requests are in its output file as an uninterrupted run gives them, every other one in
    its error file as `batch_expired`, each exactly once."""
    requests = write_jsonl(tmp_path / "many.jsonl", batch_lines(64, model_name))
    server = ServerProcess(default_model_store, tmp_path / "data", "--expire-batches")
    try:
        batch = _a_block_answered(server, requests)
        if when == "running":
            batch = _close_window_while_running(server, batch)
        else:
            server, batch = _close_window_while_down(server, batch)
        assert batch.status == "expired" and batch.expired_at, batch
        client = server.client()
        output = records_by_id(client.files.content(batch.output_file_id).text)
        errors = records_by_id(client.files.content(batch.error_file_id).text)
    finally:
        server.stop()
    run_job(llm, requests, tmp_path / "run.jsonl", fmt="openai", defaults=SamplingParams(max_new_tokens=MAX_NEW_TOKENS),
            progress=False, model_name=model_name)
    expected = records_by_id((tmp_path / "run.jsonl").read_text())
    assert output and errors and not set(output) & set(errors) and set(output) | set(errors) == set(expected)
    assert output == {i: expected[i] for i in output}
    assert {e["error"]["code"] for i, e in errors.items() if not expected[i]["error"]} == {"batch_expired"}
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(output), len(errors))


FINAL = ("completed", "failed", "expired", "cancelled")


def _a_block_answered(server: ServerProcess, requests: Path):
    """A batch of `requests` created with a 24-hour window, once a block of it is answered."""
    client = server.client()
    uploaded = client.files.create(file=requests.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    assert batch.expires_at == batch.created_at + 24 * 3600
    while batch.request_counts.completed < BLOCK and batch.status not in FINAL:
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "in_progress", batch
    return batch


def _close_window_while_running(server: ServerProcess, batch):
    """The batch's window closed while it runs; returns the batch once final."""
    client = server.client()
    while batch.status not in FINAL:
        move_deadline(server.data_dir, batch.id, time.time())  # again: the server may write an older copy back
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    return batch


def _close_window_while_down(server: ServerProcess, batch):
    """SIGKILL the server, close the batch's window, start the server again on the same data
    dir: returns (the new server, the batch once final)."""
    server.kill()
    move_deadline(server.data_dir, batch.id, time.time())
    server = ServerProcess(server.model, server.data_dir, "--expire-batches")
    try:
        return server, wait_batch(server.client(), batch.id, until=FINAL)
    except BaseException:
        server.stop()
        raise


def test_online_requests_are_answered_while_a_batch_runs(server, llm, model_name, tmp_path):
    requests = write_jsonl(tmp_path / "long.jsonl", batch_lines(48, model_name))
    client = server.client()
    uploaded = client.files.create(file=requests.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    wait_batch(client, batch.id, until=("in_progress", "completed"))
    answer = client.completions.create(model=model_name, prompt="Two plus two is", max_tokens=4)
    during = client.batches.retrieve(batch.id)
    assert answer.choices[0].text == llm.generate("Two plus two is", max_new_tokens=4)[0].text
    assert during.status == "in_progress" and during.request_counts.completed < 42  # waited one block at most
    assert wait_batch(client, batch.id).status == "completed"


ANSWER_SCHEMA = {"type": "object", "properties": {"planet": {"enum": ["Mars", "Venus", "Jupiter"]},
                                                  "moons": {"type": "integer", "minimum": 0, "maximum": 99}},
                 "required": ["planet", "moons"], "additionalProperties": False}


def test_chat_response_format_through_the_openai_client(server, llm, model_name):
    """OpenAI's json_schema response_format on the server: the text parses, validates against
    the schema, and equals LLM.chat with the same response_format; a schema that is not one
    gets a 400 before any work."""
    import jsonschema
    import openai

    messages = [{"role": "user", "content": "Name a planet and how many moons it has."}]
    response_format = {"type": "json_schema", "json_schema": {"name": "planet", "schema": ANSWER_SCHEMA}}
    result = server.client().chat.completions.create(model=model_name, messages=messages, max_tokens=24,
                                                     response_format=response_format)
    text = result.choices[0].message.content
    jsonschema.validate(json.loads(text), ANSWER_SCHEMA)
    assert result.choices[0].finish_reason == "stop"
    expected = llm.chat(messages, SamplingParams(max_new_tokens=24, response_format=response_format))[0]
    assert text == expected.text
    broken = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=model_name, messages=messages, max_tokens=8,
                                                response_format=broken)
