"""Planner benchmark: the cost model's predictions against measured runs, and the planner's
choice against a grid of hand-picked policies, on the offload benchmark's workload.

Each policy runs in a fresh child process under the same cgroup memory limit (page cache
included) as benchmarks/offload_bench.py. For every run it prints the predicted and the
measured throughput (FlexGen's metric: generated tokens / (prefill + decode)); "plan" is the
policy the planner picks inside the child, exactly as `flexbatch run` would. Needs root.

    sudo python benchmarks/planner_bench.py --shape opt-1.3b --memory 2GiB --grid
    sudo python benchmarks/planner_bench.py --shape opt-1.3b --memory 4GiB \\
        --policy '{"gpu_batch_size": 8}' --policy '{"gpu_batch_size": 8, "cache_device": 0}'

On a GPU (--gpu-memory): every run is capped at that much GPU memory (as in
benchmarks/gpu_bench.py; no cgroup, --memory is then only the host budget given to the
planner and the engine), and --grid runs a grid of GPU placements instead:

    python benchmarks/planner_bench.py --shape opt-2.7b --gpu-memory 4GiB --grid --max-block 256

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def grid() -> list[dict]:
    """12 hand-picked policies that fit 2 GiB for the OPT-1.3B shape at prompt 128 + 32:
    (gpu_batch_size, num_gpu_batches, weights in memory, KV cache in memory)."""
    picks = [(8, 1, 0, 1), (8, 1, .25, 1), (16, 1, 0, 1), (16, 1, .25, 1), (8, 2, .25, 1), (16, 2, 0, 1),
             (32, 1, 0, .5), (32, 2, 0, 0), (16, 4, 0, 0), (64, 1, 0, 0), (24, 2, 0, .25), (32, 2, .1, 0)]
    return [{"gpu_batch_size": g, "num_gpu_batches": n, "weights_device": w, "weights_host": 0,
             "cache_device": c, "cache_host": 0} for g, n, w, c in picks]


def gpu_grid() -> list[dict]:
    """12 hand-picked GPU policies for the OPT-2.7B shape at prompt 128 + 32 under a 4 GiB
    GPU cap: (gpu_batch_size, num_gpu_batches, weights GPU, weights host, cache GPU, cache
    host, CPU attention); what is on neither is on disk."""
    picks = [(16, 2, 0, 1, 1, 0, False), (32, 1, 0, 1, 1, 0, False), (32, 4, 0, 1, 0, 1, False),
             (32, 4, 0, 1, 0, 1, True), (64, 4, 0, 1, 0, 1, False), (64, 2, 0, 1, 0, 1, True),
             (64, 2, .2, .8, 0, 1, False), (32, 8, 0, 1, 0, 1, False), (64, 4, .3, .7, 0, 1, False),
             (32, 4, .1, .65, 0, 1, False), (16, 2, 0, 1, 0, 0, True), (64, 1, .1, .9, .3, .7, False)]
    keys = ("gpu_batch_size", "num_gpu_batches", "weights_device", "weights_host", "cache_device", "cache_host",
            "cpu_attention")
    return [dict(zip(keys, pick)) for pick in picks]


def main() -> None:
    from dummy_model import write_dummy
    from offload_bench import run_child

    from flexbatch.cli.common import parse_bytes
    from flexbatch.profiling import hardware_profile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="opt-1.3b")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "flexbatch-bench"))
    p.add_argument("--memory", default="2GiB", help="memory limit for every run, page cache included (with "
                                                  "--gpu-memory: the host budget only; 0 for free RAM)")
    p.add_argument("--gpu-memory", default=None, help="run on the GPU, each run capped at this much GPU memory")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--grid", action="store_true", help="run the 12-policy grid")
    p.add_argument("--policy", action="append", default=[], help="a policy as JSON (repeatable)")
    p.add_argument("--no-plan", action="store_true", help="do not run the planner's own choice")
    p.add_argument("--max-block", type=int, default=64, help="the planner's largest block (the workload's sequences)")
    p.add_argument("--refresh-disk", action="store_true", help="measure the disk again before every run, so each "
                                                                   "prediction uses the disk's speed of that moment")
    p.add_argument("--plan-compress", default="", help="also run the planner's choice with this compression "
                                                      "(weight, cache or both), comma separated")
    args = p.parse_args()
    memory = parse_bytes(args.memory) or None
    work = Path(args.workdir)
    model = write_dummy(args.shape, work / args.shape)
    hardware_profile(work, log=print)  # measured outside the memory limit, cached for the children
    on_gpu = args.gpu_memory is not None
    picks = (gpu_grid() if on_gpu else grid()) if args.grid else []
    # the planner's own choice first: a run cut short still compares it with what came after
    policies = ([] if args.no_plan else ["plan"]) + picks + [json.loads(x) for x in args.policy]
    common = {"model": str(model), "prompt_len": args.prompt_len, "gen_len": args.gen_len, "memory": memory,
              "offload_dir": str(work / "flexbatch-offload"), "max_block": args.max_block}
    if on_gpu:
        import gpu_bench

        common["gpu_memory"] = parse_bytes(args.gpu_memory)
        run_child = lambda kind, spec, _memory: gpu_bench.run_child(kind, spec)
    runs = []
    compressed_plans = [("plan", c) for c in args.plan_compress.split(",") if c]
    for policy, compress in [(p, "none") for p in policies] + compressed_plans:
        if args.refresh_disk:
            hardware_profile(work, disk_only=True)
        r = run_child("flexbatch", {**common, "policy": policy, "compress": compress}, memory)
        r["requested"] = policy if compress == "none" else f"plan+{compress}"
        runs.append(r)
        print(describe(r))
    ok = [r for r in runs if "error" not in r]
    plan = next((r for r in ok if r["requested"] == "plan"), None)
    others = [r for r in ok if not isinstance(r["requested"], str)]
    best_other = max((r["throughput"] for r in others), default=None)
    summary = {"shape": args.shape, "memory_bytes": memory, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
               "runs": runs, "plan_over_best_other": plan["throughput"] / best_other if plan and best_other else None}
    if summary["plan_over_best_other"]:
        print(f"planner's policy: {plan['throughput']:.3f} tok/s = {100 * summary['plan_over_best_other']:.0f}% "
              f"of the best of {len(others)} others ({best_other:.3f} tok/s)")
    print(json.dumps(summary))


def describe(r: dict) -> str:
    requested = r["requested"]
    name = requested if isinstance(requested, str) else json.dumps(requested, separators=(",", ":"))
    if "error" in r:
        return f"{name}: FAILED ({r['error']})"
    pol = r["policy"]
    error = r["predicted_throughput"] / r["throughput"] - 1
    packed = "+".join(k for k in ("weight", "cache") if pol[f"compress_{k}"])
    if "peak_gpu_bytes" in r:  # a GPU run: GPU/host shares (the rest on disk), GPU peak
        placement = (f"weights {pol['weights_device']:.2f}/{pol['weights_host']:.2f} cache {pol['cache_device']:.2f}/"
                     f"{pol['cache_host']:.2f} GPU/host{' CPU attention' if pol['cpu_attention'] else ''}")
        peak = f"peak GPU {r['peak_gpu_bytes'] / 2**30:.2f} GiB"
    else:
        placement = f"weights {pol['weights_device']:.2f} cache {pol['cache_device']:.2f} in memory"
        peak = f"peak {r['peak_bytes'] / 2**30:.2f} GiB"
    bits = f" {packed} 4-bit" if packed else ""
    return (f"{name}: block {pol['gpu_batch_size']}x{pol['num_gpu_batches']}{bits}, "
            f"{placement}: measured {r['throughput']:.3f} tok/s, predicted "
            f"{r['predicted_throughput']:.3f} ({100 * error:+.0f}%), prefill {r['prefill_s']:.1f}s "
            f"(pred {r['predicted_prefill_s']:.1f}), decode {r['decode_s']:.1f}s (pred {r['predicted_decode_s']:.1f}), "
            f"{peak}")


if __name__ == "__main__":
    main()
