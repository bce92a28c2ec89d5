"""Continuous refill offloaded: the same requests, policy and memory limit, with rows refilled
as sequences finish, and without (static blocks, each waiting for its longest sequence).

Requests: --requests prompts of --prompt-len random tokens, each with its own max_new_tokens
drawn from --gen-range (EOS ignored: the lengths of a stop-at-EOS workload, known ahead so
both runs generate exactly the same tokens). Weights are random in a published OPT shape
(benchmarks/dummy_model.py), on disk as the policy says; each run is a fresh process in a
cgroup v1 memory group of --memory, after the page cache is dropped (offload_bench.py).

    sudo python benchmarks/refill_bench.py --shape opt-1.3b --memory 2GiB --block 8x2 --requests 64

Prints one line per mode and, last, one JSON object (ratio: refill over static).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from offload_bench import prompts, run_child  # noqa: E402


def child(spec: dict) -> dict:
    """One run: `spec["mode"]` "refill" (every request in one call: rows refill) or "static"
    (one call per block of requests: nothing joins a block)."""
    from flexbatch import LLM, SamplingParams
    from flexbatch.config import Policy

    policy = Policy(**spec["policy"])
    rng = random.Random(7)
    lo, hi = spec["gen_range"]
    params = [SamplingParams(max_new_tokens=rng.randint(lo, hi), ignore_eos=True) for _ in range(spec["requests"])]
    ids = prompts(spec["requests"], spec["prompt_len"])
    with LLM(spec["model"], dtype="bfloat16", policy=policy, offload_dir=spec["offload_dir"],
             cpu_memory=spec["memory"]) as llm:
        llm.generate(prompts(1, 8), SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
        began = time.perf_counter()
        if spec["mode"] == "refill":
            outs = llm.generate_ids(ids, params)
        else:
            block = policy.block_size
            outs = [out for s in range(0, len(ids), block)
                    for out in llm.generate_ids(ids[s:s + block], params[s:s + block])]
        seconds = time.perf_counter() - began
    return {"tokens": sum(len(o.token_ids) for o in outs), "prefill_s": 0.0, "decode_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="opt-1.3b")
    p.add_argument("--workdir", default="/tmp/flexbatch-bench")
    p.add_argument("--memory", default="2GiB", help="memory limit of each run, page cache included")
    p.add_argument("--block", default="8x2", help="GPU batch size x number of GPU batches (the same for both runs)")
    p.add_argument("--weights-disk", type=float, default=1.0, help="fraction of the weights on disk")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-range", default="8,128", help="max_new_tokens drawn uniformly from LO,HI")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.spec))))
        return
    from dummy_model import write_dummy

    from flexbatch.cli.common import parse_bytes

    memory = parse_bytes(args.memory)
    work = Path(args.workdir)
    model = write_dummy(args.shape, work / args.shape)
    gbs, ngb = (int(v) for v in args.block.split("x"))
    policy = {"gpu_batch_size": gbs, "num_gpu_batches": ngb, "weights_device": 1 - args.weights_disk,
              "weights_host": 0.0, "cache_device": 1.0, "cache_host": 0.0}
    spec = {"model": str(model), "policy": policy, "requests": args.requests, "prompt_len": args.prompt_len,
            "gen_range": [int(v) for v in args.gen_range.split(",")], "memory": memory,
            "offload_dir": str(work / "refill-offload")}
    results = {}
    for mode in ("static", "refill"):
        results[mode] = r = run_child(mode, {**spec, "mode": mode}, memory, __file__)
        line = r.get("error") or (f"{r['throughput']:.3f} tok/s ({r['tokens']} tokens in {r['decode_s']:.1f}s), "
                                  f"peak {r['peak_bytes'] / 2**30:.2f} GiB")
        print(f"{mode:7s} block {args.block}: {line}", flush=True)
    ok = all("error" not in r for r in results.values())
    ratio = results["refill"]["throughput"] / results["static"]["throughput"] if ok else None
    print(json.dumps({"shape": args.shape, "memory_bytes": memory, "block": args.block, "requests": args.requests,
                      "prompt_len": args.prompt_len, "gen_range": spec["gen_range"], "policy": policy,
                      "results": results, "refill_over_static": ratio}))


if __name__ == "__main__":
    main()
