"""flexbatch serve vs flexbatch run on the same requests.

1. `flexbatch run` over a batch file (the reference: generated tokens / job seconds);
2. the same requests sent online by C concurrent async openai clients (tokens / wall time);
3. the same file as a batch through the Files and Batches APIs (create -> completed);
4. optionally, another batch during which the server is killed with SIGKILL K times and
   restarted: requests lost and duplicated.

    .venv/bin/python benchmarks/serve_bench.py --num-requests 1000 --concurrency 64 --kills 5

Prints a table, and as its last line one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from serve_util import ServerProcess, records_by_id, stats, wait_batch  # noqa: E402

WORDS = ["river", "castle", "engine", "forest", "market", "violin", "planet", "harbor", "garden", "letter"]


def make_requests(n: int, max_tokens: int, model: str) -> list[dict]:
    """Short prompts of similar length, greedy, a fixed number of tokens each (ignore_eos,
    so every request generates exactly max_tokens and both sides do the same work)."""
    return [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": model, "max_tokens": max_tokens, "ignore_eos": True,
                      "prompt": f"Request {i}: write about a {WORDS[i % 10]} and a {WORDS[i // 10 % 10]}"}}
            for i in range(n)]


def engine_flags(args) -> list[str]:
    return ["--dtype", args.dtype, "--no-plan", "--batch-size", str(args.batch_size)]


def run_cli(args, requests: Path, output: Path) -> dict:
    cmd = [sys.executable, "-m", "flexbatch", "run", str(requests), "-o", str(output), "--model", args.model,
           *engine_flags(args)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    tokens, seconds = re.search(r"generated tokens: (\d+) in ([\d.]+)s", done.stderr).groups()
    return {"tokens": int(tokens), "seconds": float(seconds), "tok_per_s": int(tokens) / float(seconds)}


async def online(server: ServerProcess, records: list[dict], concurrency: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.base_url, api_key=server_key(), max_retries=0, timeout=3600)
    queue: asyncio.Queue = asyncio.Queue()
    for r in records:
        queue.put_nowait(r["body"])
    tokens = 0

    async def worker():
        nonlocal tokens
        while not queue.empty():
            body = dict(queue.get_nowait())
            extra = {"ignore_eos": body.pop("ignore_eos")}
            result = await client.completions.create(**body, extra_body=extra)
            tokens += result.usage.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    await client.close()
    engine = stats(server)  # how the engine formed its blocks: blocks, requests, joined, largest
    return {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds,
            "engine": {k: v for k, v in engine.items() if k.startswith(("online", "joined", "largest"))}}


def server_key() -> str:
    from serve_util import API_KEY

    return API_KEY


def batch_via_api(server: ServerProcess, requests: Path) -> tuple[dict, dict]:
    client = server.client(timeout=3600)
    uploaded = client.files.create(file=requests.open("rb"), purpose="batch")
    started = time.perf_counter()
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    batch = wait_batch(client, batch.id, timeout=24 * 3600)
    seconds = time.perf_counter() - started
    records = records_by_id(client.files.content(batch.output_file_id).text)
    tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in records.values())
    return {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds}, records


def killed_batch(args, server: ServerProcess, requests: Path, data_dir: Path, reference: dict) -> dict:
    """Kill -9 the server `args.kills` times during one batch; compare with the reference."""
    client = server.client()
    uploaded = client.files.create(file=requests.open("rb"), purpose="batch")
    batch_id = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                     completion_window="24h").id
    total, kills = len(reference), 0
    for k in range(args.kills):
        target = (k + 1) * total // (args.kills + 1)
        while (batch := client.batches.retrieve(batch_id)).request_counts.completed < target:
            if batch.status == "completed":
                break
            time.sleep(0.1)
        if batch.status == "completed":
            break
        server.kill()
        kills += 1
        server = ServerProcess(Path(args.model), data_dir, *engine_flags(args), "--max-new-tokens", "64")
        client = server.client()
    batch = wait_batch(client, batch_id, timeout=24 * 3600)
    text = client.files.content(batch.output_file_id).text
    server.stop()
    ids = [json.loads(line)["custom_id"] for line in text.splitlines()]
    got = records_by_id(text) if len(ids) == len(set(ids)) else {}
    for record in (*got.values(), *reference.values()):
        record["response"]["body"].pop("created", None)
    return {"kills": kills, "lost": len(set(reference) - set(ids)), "duplicated": len(ids) - len(set(ids)),
            "identical": got == reference}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the default model's converted store)")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kills", type=int, default=0, help="SIGKILLs during a fourth batch (0: skip it)")
    args = p.parse_args()
    if args.model is None:
        from flexbatch.default_model import default_model_path

        args.model = str(default_model_path())
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model_name = Path(args.model).name
    records = make_requests(args.num_requests, args.max_tokens, model_name)
    requests = work / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in records))

    run = run_cli(args, requests, work / "run.jsonl")
    reference = records_by_id((work / "run.jsonl").read_text())
    server = ServerProcess(Path(args.model), work / "data", *engine_flags(args), "--max-new-tokens", "64")
    try:
        served = asyncio.run(online(server, records, args.concurrency))
        batch, batch_records = batch_via_api(server, requests)
    except BaseException:
        server.stop()
        raise
    kill = killed_batch(args, server, requests, work / "data", reference) if args.kills else None
    if not kill:
        server.stop()
    result = {"requests": args.num_requests, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
              "block": args.batch_size, "run_tok_s": round(run["tok_per_s"], 2),
              "online_tok_s": round(served["tok_per_s"], 2), "batch_api_tok_s": round(batch["tok_per_s"], 2),
              "online_vs_run": round(served["tok_per_s"] / run["tok_per_s"], 3),
              "batch_api_vs_run": round(batch["tok_per_s"] / run["tok_per_s"], 3),
              "batch_api_identical_to_run": batch_records == {k: v for k, v in reference.items()},
              "online_engine": served["engine"],
              "kill": kill}
    print(f"{'':24}{'tokens':>10}{'seconds':>10}{'tok/s':>10}")
    for name, row in (("flexbatch run", run), (f"online x{args.concurrency}", served), ("batch via API", batch)):
        print(f"{name:24}{row['tokens']:>10}{row['seconds']:>10.1f}{row['tok_per_s']:>10.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
