"""The batch-job runner: formats, error records, crash and resume, the output lock."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flexbatch import LLM, SamplingParams
from flexbatch.errors import ConfigError
from flexbatch.jobs.output import OutputFile
from flexbatch.jobs.runner import run_job

PROMPTS = ["The capital of France is", "Water boils at", "def square(x):", "My favourite colour is",
           "The moon is", "Once upon a time"]
PARAMS = SamplingParams(max_new_tokens=6)


@pytest.fixture(scope="module")
def llm(default_model_store):
    return LLM(default_model_store, dtype="float32", batch_size=4)


@pytest.fixture(scope="module")
def direct(llm):
    return {p: o for p, o in zip(PROMPTS, llm.generate(PROMPTS, PARAMS))}


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_openai_batch_format_round_trip(llm, direct, tmp_path):
    src = tmp_path / "batch.jsonl"
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "m", "prompt": p, "max_tokens": 6}} for i, p in enumerate(PROMPTS)]
    lines.append({"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6}})
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    before = src.read_bytes()
    summary = run_job(llm, src, tmp_path / "out.jsonl", defaults=PARAMS, progress=False)
    records = {r["custom_id"]: r for r in read(tmp_path / "out.jsonl")}
    assert src.read_bytes() == before and summary.completed == 7 and summary.errors == 0
    assert set(records) == {x["custom_id"] for x in lines}
    for i, p in enumerate(PROMPTS):
        body = records[f"req-{i}"]["response"]["body"]
        assert records[f"req-{i}"]["response"]["status_code"] == 200 and records[f"req-{i}"]["error"] is None
        assert body["object"] == "text_completion" and body["choices"][0]["text"] == direct[p].text
        assert body["usage"]["completion_tokens"] == len(direct[p].token_ids)
        assert body["usage"]["prompt_tokens"] == len(direct[p].prompt_token_ids)
    chat = records["chat-1"]["response"]["body"]
    expected = llm.chat([{"role": "user", "content": "Say hi"}], PARAMS)[0]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == expected.text


def test_batch_logprobs_take_openai_forms_with_top_alternatives(llm, tmp_path):
    """Completions' integer logprobs and chat's logprobs + top_logprobs give the engine's own
    alternatives, named by each token's text, in OpenAI's shapes; an unpaired top_logprobs is
    that request's error. (Values within 1e-4: batched with other requests, sums run in
    another order.)"""
    chat = [{"role": "user", "content": "Say hi"}]
    bodies = {"cmpl": {"prompt": PROMPTS[0], "max_tokens": 6, "logprobs": 3},
              "cmpl-own": {"prompt": PROMPTS[0], "max_tokens": 6, "logprobs": 0},
              "chat": {"messages": chat, "max_tokens": 6, "logprobs": True, "top_logprobs": 2},
              "chat-off": {"messages": chat, "max_tokens": 6, "logprobs": False, "top_logprobs": 2},
              "cmpl-unpaired": {"prompt": PROMPTS[0], "max_tokens": 6, "top_logprobs": 2}}
    src = tmp_path / "batch.jsonl"
    src.write_text("".join(json.dumps({"custom_id": cid, "method": "POST", "body": body,
                                       "url": "/v1/chat/completions" if "messages" in body else "/v1/completions"})
                           + "\n" for cid, body in bodies.items()))
    run_job(llm, src, tmp_path / "out.jsonl", defaults=PARAMS, progress=False)
    records = {r["custom_id"]: r for r in read(tmp_path / "out.jsonl")}
    decode = llm.tokenizer.decode

    (want,) = llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=6, top_logprobs=3))
    got = records["cmpl"]["response"]["body"]["choices"][0]["logprobs"]
    assert got["token_ids"] == want.token_ids and got["tokens"] == [decode([t]) for t in want.token_ids]
    assert got["token_logprobs"] == pytest.approx(want.logprobs, abs=1e-4)
    close = lambda lp: pytest.approx(lp, abs=1e-4)  # noqa: E731
    assert got["top_logprobs"] == [{decode([t]): close(lp) for t, lp in top} for top in want.top_logprobs]
    assert "".join(got["tokens"]) == records["cmpl"]["response"]["body"]["choices"][0]["text"]
    assert got["text_offset"] == [len("".join(got["tokens"][:i])) for i in range(len(got["tokens"]))]
    own = records["cmpl-own"]["response"]["body"]["choices"][0]["logprobs"]
    assert own["top_logprobs"] == [{decode([t]): close(lp)} for t, lp in zip(want.token_ids, want.logprobs)]

    (want,) = llm.chat(chat, SamplingParams(max_new_tokens=6, top_logprobs=2))
    content = records["chat"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert [c["token_id"] for c in content] == want.token_ids
    for item, token, alternatives in zip(content, want.token_ids, want.top_logprobs):
        assert item["token"] == decode([token]) and item["bytes"] == list(decode([token]).encode("utf-8"))
        named = [(a["token_id"], a["token"]) for a in item["top_logprobs"]]
        assert named == [(t, decode([t])) for t, _ in alternatives]
    for cid in ("chat-off", "cmpl-unpaired"):
        assert "top_logprobs needs logprobs=true" in records[cid]["error"]["message"]

    plain = tmp_path / "plain.txt"  # flat records, with --top-logprobs 2 job-wide
    plain.write_text(PROMPTS[1] + "\n")
    run_job(llm, plain, tmp_path / "plain.jsonl", defaults=SamplingParams(max_new_tokens=6, top_logprobs=2),
            progress=False)
    (record,) = read(tmp_path / "plain.jsonl")
    (want,) = llm.generate([PROMPTS[1]], SamplingParams(max_new_tokens=6, top_logprobs=2))
    assert record["token_ids"] == want.token_ids and record["logprobs"] == pytest.approx(want.logprobs, abs=1e-4)
    assert [[t for t, _ in top] for top in record["top_logprobs"]] == [[t for t, _ in top] for top in want.top_logprobs]


@pytest.mark.parametrize("fmt", ["jsonl", "text", "csv"])
def test_plain_formats_round_trip(llm, direct, tmp_path, fmt):
    if fmt == "jsonl":
        src = tmp_path / "in.jsonl"
        src.write_text("".join(json.dumps({"id": f"x{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
        ids = [f"x{i}" for i in range(len(PROMPTS))]
    elif fmt == "text":
        src = tmp_path / "in.txt"
        src.write_text("\n".join(PROMPTS) + "\n")
        ids = [f"line-{i + 1}" for i in range(len(PROMPTS))]
    else:
        src = tmp_path / "in.csv"
        src.write_text("id,prompt\n" + "".join(f'k{i},"{p}"\n' for i, p in enumerate(PROMPTS)))
        ids = [f"k{i}" for i in range(len(PROMPTS))]
    run_job(llm, src, tmp_path / "out.jsonl", defaults=PARAMS, progress=False)
    records = {r["id"]: r for r in read(tmp_path / "out.jsonl")}
    assert sorted(records) == sorted(ids)
    for rid, p in zip(ids, PROMPTS):
        assert records[rid]["text"] == direct[p].text
        assert records[rid]["completion_tokens"] == len(direct[p].token_ids)


def test_bad_lines_become_error_records(llm, tmp_path):
    src = tmp_path / "bad.jsonl"
    good = {"custom_id": "ok", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Hi", "max_tokens": 3}}
    src.write_bytes(b"\n".join([
        json.dumps(good).encode(),
        b'{"custom_id": "torn", "method": "POST", ',
        json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/completions"}).encode(),
        json.dumps({"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {}}).encode(),
        json.dumps({"custom_id": "long", "method": "POST", "url": "/v1/completions",
                    "body": {"prompt": "word " * 9000, "max_tokens": 4}}).encode(),
        json.dumps({"custom_id": "field", "method": "POST", "url": "/v1/completions",
                    "body": {"prompt": "Hi", "logit_bias": {"1": 2}}}).encode(),
        b'{"custom_id": "latin1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "caf\xe9"}}',
        json.dumps(good).encode(),
    ]) + b"\n")
    summary = run_job(llm, src, tmp_path / "out.jsonl", defaults=PARAMS, progress=False)
    records = read(tmp_path / "out.jsonl")
    assert len(records) == 8 and summary.completed == 1 and summary.errors == 7
    errors = {r["custom_id"]: r["error"]["message"] for r in records if r["error"]}
    assert "not valid JSON" in errors["line-2"]
    assert "missing field(s) body" in errors["nobody"]
    assert "/v1/embeddings" in errors["emb"]
    assert "exceeds the model's context" in errors["long"]
    assert "logit_bias" in errors["field"]
    assert "not valid UTF-8" in errors["line-7"]
    assert "appears more than once" in errors["ok#line-8"]
    assert all(r["response"]["status_code"] == 400 for r in records if r["error"])


def test_empty_input_is_a_clear_error(llm, tmp_path):
    src = tmp_path / "empty.txt"
    src.write_text("\n\n")
    with pytest.raises(ConfigError, match="no requests"):
        run_job(llm, src, tmp_path / "out.jsonl", progress=False)


def run_cli(src, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "flexbatch", "run", str(src), "-o", str(out), "--dtype", "float32",
                             "--batch-size", "3", "--max-new-tokens", "12", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def comparable(path):
    out = {}
    for r in read(path):
        out[r["id"]] = {k: v for k, v in r.items()}
    return out


@pytest.fixture(scope="module")
def job_input(tmp_path_factory, default_model_store):
    folder = tmp_path_factory.mktemp("job")
    src = folder / "prompts.txt"
    src.write_text("".join(f"Write one sentence about the number {i}.\n" for i in range(30)))
    reference = folder / "reference.jsonl"
    proc = run_cli(src, reference, "--model", str(default_model_store))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    return src, reference


def kill_when(proc, out, min_lines: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if out.exists() and out.read_text().count("\n") >= min_lines:
            break
        if proc.poll() is not None:
            raise AssertionError("the job finished before it could be killed")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("point", ["before_first_block", "between_blocks", "during_a_write"])
def test_kill_9_then_resume_gives_exactly_the_uninterrupted_results(job_input, default_model_store, tmp_path, point):
    src, reference = job_input
    out = tmp_path / "out.jsonl"
    proc = run_cli(src, out, "--model", str(default_model_store))
    kill_when(proc, out, {"before_first_block": 0, "between_blocks": 3, "during_a_write": 6}[point])
    if point == "during_a_write":  # what a write cut short leaves behind: half a line
        with open(out, "ab") as f:
            f.write(b'{"id": "line-99", "text": "half of a rec')
    resumed = run_cli(src, out, "--model", str(default_model_store))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    lines = out.read_text().splitlines()
    assert len(lines) == 30 and len({json.loads(x)["id"] for x in lines}) == 30
    assert comparable(out) == comparable(reference)


@pytest.mark.parametrize("via", ["same path", "symlink", "hard link"])
def test_second_concurrent_job_is_refused(job_input, default_model_store, tmp_path, via):
    src, _ = job_input
    out = tmp_path / "out.jsonl"
    held = OutputFile(out)  # what a running job holds
    target = {"same path": out, "symlink": tmp_path / "sym.jsonl", "hard link": tmp_path / "hard.jsonl"}[via]
    if via == "symlink":
        target.symlink_to(out)
    elif via == "hard link":
        os.link(out, target)
    try:
        proc = run_cli(src, target, "--model", str(default_model_store))
        assert proc.wait(timeout=300) == 2
        assert "another flexbatch job is writing" in proc.stderr.read()
    finally:
        held.close()
    assert out.stat().st_size == 0


def test_show_prints_each_result(default_model_store, tmp_path):
    src = tmp_path / "two.txt"
    src.write_text("The capital of France is\nWater boils at\n")
    out = tmp_path / "out.jsonl"
    proc = run_cli(src, out, "--model", str(default_model_store), "--show")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    for record in read(out):
        assert f"[{record['id']}] {record['text']}" in stdout


def test_kill_9_at_random_points_with_the_planner_on(default_model_store, tmp_path):
    """The planner chooses the block on the first run; every resume takes it from the job
    manifest, so the result equals an uninterrupted run with that policy."""
    import random

    src, out = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    src.write_text("".join(f"Name a city whose name starts with the letter {chr(65 + i)}.\n" for i in range(24)))
    planned = [sys.executable, "-m", "flexbatch", "run", str(src), "--dtype", "float32", "--max-new-tokens", "10",
               "--window", "8", "--model", str(default_model_store)]
    rng = random.Random(20261130)
    manifest_file = out.with_name("out.jsonl.job.json")
    for _ in range(3):
        proc = subprocess.Popen([*planned, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # the first kill comes after the planner has chosen and the job recorded it (start-up
        # takes longer on a loaded machine); later ones anywhere, recorded policy or not
        while not manifest_file.exists() and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(rng.uniform(0.5, 6.0))
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed = subprocess.run([*planned, "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads(manifest_file.read_text())
    assert "recorded in the job manifest" in resumed.stderr and len(manifest["runs"]) >= 2
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(manifest["settings"]["policy"]))
    reference = tmp_path / "reference.jsonl"
    uninterrupted = subprocess.run([*planned, "-o", str(reference), "--policy", str(policy)], capture_output=True,
                                   text=True, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert len(read(out)) == 24 and comparable(out) == comparable(reference)


def test_kill_9_at_random_points_of_a_refilling_bf16_job(default_model_store, tmp_path):
    """Requests of mixed lengths and max_tokens through a block of 4: rows refill all the
    time (engine/generation.py), and bf16 sums depend on the batch neighbours. A resume
    reruns the interrupted segment from its start, so every result equals the uninterrupted
    run's exactly."""
    import random

    rng = random.Random(1130)
    src = tmp_path / "requests.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": "Tell me about " + "the sea " * rng.randint(0, 12),
                                       "max_tokens": rng.randint(1, 24)}) + "\n" for i in range(40)))
    flags = ["--dtype", "bfloat16", "--batch-size", "4", "--logprobs", "--model", str(default_model_store)]
    reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    assert run_cli(src, reference, *flags).wait(timeout=600) == 0
    for _ in range(3):
        proc = run_cli(src, out, *flags)
        done = out.read_text().count("\n") if out.exists() else 0
        try:
            kill_when(proc, out, done + rng.randint(1, 8))
        except AssertionError:  # it finished first: nothing left to interrupt
            break
    resumed = run_cli(src, out, *flags)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert len(read(out)) == 40 and comparable(out) == comparable(reference)
    assert len({r["completion_tokens"] for r in read(reference)}) > 5, "requests must end at many different steps"


