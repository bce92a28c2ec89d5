"""Inputs and oracles shared by the sharded-job tests (test_shards.py, test_torchrun.py)."""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess

import torch

MAX_NEW_TOKENS = 16


@contextlib.contextmanager
def one_thread():
    """torch on one thread: the tiny models gain nothing from more, and on a busy 2-core
    machine OpenMP's spinning threads make each step many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def token_prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Prompts of token ids (the tiny models have no tokenizer), of varied lengths so the
    runner's length sort and padding matter."""
    rng = random.Random(seed)
    return [[rng.randrange(2, 256) for _ in range(rng.randrange(3, 24))] for _ in range(count)]


def write_batch_input(path, prompts, bad_line: bool = True) -> None:
    """OpenAI batch JSONL (custom_id req-0, req-1, ...), plus one invalid line whose error
    record must also appear exactly once."""
    with open(path, "w") as f:
        for i, ids in enumerate(prompts):
            body = {"prompt": ids, "max_tokens": MAX_NEW_TOKENS, "logprobs": 1}
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
                                "body": body}) + "\n")
        if bad_line:
            f.write(json.dumps({"custom_id": "bad", "method": "GET"}) + "\n")


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_results(path_a, path_b) -> bool:
    """The records of two outputs are equal, logprobs to within 1e-4: shards cut their
    segments smaller than one process does (jobs/runner.make_segments), and fp32 sums over
    other batch neighbours may round differently in the last bits. Refuses repeated ids."""
    return _close(by_id(path_a), by_id(path_b))


def _close(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y) <= 1e-4
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(map(_close, x, y))
    return x == y


def by_id(path) -> dict[str, dict]:
    """Records keyed by custom_id, without the only field that differs between runs
    (`created`, a timestamp); refuses a file holding an id twice."""
    out = {}
    for record in records(path):
        body = (record.get("response") or {}).get("body")
        if body:
            body.pop("created")
        assert record["custom_id"] not in out, f"{record['custom_id']} appears twice in {path}"
        out[record["custom_id"]] = record
    return out


def generated_tokens(path, count: int) -> list[list[int]]:
    """The generated token ids of requests req-0 .. req-{count-1} of an output, in that order."""
    found = by_id(path)
    return [found[f"req-{i}"]["response"]["body"]["choices"][0]["logprobs"]["token_ids"] for i in range(count)]


def hf_greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time (no padding): the
    model's forward over the whole sequence at each step (for these tiny models that is
    faster than `generate`'s per-step overhead)."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            sequence = torch.tensor([ids])
            for _ in range(MAX_NEW_TOKENS):
                next_id = model(sequence).logits[0, -1].argmax()
                sequence = torch.cat([sequence, next_id.view(1, 1)], dim=1)
            out.append(sequence[0, len(ids):].tolist())
    return out


KIND = "llama_mha_bias"
JOB_FLAGS = ["--dtype", "float32", "--no-plan", "--batch-size", "2", "--max-new-tokens", "16"]


def reference_job(tiny_model, work, num_prompts: int, seed: int = 0):
    """(model folder, input, the output of one process, the prompts) for a job of
    `num_prompts` token prompts; the one-process run is checked against transformers' greedy
    tokens on the same weights first, so it can serve as the sharded runs' oracle."""
    from flexbatch.cli.main import main

    folder, hf = tiny_model(KIND)
    prompts = token_prompts(num_prompts, seed=seed)
    src = work / "in.jsonl"
    write_batch_input(src, prompts)
    single = work / "single.jsonl"
    assert main(["run", str(src), "-o", str(single), "--model", str(folder), *JOB_FLAGS]) == 0
    assert generated_tokens(single, num_prompts) == hf_greedy(hf, prompts)
    return folder, src, single, prompts


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks: leave nothing running
        output, _ = proc.communicate()
        raise AssertionError(f"torchrun did not finish within {timeout}s:\n{output[-3000:]}") from None
    return proc.returncode, output
