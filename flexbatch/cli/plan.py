"""`flexbatch plan` and `flexbatch profile`: choose a policy, measure the machine."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict

from .common import add_compression_args, add_model_args, parse_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="choose an offloading policy for a workload",
                       description="Predict the best policy (block size and where weights and KV cache live) "
                                   "for a model and workload within a memory budget, with FlexGen's cost model.")
    add_model_args(p)
    p.add_argument("--prompt-len", type=int, required=True, help="prompt tokens per sequence")
    p.add_argument("--gen-len", type=int, required=True, help="generated tokens per sequence")
    p.add_argument("--num-sequences", type=int, default=None, help="cap the block size at this many sequences")
    p.add_argument("--cpu-memory", type=parse_bytes, default=None,
                   help="memory the process may use (default: free RAM)")
    p.add_argument("--gpu-memory", type=parse_bytes, default=None,
                   help="GPU memory the policy may use (default: free GPU memory; only with a GPU)")
    p.add_argument("--offload-dir", default=None, help="where offloaded tensors would go (its disk is profiled)")
    p.add_argument("--write-policy", metavar="FILE", help="write the chosen policy as JSON for --policy FILE")
    add_compression_args(p)
    p.set_defaults(run=run_plan)
    q = sub.add_parser("profile", help="measure disk bandwidth and matmul throughput for the planner",
                       description="Measure what the cost model needs (O_DIRECT disk read/write bandwidth, idle "
                                   "and while the CPU computes, and how much the reads slow compute; bf16 and fp32 "
                                   "matmul FLOP/s by batch size; the fused int4 kernel and dequantization speed for "
                                   "compressed weights; decode attention and KV cache dequantization speed; "
                                   "with a GPU, the host-GPU copy bandwidth and the same compute speeds on the "
                                   "GPU) and cache it for later plans.")
    q.add_argument("--offload-dir", default=None, help="folder on the disk to measure (default: the cache folder)")
    q.add_argument("--force", action="store_true", help="measure again even if a cached profile matches")
    q.add_argument("--disk-only", action="store_true",
                   help="measure only the disk again (its speed can drift on shared or virtual disks)")
    q.set_defaults(run=run_profile)


def run_profile(args) -> int:
    from ..profiling import hardware_profile

    profile = hardware_profile(args.offload_dir, force=args.force, log=lambda m: print(m, file=sys.stderr),
                               disk_only=args.disk_only)
    print(json.dumps(profile.to_json(), indent=1))
    return 0


def run_plan(args) -> int:
    from ..config import parse_dtype
    from ..devices import default_dtype, pick_device
    from ..planner import Workload
    from ..prepare import RunSettings, describe, open_settings_model, plan_for
    from .common import compression_fields

    settings = RunSettings(model=args.model, dtype=args.dtype, device=args.device,
                           compression=compression_fields(args), offload_dir=args.offload_dir,
                           cpu_memory=args.cpu_memory, gpu_memory=args.gpu_memory)
    device = pick_device(args.device)
    dtype = parse_dtype(args.dtype) or default_dtype(device)
    plan = plan_for(settings, open_settings_model(settings), device, dtype, Workload(args.prompt_len, args.gen_len),
                    args.num_sequences)
    gpu = device.type == "cuda"
    print(f"chosen:    {describe(plan.best, gpu)}")
    for c in plan.runners_up:
        print(f"runner-up: {describe(c, gpu)}")
    for note in plan.notes:
        print(note)
    for label, parts in ((("GPU", plan.best.memory.device), ("host", plan.best.memory.host)) if gpu else
                         (("", plan.best.memory.merged()),)):
        print(f"{label + ' ' if label else ''}memory of the chosen policy: " + ", ".join(
            f"{k} {v / 2**30:.2f} GiB" for k, v in parts.items() if v))
    if args.write_policy:
        with open(args.write_policy, "w") as f:
            json.dump(asdict(plan.best.policy), f, indent=1)
        print(f"policy written to {args.write_policy} (use it with --policy)", file=sys.stderr)
    return 0
