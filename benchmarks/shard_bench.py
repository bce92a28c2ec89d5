"""Sharded-job benchmark: one job on 2 torchrun ranks x 1 thread vs 1 process x 1 thread.

Both sides run the same `flexbatch run` command on the default model (SmolLM2-135M) over
the same prompts, with the same block size, each process on one thread (OMP_NUM_THREADS=1):
  one   python -m flexbatch run ...
  two   python -m torch.distributed.run --standalone --nproc-per-node 2 -m flexbatch run ...
They alternate, `--repeats` times each, and the best of each counts (other work on a shared
machine only ever slows a run down). Two figures:
  generation  generated tokens / the job phase's seconds (from each process's summary; for
              two ranks the slower rank's, since they run at once)
  end to end  generated tokens / the whole command's wall time (imports, model load,
              rendezvous and, for two ranks, the merge)
The outputs of the two sides must be identical (ids and texts), or the script stops.
On a machine with fewer than 2 free cores the ratio cannot reach 2. Last line: one JSON object.

    python benchmarks/shard_bench.py --num-prompts 96 --max-new-tokens 32 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["the sea", "a mountain", "bread", "a library", "the moon", "rain", "a bicycle", "coffee"]


def prompts(n: int) -> list[str]:
    return [f"Write two sentences about {TOPICS[i % len(TOPICS)]} and the number {i}." for i in range(n)]


def run(command: list[str], work: Path) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:6])} ... failed:\n{done.stderr[-3000:]}")
    return seconds, done.stderr


def job_phase(stderr: str) -> tuple[int, float]:
    """(generated tokens over all processes, seconds of the slowest process's job phase)."""
    found = [(int(t), float(s)) for t, s in re.findall(r"generated tokens: (\d+) in ([\d.]+)s", stderr)]
    return sum(t for t, _ in found), max(s for _, s in found)


def texts(path: Path) -> dict[str, str]:
    return {r["id"]: r["text"] for r in map(json.loads, path.read_text().splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per block (both sides)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="shard_bench_"))
    src = work / "prompts.jsonl"
    lines = [json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts(args.num_prompts))]
    src.write_text("".join(lines))
    flags = ["run", str(src), "--dtype", "float32", "--no-plan", "--batch-size", str(args.batch_size),
             "--max-new-tokens", str(args.max_new_tokens), "--ignore-eos"]
    sides = {"one": [sys.executable, "-m", "flexbatch"],
             "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     "-m", "flexbatch"]}
    load_before = os.getloadavg()[0]
    best: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for side, launcher in sides.items():
            out = work / f"{side}-{repeat}.jsonl"
            wall, stderr = run([*launcher, *flags, "-o", str(out)], work)
            tokens, phase = job_phase(stderr)
            row = {"tokens": tokens, "phase_s": round(phase, 2), "wall_s": round(wall, 2),
                   "tok_s": round(tokens / phase, 1), "wall_tok_s": round(tokens / wall, 1), "output": out}
            label = "1 process" if side == "one" else "2 ranks"
            print(f"{label:>9}, repeat {repeat}: {tokens} tokens, job phase {phase:.1f}s "
                  f"({row['tok_s']} tok/s), command {wall:.1f}s ({row['wall_tok_s']} tok/s)", flush=True)
            if side not in best or row["tok_s"] > best[side]["tok_s"]:
                best[side] = row
    if texts(best["one"]["output"]) != texts(best["two"]["output"]):
        sys.exit("the two-rank output differs from the one-process output")
    for row in best.values():
        row.pop("output")
    result = {"bench": "shard", "model": "SmolLM2-135M-Instruct (default)", "requests": args.num_prompts,
              "max_new_tokens": args.max_new_tokens, "block": args.batch_size, "threads_per_process": 1,
              "one_rank": best["one"], "two_ranks": best["two"],
              "ratio_generation": round(best["two"]["tok_s"] / best["one"]["tok_s"], 2),
              "ratio_end_to_end": round(best["two"]["wall_tok_s"] / best["one"]["wall_tok_s"], 2),
              "cores": os.cpu_count(), "load_avg_before": round(load_before, 2),
              "load_avg_after": round(os.getloadavg()[0], 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