def test_kill_9_with_the_kv_cache_on_disk_never_reads_the_killed_runs_cache(default_model_store, tmp_path):
    """Weights in memory, KV cache on disk in a fixed offload folder, rows refilling: a kill -9
    leaves that run's cache files behind. Overwritten with NaN here, they would poison any
    attention that read a slot this run had not written (padding included); the resumed job
    starts its cache afresh, so every result equals the uninterrupted run's."""
    import random

    rng = random.Random(1201)
    src = tmp_path / "requests.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": "Name a fish of " + "the deep sea " * rng.randint(0, 6),
                                       "max_tokens": rng.randint(1, 16)}) + "\n" for i in range(24)))
    flags = ["--percent", "100", "0", "0", "0", "100", "0", "--batch-size", "4", "--gpu-batch-size", "2",
             "--num-gpu-batches", "2", "--logprobs", "--model", str(default_model_store)]
    reference, out, offload = tmp_path / "reference.jsonl", tmp_path / "out.jsonl", tmp_path / "offload"
    assert run_cli(src, reference, *flags, "--offload-dir", str(tmp_path / "fresh")).wait(timeout=600) == 0
    kill_when(run_cli(src, out, *flags, "--offload-dir", str(offload)), out, rng.randint(3, 10))
    stale = [f for f in (offload / "cache").iterdir() if f.stat().st_size]
    assert stale, "the killed run left no cache files to test with"
    for f in stale:
        f.write_bytes(b"\xff" * f.stat().st_size)  # NaN in bf16 and fp32 alike
    resumed = run_cli(src, out, *flags, "--offload-dir", str(offload))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert len(read(out)) == 24 and comparable(out) == comparable(reference)


