"""No request can stop a job: a hostile input file, fuzzed request bodies, an engine that
raises on one request. Every bad line gets an error record that names its problem, every good
line the result `LLM.generate` gives for the same prompt, and the job finishes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flexbatch import LLM, SamplingParams
from flexbatch.jobs.inputs import JobRequest, _fill_openai
from flexbatch.jobs.runner import Prepared, prepare_or_error, run_job

PARAMS = SamplingParams(max_new_tokens=4)


def line(custom_id, body, url="/v1/completions", **extra):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra})


def chat(custom_id, messages, **fields):
    return line(custom_id, {"messages": messages, **fields}, url="/v1/chat/completions")


USER = [{"role": "user", "content": "Say hi"}]
# (line, a phrase its error message must contain), each a different way for a line to be bad
HOSTILE = [
    ('{"custom_id": "torn", "method": "POST", ', "not valid JSON"),
    ("[1, 2, 3]", "JSON array, expected an object"),
    ('"just a string"', "JSON string, expected an object"),
    ("42", "JSON number, expected an object"),
    ("null", "JSON null, expected an object"),
    ("[" * 50_000 + "]" * 50_000, "nests JSON too deeply"),
    (json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/completions"}), "missing field(s) body"),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}), "missing field(s) custom_id"),
    (line(None, {"prompt": "x"}), "custom_id must be a non-empty string, got null"),
    (line("", {"prompt": "x"}), "custom_id must be a non-empty string"),
    (line({"a": 1}, {"prompt": "x"}), "custom_id must be a non-empty string"),
    (json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {}}), "method 'GET'"),
    (line("emb", {"input": "x"}, url="/v1/embeddings"), "/v1/embeddings"),
    (line("urlnum", {"prompt": "x"}, url=7), "url 7 is not supported"),
    (line("bodylist", ["prompt"]), "body must be a JSON object"),
    (line("bodystr", "prompt"), "body must be a JSON object"),
    (line("noprompt", {"max_tokens": 3}), "prompt must be a string or a list of token ids, got null"),
    (line("promptnum", {"prompt": 12.5}), "prompt must be a string or a list of token ids"),
    (line("twoprompts", {"prompt": ["a", "b"]}), "send one prompt per request"),
    (line("emptyprompt", {"prompt": ""}), "prompt is empty"),
    (line("negids", {"prompt": [1, -5, 3]}), "prompt must be a string or a list of token ids"),
    (line("bigids", {"prompt": [1, 10**9]}), "outside the model's vocabulary"),
    (line("promptobj", {"prompt": {"text": "x"}}), "prompt must be a string or a list of token ids"),
    (chat("msgstr", "hello"), "messages must be a non-empty list"),
    (chat("msgempty", []), "messages must be a non-empty list"),
    (chat("msgnotobj", ["hi"]), "messages[0]: a message must be an object"),
    (chat("wizard", [{"role": "wizard", "content": "x"}]), "role \"wizard\" is not supported"),
    (chat("norole", [{"content": "x"}]), "role null is not supported"),
    (chat("contentnum", [{"role": "user", "content": 42}]), "content must be a string or a non-empty list"),
    (chat("contentnull", [{"role": "user", "content": None}]), "content must be a string or a non-empty list"),
    (chat("image", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "content part of type \"image_url\" is not supported"),
    (chat("partnotext", [{"role": "user", "content": [{"type": "text"}]}]), "a text part needs a string `text`"),
    (chat("parttextnum", [{"role": "user", "content": [{"type": "text", "text": 5}]}]), "a text part needs a string"),
    (chat("tools", [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}, *USER]),
     "tool_calls in a message is not supported"),
    (chat("systemlast", [{"role": "system", "content": "Be brief."}]), "the last message is a system message"),
    (line("maxzero", {"prompt": "x", "max_tokens": 0}), "max_tokens must be in [1,"),
    (line("maxstr", {"prompt": "x", "max_tokens": "10"}), "max_tokens must be an integer, got \"10\""),
    (line("maxfrac", {"prompt": "x", "max_tokens": 1.5}), "max_tokens must be an integer"),
    ('{"custom_id": "tinf", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "temperature": '
     'Infinity}}', "temperature must be a finite number"),
    ('{"custom_id": "tnan", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "temperature": '
     'NaN}}', "temperature must be a finite number"),
    (line("tneg", {"prompt": "x", "temperature": -1}), "temperature must be in [0, 2]"),
    (line("thot", {"prompt": "x", "temperature": 5}), "temperature must be in [0, 2]"),
    (line("topp0", {"prompt": "x", "top_p": 0}), "top_p must be in (0, 1]"),
    (line("topp2", {"prompt": "x", "top_p": 1.5}), "top_p must be in (0, 1]"),
    (line("topkneg", {"prompt": "x", "top_k": -1}), "top_k must be in [0,"),
    (line("seedbig", {"prompt": "x", "seed": 2**64}), "seed must be in"),
    (line("seedstr", {"prompt": "x", "seed": "abc"}), "seed must be an integer"),
    (line("stopnum", {"prompt": "x", "stop": 42}), "field stop must be"),
    (line("stopempty", {"prompt": "x", "stop": [""]}), "field stop must be"),
    (line("lpstr", {"prompt": "x", "logprobs": "yes"}), "logprobs must be true or false"),
    (line("n2", {"prompt": "x", "n": 2}), "field n=2 is not supported"),
    (line("ntrue", {"prompt": "x", "n": True}), "field n=true is not supported"),
    (line("stream", {"prompt": "x", "stream": True}), "field stream=true is not supported"),
    (line("bias", {"prompt": "x", "logit_bias": {"1": 2}}), "'logit_bias' is not supported"),
    (line("long", {"prompt": "word " * 9000, "max_tokens": 4}), "exceeds the model's context"),
    (line("ok", {"prompt": "a duplicate id"}), "appears more than once"),
]
GOOD = {  # custom_id -> (line, how LLM.generate / LLM.chat is asked for the same result)
    "ok": (line("ok", {"prompt": "The capital of France is", "model": "anything", "user": "u1"}),
           ("generate", "The capital of France is")),
    "parts": (chat("parts", [{"role": "user", "content": [{"type": "text", "text": "Say"},
                                                          {"type": "text", "text": "hi"}]}]),
              ("chat", [{"role": "user", "content": "Say\nhi"}])),
    "developer": (chat("developer", [{"role": "developer", "content": "Be brief."}, *USER]),
                  ("chat", [{"role": "system", "content": "Be brief."}, *USER])),
    "ids": (line("ids", {"prompt": [504, 3575, 282]}), ("generate", [504, 3575, 282])),
    "7": (line(7, {"prompt": "Water boils at", "max_tokens": 4, "seed": 2**64 - 1}),
          ("generate", "Water boils at")),
}


@pytest.fixture(scope="module")
def llm(default_model_store):
    return LLM(default_model_store, dtype="float32", batch_size=4)


def hostile_file(path):
    body = [GOOD["ok"][0], *(text for text, _ in HOSTILE[:20]), GOOD["parts"][0], GOOD["developer"][0],
            *(text for text, _ in HOSTILE[20:]), GOOD["ids"][0], GOOD["7"][0]]
    data = "\ufeff".encode() + "\n".join(body).encode() + b"\n" + \
        b'{"custom_id": "latin1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "caf\xe9"}}\n'
    path.write_bytes(data)


def expected_output(llm, how):
    kind, what = how
    return (llm.chat(what, PARAMS) if kind == "chat" else llm.generate([what], PARAMS))[0]


def test_hostile_file_every_bad_line_gets_its_error_and_the_job_exits_0(llm, default_model_store, tmp_path):
    src, out = tmp_path / "hostile.jsonl", tmp_path / "out.jsonl"
    hostile_file(src)
    proc = subprocess.run([sys.executable, "-m", "flexbatch", "run", str(src), "-o", str(out), "--model",
                           str(default_model_store), "--dtype", "float32", "--batch-size", "4", "--max-new-tokens",
                           "4"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    bad = len(HOSTILE) + 1  # + the line that is not UTF-8
    assert bad >= 40
    assert f"{len(GOOD)} completed now, {bad} errors" in proc.stderr
    records = [json.loads(x) for x in out.read_text().split("\n")[:-1]]
    assert len(records) == len(GOOD) + bad
    errors = [r for r in records if r["error"]]
    assert len(errors) == bad and all(r["response"]["status_code"] == 400 for r in errors)
    messages = sorted(r["error"]["message"] for r in errors)
    for text, phrase in HOSTILE:
        assert any(phrase in m for m in messages), (phrase, text[:80])
    assert any("is not valid UTF-8" in m for m in messages)
    results = {r["custom_id"]: r["response"]["body"] for r in records if not r["error"]}
    assert set(results) == set(GOOD)
    for custom_id, (_, how) in GOOD.items():
        choice = results[custom_id]["choices"][0]
        text = choice["message"]["content"] if how[0] == "chat" else choice["text"]
        assert text == expected_output(llm, how).text, custom_id


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=10)
FIELDS = st.sampled_from(["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                          "logprobs", "n", "stream", "echo", "ignore_eos", "model", "role", "content", "x"])
BODIES = st.dictionaries(FIELDS, JSON | st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "bot"]), "content": JSON}), max_size=3), max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, chat_url=st.booleans(), chat_flag=st.booleans())
def test_fuzzed_bodies_never_raise(llm, body, chat_url, chat_flag):
    request = JobRequest(id="line-1", line=1)
    url = "/v1/chat/completions" if chat_url else "/v1/completions"
    error = _fill_openai(request, {"custom_id": "c", "method": "POST", "url": url, "body": body})
    request.error = error
    item = prepare_or_error(llm, request, PARAMS, chat_flag)
    assert isinstance(item, (Prepared, str))
    if isinstance(item, Prepared):
        assert item.token_ids and all(0 <= t < llm.config.vocab_size for t in item.token_ids)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies=st.lists(BODIES, min_size=1, max_size=4))
@example(bodies=[{"prompt": {"\x85": None}}])  # echoed in the error message: a line break to str.splitlines
def test_fuzzed_files_always_finish_with_one_line_per_request(llm, tmp_path_factory, bodies):
    folder = tmp_path_factory.mktemp("fuzz")
    src = folder / "in.jsonl"
    src.write_text("".join(line(f"r{i}", {**b, "max_tokens": 2}) + "\n" for i, b in enumerate(bodies)))
    summary = run_job(llm, src, folder / "out.jsonl", defaults=PARAMS, progress=False)
    records = [json.loads(x) for x in (folder / "out.jsonl").read_text().split("\n")[:-1]]
    assert sorted(r["custom_id"] for r in records) == sorted(f"r{i}" for i in range(len(bodies)))
    assert summary.completed + summary.errors == len(bodies)


def run_lines(llm, folder, prompts: list[str]):
    """(summary, records by id) of a job over a text file of `prompts`."""
    src = folder / "in.txt"
    src.write_text("\n".join(prompts) + "\n")
    summary = run_job(llm, src, folder / "out.jsonl", defaults=PARAMS, progress=False)
    return summary, {r["id"]: r for r in map(json.loads, (folder / "out.jsonl").read_text().split("\n")[:-1])}


def test_a_request_that_makes_the_engine_raise_costs_only_that_request(llm, tmp_path, monkeypatch):
    prompts = ["The capital of France is", "Water boils at", "POISON pill", "My favourite colour is",
               "The moon is", "Once upon a time", "def square(x):", "Two plus two is"]
    poison = llm.encode("POISON pill")
    real = llm.generate_ids

    def flaky(prompt_ids, params=None, **kw):
        if poison in prompt_ids:
            raise RuntimeError("injected kernel failure")
        return real(prompt_ids, params, **kw)

    monkeypatch.setattr(llm, "generate_ids", flaky)
    summary, records = run_lines(llm, tmp_path, prompts)
    monkeypatch.undo()
    assert summary.completed == 7 and summary.errors == 1 and summary.engine_errors == 1
    assert "injected kernel failure" in records["line-3"]["error"]
    direct = llm.generate([p for p in prompts if "POISON" not in p], PARAMS)
    texts = [records[f"line-{i + 1}"]["text"] for i, p in enumerate(prompts) if "POISON" not in p]
    assert texts == [d.text for d in direct]


def test_a_result_whose_record_cannot_be_built_becomes_an_error_record(llm, tmp_path, monkeypatch):
    """The record of one finished request raises (as a tokenizer might on its logprobs): that
    request gets an error record, every other its result, and the counts agree with the file."""
    import flexbatch.jobs.runner as job_runner

    prompts = ["The capital of France is", "Water boils at", "Once upon a time", "The moon is"]
    real = job_runner.simple_record

    def fragile(req, model, output=None, **kw):
        if output is not None and req.id == "line-2":
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "injected: a lone surrogate")
        return real(req, model, output=output, **kw)

    monkeypatch.setattr(job_runner, "simple_record", fragile)
    summary, records = run_lines(llm, tmp_path, prompts)
    monkeypatch.undo()
    assert sorted(records) == [f"line-{i}" for i in range(1, 5)]
    assert "injected: a lone surrogate" in records["line-2"]["error"]
    assert summary.completed == 3 and summary.errors == 1
    direct = llm.generate(prompts, PARAMS)
    assert [records[f"line-{i}"]["text"] for i in (1, 3, 4)] == [direct[i].text for i in (0, 2, 3)]
