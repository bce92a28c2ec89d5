"""Pipeline-stage benchmark: one job on 2 pipeline stages (2 processes x 1 thread) vs 1
process x 1 thread, every process confined to the same memory (page cache included).

Both sides run the same `flexbatch run` command with the planner choosing each process's
policy for its budget (--cpu-memory = the cgroup limit), on random weights in OPT-1.3B's
shape (benchmarks/dummy_model.py), greedy, every request generating --gen-len tokens:
  one     python -m flexbatch run ...                       (one cgroup of --memory)
  stages  torchrun --nproc-per-node 2 ... --pipeline-stages 2   (one cgroup of --memory per rank)
The limit is chosen so that one process must keep about half its weights on disk while
each stage holds its half of the layers in memory (FlexGen §4.4: stages gain more than the
extra cores, since each stage then reads less from disk). The page cache is dropped before
each run (root, cgroup v1). The sides alternate, --repeats times each, and the best counts.

Figures: generated tokens / the job phase's seconds (from the first process's summary),
their ratio, each process's peak memory, the planner's policy of each stage, and where each
stage's time went (computing its layers vs waiting). The outputs must be identical.
Last line: one JSON object.

    sudo python benchmarks/pipeline_bench.py --memory 2GiB --num-prompts 64 --gen-len 32
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from offload_bench import CGROUP, drop_page_cache  # noqa: E402


def write_prompts(path: Path, n: int, length: int) -> None:
    rng = random.Random(1234)
    with open(path, "w") as f:
        for i in range(n):
            ids = [rng.randrange(10, 32000) for _ in range(length)]
            f.write(json.dumps({"id": f"r{i}", "prompt": ids}) + "\n")


def confined(memory: int, group: str, command: str, pid: str = "$$") -> str:
    """A shell line that runs `command` inside a fresh cgroup v1 memory group of `memory` bytes
    (`pid`: how the line names the shell's own pid)."""
    g = CGROUP / group
    return (f"mkdir -p {g} && echo {memory} > {g}/memory.limit_in_bytes && echo {pid} > {g}/cgroup.procs && "
            f"exec {command}")


def flexbatch_run(args, work: Path, out: Path, stages: int) -> tuple[float, str, list[int]]:
    """(wall seconds, stderr, each process's peak memory) of one `flexbatch run`."""
    drop_page_cache()
    for stale in out.parent.glob(out.name + "*"):
        stale.unlink()
    flags = (f"run {work / 'in.jsonl'} -o {out} --model {args.model} --dtype bfloat16 --max-new-tokens {args.gen_len} "
             f"--ignore-eos --logprobs --cpu-memory {args.memory} --offload-dir {work / 'offload'}")
    groups = [f"flexbatch-pipeline-{os.getpid()}-{'$RANK' if stages > 1 else 'one'}"]
    python = f"{sys.executable} -m flexbatch {flags}"
    if stages > 1:
        # torchrun substitutes its own macros in the command ($$ stands for $)
        line = confined(args.memory_bytes, groups[0], f"{python} --pipeline-stages {stages}", pid="$$$$")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(stages),
                   "--no-python", "sh", "-c", line]
        groups = [groups[0].replace("$RANK", str(r)) for r in range(stages)]
    else:
        command = ["sh", "-c", confined(args.memory_bytes, groups[0], python)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    peaks = []
    for group in groups:
        g = CGROUP / group
        peaks.append(int((g / "memory.max_usage_in_bytes").read_text()))
        g.rmdir()
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:8])} ... failed:\n{(done.stderr or done.stdout)[-4000:]}")
    return wall, done.stderr, peaks


def job_phase(stderr: str) -> tuple[int, float]:
    tokens, seconds = re.findall(r"generated tokens: (\d+) in ([\d.]+)s", stderr)[-1]
    return int(tokens), float(seconds)


def texts(path: Path) -> dict[str, list[int]]:
    return {r["id"]: r["token_ids"] for r in map(json.loads, path.read_text().splitlines())}


def parse_bytes(text: str) -> int:
    from flexbatch.options import parse_bytes as parse

    return parse(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="opt-1.3b")
    ap.add_argument("--workdir", default="/tmp/flexbatch-bench")
    ap.add_argument("--memory", default="2GiB", help="each process's memory limit (page cache included)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    args.memory_bytes = parse_bytes(args.memory)
    work = Path(args.workdir)
    args.model = work / args.shape
    if not (args.model / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dummy_model.py"), args.shape, str(args.model)],
                       check=True)
    work = work / "pipeline"
    work.mkdir(parents=True, exist_ok=True)
    write_prompts(work / "in.jsonl", args.num_prompts, args.prompt_len)
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, stages in (("one", 1), ("stages", 2)):
            out = work / f"out-{name}.jsonl"
            wall, stderr, peaks = flexbatch_run(args, work, out, stages)
            tokens, seconds = job_phase(stderr)
            result = {"tokens": tokens, "job_s": seconds, "throughput": tokens / seconds, "wall_s": wall,
                      "peak_gib": [round(p / 2**30, 3) for p in peaks],
                      "planner": re.findall(r"planner: (?:stage \d+: )?block.*", stderr),
                      "stage_times": re.findall(r"pipeline stage .*", stderr)}
            print(f"{name}: {tokens} tokens in {seconds:.1f}s = {result['throughput']:.2f} tok/s; peak "
                  f"{result['peak_gib']} GiB", file=sys.stderr)
            for line in result["planner"] + result["stage_times"]:
                print(f"  {line}", file=sys.stderr)
            if name not in best or result["throughput"] > best[name]["throughput"]:
                best[name] = result
    same = texts(work / "out-one.jsonl") == texts(work / "out-stages.jsonl")
    ratio = best["stages"]["throughput"] / best["one"]["throughput"]
    print(f"2 stages / 1 process: {ratio:.2f}x (outputs identical: {same})", file=sys.stderr)
    print(json.dumps({"shape": args.shape, "memory": args.memory, "num_prompts": args.num_prompts,
                      "prompt_len": args.prompt_len, "gen_len": args.gen_len, "one": best["one"],
                      "stages": best["stages"], "ratio": round(ratio, 3), "identical_outputs": same}))


if __name__ == "__main__":
    main()