def test_summary_says_what_the_offload_disk_did(default_model_store, llm, tmp_path):
    """A job with its weights and KV cache on disk reports the bytes moved (at least every
    weight once per block's prefill, sized from the model's shapes) and the disk's busy time
    within the run; an in-memory job reports no disk."""
    from flexbatch.config import Policy
    from flexbatch.sizing import layer_weight_bytes

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_device=0, weights_host=0, cache_device=0,
                    cache_host=0)
    with LLM(default_model_store, dtype="float32", policy=policy, offload_dir=tmp_path / "off") as offloaded:
        summary = run_job(offloaded, src, tmp_path / "out.jsonl", defaults=PARAMS, progress=False)
        cfg = offloaded.config
        weights = cfg.num_layers * layer_weight_bytes(cfg, offloaded.family, offloaded.dtype, None)
    blocks = -(-len(PROMPTS) // policy.block_size)
    assert summary.disk.moved >= blocks * weights
    assert 0 < summary.disk.busy_seconds <= summary.seconds
    assert any(line.startswith("offload disk: ") for line in summary.lines())
    in_memory = run_job(llm, src, tmp_path / "mem.jsonl", defaults=PARAMS, progress=False)
    assert in_memory.disk.moved == 0 and not any("offload disk" in line for line in in_memory.lines())


@pytest.mark.parametrize("busy, says_disk_bound", [(9.0, True), (5.0, False)])
def test_summary_names_the_disk_as_the_bound_when_it_was_busy_most_of_the_run(busy, says_disk_bound):
    from flexbatch.jobs.runner import JobSummary
    from flexbatch.storage.disk import DiskUse

    line = JobSummary(seconds=10.0, disk=DiskUse(int(18e9), busy)).disk_line()
    assert f"18.0 GB read and written, busy {busy * 10:.0f}% of the run at {18 / busy:.2f} GB/s" in line
    assert ("waited on the disk" in line) == says_disk_bound
    small = JobSummary(seconds=10.0, disk=DiskUse(int(5e6), busy)).disk_line()
    assert small.startswith("offload disk: 5.0 MB read and written")
