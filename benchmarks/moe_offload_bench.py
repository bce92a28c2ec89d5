"""Offloaded mixture of experts: flexbatch vs Hugging Face Accelerate disk offload on a
Mixtral-shaped model with random weights (benchmarks/dummy_model.py; default mixtral-8x0.4b:
8 experts, top-2, Mixtral-8x7B's ratios at a quarter of the width and half the depth, 1.5 B
parameters, 2.9 GiB in bf16), same prompts, same memory limit (page cache included), in one run.

Each system runs in a child process of offload_bench.py inside a cgroup v1 memory group (run as
root). flexbatch's block touches every expert at every step, so each layer's weights (all
experts) are read from disk once per step and used by the whole block; Accelerate reads
them once per step for its one batch. The roofline is per step the larger of the disk time
(all experts' bytes on disk over the measured O_DIRECT bandwidth) and the compute time (FLOPs
of the active parameters, top-2 of 8 experts, at the measured bf16 matmul speed).

    sudo python benchmarks/moe_offload_bench.py --memory 1.5GiB --blocks 32x2 --hf-batches 8

The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dummy_model import MIXTRAL_SHAPES, mixtral_config, mixtral_tensor_shapes, write_dummy  # noqa: E402
from offload_bench import parse_blocks, print_row, run_child  # noqa: E402
from offload_figures import disk_figures, disk_read_bandwidth, matmul_flops  # noqa: E402


def parameter_counts(cfg: dict) -> tuple[int, int]:
    """(all parameters of the layers, parameters one token multiplies by in them)."""
    shapes = mixtral_tensor_shapes(cfg)
    every = sum(_numel(s) for name, s in shapes.items() if name.startswith("model.layers."))
    unused_experts = cfg["num_local_experts"] - cfg["num_experts_per_tok"]
    expert = 3 * cfg["hidden_size"] * cfg["intermediate_size"]
    return every, every - unused_experts * expert * cfg["num_hidden_layers"]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def roofline(cfg: dict, policy: dict, prompt_len: int, gen_len: int, bandwidth: float) -> dict:
    every, active = parameter_counts(cfg)
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    q_width = cfg["num_attention_heads"] * cfg["head_dim"]
    batch = policy["gpu_batch_size"] * policy["num_gpu_batches"]
    weight_io = 2 * every * (1 - policy["weights_device"] - policy["weights_host"]) / bandwidth
    head = 2 * cfg["vocab_size"] * h
    f_prefill, f_decode = matmul_flops(min(batch * prompt_len, 8192), h), matmul_flops(batch, h)
    prefill_flops = batch * prompt_len * (2 * active + 2 * prompt_len * q_width * layers) + batch * head
    prefill = max(weight_io, prefill_flops / f_prefill)
    decode = sum(max(weight_io, batch * (2 * active + 4 * (prompt_len + i) * q_width * layers + head) / f_decode)
                 for i in range(1, gen_len))
    return {"roofline_s": prefill + decode, "roofline_prefill_s": prefill, "roofline_decode_s": decode,
            "weight_io_s_per_step": weight_io}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="mixtral-8x0.4b", choices=sorted(MIXTRAL_SHAPES))
    p.add_argument("--workdir", default="/tmp/flexbatch-moe-bench")
    p.add_argument("--memory", default="1.5GiB", help="memory limit for each system, page cache included")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--blocks", default="32x2", help="flexbatch GPU batch size x number of GPU batches, comma separated")
    p.add_argument("--hf-batches", default="8", help="HF Accelerate batch sizes, comma separated")
    args = p.parse_args()
    from flexbatch.cli.common import parse_bytes
    from flexbatch.profiling import hardware_profile

    memory, work = parse_bytes(args.memory), Path(args.workdir)
    model, cfg = write_dummy(args.shape, work / args.shape), mixtral_config(args.shape)
    bandwidth = disk_read_bandwidth(work)
    hardware_profile(work, log=print)  # measured outside the memory limit, cached for the children
    every, active = parameter_counts(cfg)
    print(f"model {args.shape}: {every / 1e9:.2f} B layer parameters ({active / 1e9:.2f} B active per token), "
          f"memory limit {memory / 2**30:.2f} GiB, disk O_DIRECT read {bandwidth / 1e9:.2f} GB/s")
    common = {"model": str(model), "prompt_len": args.prompt_len, "gen_len": args.gen_len, "memory": memory}
    results = {"flexbatch": [], "hf_accelerate": []}
    for gbs, ngb in parse_blocks(args.blocks):
        policy = {"gpu_batch_size": gbs, "num_gpu_batches": ngb, "weights_device": 0, "weights_host": 0,
                  "cache_device": 1, "cache_host": 0}
        r = run_child("flexbatch", {**common, "policy": policy, "offload_dir": str(work / "flexbatch-offload")},
                      memory)
        if "error" not in r:
            r.update(roofline(cfg, r["policy"], args.prompt_len, args.gen_len, bandwidth))
            r["roofline_fraction"] = r["roofline_s"] / (r["prefill_s"] + r["decode_s"])
            r.update(disk_figures(r, bandwidth))
        results["flexbatch"].append({"gbs": gbs, "ngb": ngb, **r})
        print_row("flexbatch", f"{gbs}x{ngb}", r)
    for batch in [int(b) for b in args.hf_batches.split(",") if b]:
        r = run_child("hf", {**common, "batch": batch, "offload_dir": str(work / "hf-offload")}, memory)
        results["hf_accelerate"].append({"batch": batch, **r})
        print_row("hf_accelerate", str(batch), r)
    best = {k: max((r.get("throughput", 0) for r in v), default=0) for k, v in results.items()}
    ratio = best["flexbatch"] / best["hf_accelerate"] if best["hf_accelerate"] else None
    print(f"best: flexbatch {best['flexbatch']:.3f} tok/s, HF Accelerate {best['hf_accelerate']:.3f} tok/s, "
          f"ratio {ratio or float('nan'):.2f}x")
    print(json.dumps({"shape": args.shape, "config": cfg, "memory_bytes": memory, "prompt_len": args.prompt_len,
                      "gen_len": args.gen_len, "disk_read_Bps": bandwidth, "best_throughput": best,
                      "ratio_flexbatch_over_hf": ratio, "results": results}))


if __name__ == "__main__":
    main()
