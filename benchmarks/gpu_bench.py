"""GPU offloading benchmark: flexbatch vs Hugging Face Accelerate's CPU offload on one GPU,
same prompts, same GPU memory cap, in one run.

The model does not fit the cap: flexbatch keeps the weights in pinned host RAM (or as the
policy says) and streams each layer to the GPU on a copy stream while the previous one
computes; Accelerate (`device_map="auto"`, `max_memory`) keeps what fits on the GPU and
moves the rest layer by layer. Each run is a fresh child process whose CUDA allocator is
capped at --gpu-memory (`torch.cuda.set_per_process_memory_fraction`), so neither system
can use more of the GPU. Weights are random, in a published OPT shape. Metric (FlexGen's):
generated tokens / (prefill time + decode time).

    python benchmarks/gpu_bench.py --shape opt-6.7b --gpu-memory 16GiB \\
        --policy '{"gpu_batch_size": 32, "num_gpu_batches": 4, "weights_device": 0, "weights_host": 1}' \\
        --hf-batches 8,32,64@6GiB --hf-weights 10GiB

The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def cap_gpu(nbytes: int) -> None:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, nbytes / total))


def child_flexbatch(spec: dict) -> dict:
    """One run on the GPU; spec["policy"] may be "plan" (the planner's choice, as in
    benchmarks/offload_bench.py). The result carries the cost model's prediction."""
    from offload_bench import choose_policy, current_profile, measured_generate, predict, prompts
    from offload_figures import disk_read_GBps

    from flexbatch import LLM, SamplingParams

    cap_gpu(spec["gpu_memory"])
    hw = current_profile(spec)
    policy = choose_policy({**spec, "device": "cuda"}, hw)
    with LLM(spec["model"], dtype="bfloat16", device="cuda", policy=policy, offload_dir=spec["offload_dir"],
             gpu_memory=spec["gpu_memory"], cpu_memory=spec.get("memory")) as llm:
        predicted = predict(llm, policy, spec, hw)
        params = SamplingParams(max_new_tokens=spec["gen_len"], ignore_eos=True)
        r = measured_generate(llm, prompts(policy.block_size, spec["prompt_len"]), params)
        return {**r, "batch": policy.block_size, "disk_read_GBps": disk_read_GBps(r),
                "peak_gpu_bytes": _peak_gpu(), "policy": asdict(policy), **predicted}


def child_hf(spec: dict) -> dict:
    import torch
    from offload_bench import prompts
    from transformers import AutoModelForCausalLM

    cap_gpu(spec["gpu_memory"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], device_map="auto", dtype=torch.bfloat16,
                                                 max_memory={0: spec["hf_weights"], "cpu": 200 << 30})
    ids = torch.tensor(prompts(spec["batch"], spec["prompt_len"])).cuda()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model.generate(ids[:1, :8], max_new_tokens=2, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=spec["gen_len"],
                             min_new_tokens=spec["gen_len"], do_sample=False)
        torch.cuda.synchronize()
        total = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"prefill_s": min(prefill, total), "decode_s": total - min(prefill, total), "tokens": tokens,
            "batch": spec["batch"], "peak_gpu_bytes": _peak_gpu()}


def _peak_gpu() -> int:
    import torch

    return int(torch.cuda.max_memory_allocated())


def run_child(kind: str, spec: dict) -> dict:
    from offload_bench import child_result

    out = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:  # the whole traceback, for a failure seen only on a lent GPU
        print(out.stderr[-6000:], file=sys.stderr)
    return child_result(out)


def main() -> None:
    from flexbatch.cli.common import parse_bytes

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="opt-6.7b")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "flexbatch-gpu-bench"))
    p.add_argument("--gpu-memory", default="16GiB", help="GPU memory cap for each system")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--policy", action="append", default=[], help="a flexbatch policy as JSON (repeatable)")
    p.add_argument("--hf-batches", default="8,32", help="HF Accelerate batch sizes, each optionally @ the GPU "
                                                       "memory its weights may fill (e.g. 64@6GiB; empty to skip)")
    p.add_argument("--hf-weights", default="10GiB", help="default GPU memory Accelerate may fill with weights "
                                                        "(the rest of the cap is left for its KV cache)")
    args = p.parse_args()
    if args.child:
        fn = child_flexbatch if args.child == "flexbatch" else child_hf
        print(json.dumps(fn(json.loads(args.spec))))
        return
    from dummy_model import write_dummy

    work = Path(args.workdir)
    model = write_dummy(args.shape, work / args.shape)
    common = {"model": str(model), "prompt_len": args.prompt_len, "gen_len": args.gen_len,
              "gpu_memory": parse_bytes(args.gpu_memory)}
    results = {"flexbatch": [], "hf_accelerate": []}
    bandwidth = host_to_gpu_bandwidth()
    print(f"model {args.shape}, GPU cap {args.gpu_memory}, pinned host-to-GPU copy {bandwidth / 1e9:.1f} GB/s")
    for text in args.policy:
        policy = json.loads(text)
        r = run_child("flexbatch", {**common, "policy": policy, "offload_dir": str(work / "offload")})
        on_disk = 1 - policy.get("weights_device", 1) - policy.get("weights_host", 0) > 0 or \
            1 - policy.get("cache_device", 1) - policy.get("cache_host", 0) > 0
        # the floor models bf16 over the link, and the GPU attending over every cache row
        plain = not (policy.get("compress_weight") or policy.get("compress_cache") or policy.get("cpu_attention"))
        if "error" not in r and not on_disk and plain:
            r["roofline_s"] = transfer_floor(args.shape, policy, args.prompt_len, args.gen_len, bandwidth)
            r["roofline_fraction"] = r["roofline_s"] / (r["prefill_s"] + r["decode_s"])
        results["flexbatch"].append({"policy": policy, **r})
        print("flexbatch", text, _row(r), flush=True)
    for item in [b for b in args.hf_batches.split(",") if b]:
        batch, _, weights = item.partition("@")
        spec = {**common, "batch": int(batch), "hf_weights": parse_bytes(weights or args.hf_weights)}
        r = run_child("hf", spec)
        results["hf_accelerate"].append({"batch": int(batch), "hf_weights": spec["hf_weights"], **r})
        print("hf_accelerate", item, _row(r), flush=True)
    best = {k: max((r.get("throughput", 0) for r in v), default=0) for k, v in results.items()}
    ratio = best["flexbatch"] / best["hf_accelerate"] if best["hf_accelerate"] else None
    print(f"best: flexbatch {best['flexbatch']:.2f} tok/s, HF Accelerate {best['hf_accelerate']:.2f} tok/s, "
          f"ratio {ratio or float('nan'):.2f}x")
    print(json.dumps({"shape": args.shape, **common, "best_throughput": best, "ratio_flexbatch_over_hf": ratio,
                      "results": results}))


def host_to_gpu_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of one large pinned host-to-GPU copy (best of 3)."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        gpu.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def transfer_floor(shape: str, policy: dict, prompt_len: int, gen_len: int, bandwidth: float) -> float:
    """The roofline of a policy that keeps weights or KV cache off the GPU, on a GPU this fast:
    every token step (the prompt's and each generated one's but the last) moves the bf16 layer
    weights not kept on the GPU over the host link once, and each decode step reads the cache
    of every sequence kept in host RAM (its whole prefix) and the prefill writes it; compute
    is taken as hidden under the copies."""
    from dummy_model import opt_config

    cfg = opt_config(shape)
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    weights = gen_len * 2 * (12 * h * h + 9 * h) * layers * (1 - policy.get("weights_device", 1))
    block = policy["gpu_batch_size"] * policy["num_gpu_batches"]
    token_kv = 2 * 2 * h * layers * (1 - policy.get("cache_device", 1))  # K and V, bf16, all layers
    cache = block * token_kv * (prompt_len + sum(prompt_len + t for t in range(1, gen_len)))
    return (weights + cache) / bandwidth


def _row(r: dict) -> str:
    if "error" in r:
        return f"FAILED ({r['error']})"
    roof = f", {100 * r['roofline_fraction']:.0f}% of roofline" if "roofline_fraction" in r else ""
    roof += f", disk read {r['disk_read_GBps']:.2f} GB/s" if r.get("disk_read_GBps") else ""
    return (f"batch {r['batch']}: {r['throughput']:.2f} tok/s (prefill {r['prefill_s']:.1f}s, decode "
            f"{r['decode_s']:.1f}s), peak GPU {r['peak_gpu_bytes'] / 2**30:.2f} GiB{roof}")


if __name__ == "__main__":
    main()
