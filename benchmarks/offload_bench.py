"""Offloading benchmark: flexbatch vs Hugging Face Accelerate disk offload, same prompts,
same memory limit (page cache included), in one run.

Each system runs in a child process inside a cgroup v1 memory group limited to --memory,
after the page cache is dropped, so neither profits from the OS caching the model. Weights
are random, in a published OPT shape (benchmarks/dummy_model.py). Metric (FlexGen's):
generated tokens / (prefill time + decode time). The roofline is the time the hardware
needs at least for the flexbatch policy: per step, the larger of the disk time (bytes read /
measured O_DIRECT bandwidth) and the compute time (FLOPs / measured matmul FLOP/s); the
contended roofline counts how much reading slows the matmuls on this machine (its profile's
compute share during reads: compute + (1 - share) x disk time when compute is longer). Both
systems compute in --dtype: bfloat16, or float32 on a CPU without fast bf16 (AVX2 only),
where a bf16 matmul runs several times slower than fp32.

    sudo python benchmarks/offload_bench.py --shape opt-1.3b --memory 1.5GiB \\
        --blocks 16x2,32x4 --hf-batches 4,16 --prompt-len 128 --gen-len 32

The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from offload_figures import disk_moved_bytes, disk_read_bandwidth, run_figures  # noqa: E402

CGROUP = Path("/sys/fs/cgroup/memory")
COMPRESSION = {"none": {}, "weight": {"compress_weight": True}, "cache": {"compress_cache": True},
               "both": {"compress_weight": True, "compress_cache": True},
               # FlexGen's cache compression: every token 4-bit, no exact window of recent tokens
               "cache-nowindow": {"compress_cache": True, "cache_window": 0}}


# ---- children --------------------------------------------------------------------------
def prompts(n: int, length: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1234)
    # ids below 32000: inside every benchmarked vocabulary (OPT 50272, Mixtral 32000)
    return [torch.randint(10, 32000, (length,), generator=g).tolist() for _ in range(n)]


def child_flexbatch(spec: dict) -> dict:
    """One flexbatch run. spec["policy"]: Policy fields, or "plan" to let the planner choose
    (as `flexbatch run` does without policy flags; with spec["compress"] as its compression
    switches); the result carries the predicted figures."""
    from flexbatch import LLM, SamplingParams

    hw = current_profile(spec)  # as the planner sees it, before the model fills memory
    policy = choose_policy(spec, hw)
    with LLM(spec["model"], dtype=spec["dtype"], policy=policy, offload_dir=spec["offload_dir"],
             cpu_memory=spec["memory"]) as llm:
        predicted = predict(llm, policy, spec, hw)
        params = SamplingParams(max_new_tokens=spec["gen_len"], ignore_eos=True)
        measured = measured_generate(llm, prompts(policy.block_size, spec["prompt_len"]), params)
        at_run_disk = {}
        if measured["disk_busy_s"]:
            rate = disk_moved_bytes(measured) / measured["disk_busy_s"]
            disk = hw.disk.scaled(rate / (hw.disk.read_busy_bps or hw.disk.read_bps))
            at_run_disk = {f"{k}_at_run_disk": v for k, v in predict(llm, policy, spec, replace(hw, disk=disk)).items()
                           if k != "predicted_memory_bytes"}
        return {**measured, "batch": policy.block_size, "policy": asdict(policy), **predicted, **at_run_disk}


def measured_generate(llm, prompt_ids: list[list[int]], params) -> dict:
    """Generate after a warm-up, timed by the runner: prefill is the admissions' time, decode
    the token steps'; with the disk traffic of each (weights read; KV cache read, written)
    and the seconds the disk was busy with it (at least one request in flight).
    A policy with everything in memory runs on the in-memory runner, which keeps no clocks:
    its generation time counts as decode, with no disk traffic."""
    from flexbatch import SamplingParams

    llm.generate(prompts(1, 8), SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
    runner = llm.runner
    offloaded = hasattr(runner, "kv_traffic")
    if offloaded:
        runner.admit_seconds, runner.step_seconds, runner.step_disk, runner.wait_seconds = [], [], [], 0.0
        runner.home.traffic.reset()
        runner.kv_traffic.reset()
    began = time.perf_counter()
    outs = llm.generate(prompt_ids, params)
    wall = time.perf_counter() - began
    result = {"prefill_s": 0.0, "decode_s": wall, "generate_wall_s": wall, "decode_steps": None,
              "tokens": sum(len(o.token_ids) for o in outs), "io_wait_s": 0.0, "weight_read_bytes": 0,
              "kv_read_bytes": 0, "kv_written_bytes": 0, "disk_busy_s": 0.0}
    if offloaded:
        result.update(prefill_s=sum(runner.admit_seconds), decode_s=sum(runner.step_seconds),
                      decode_steps=len(runner.step_seconds), io_wait_s=runner.wait_seconds,
                      weight_read_bytes=runner.home.traffic.read, kv_read_bytes=runner.kv_traffic.read,
                      kv_written_bytes=runner.kv_traffic.written, disk_busy_s=runner.home.traffic.clock.seconds,
                      **per_step_disk(runner.step_disk, runner.step_seconds))
    return result


def per_step_disk(step_disk: list, step_seconds: list[float]) -> dict:
    """Each decode step's disk rate while busy (GB/s) and share of the step the disk was
    busy: how the disk's rate moved over the run (a shared disk's drifts)."""
    return {"step_disk_busy_GBps": [round(d.rate / 1e9, 3) if d.busy_seconds else None for d in step_disk],
            "step_disk_busy_share": [round(d.busy_seconds / s, 3) for d, s in zip(step_disk, step_seconds)]}


def current_profile(spec: dict):
    """The hardware profile as `flexbatch run` plans with it: compute speed and the offload
    disk's read speed checked now."""
    import torch

    from flexbatch.profiling import at_current_speed, hardware_profile

    folder = Path(spec["offload_dir"])
    return at_current_speed(hardware_profile(folder), getattr(torch, spec["dtype"]), disk_folder=folder)


def choose_policy(spec: dict, profile=None):
    """spec["policy"] as a Policy, or the planner's choice for spec's workload and budgets
    (spec["memory"] for the host, and on a GPU (spec["device"]) spec["gpu_memory"]), planned on
    `profile` (default: `current_profile(spec)`)."""
    import torch

    from flexbatch.config import Policy
    from flexbatch.engine.memory import detect_budget
    from flexbatch.models import get_family
    from flexbatch.planner import Workload, plan_policy
    from flexbatch.weights.source import open_model

    if spec["policy"] != "plan":
        return Policy(**spec["policy"])
    cfg = open_model(spec["model"]).config
    device = torch.device(spec.get("device", "cpu"))
    budget = detect_budget(device, spec.get("gpu_memory"), spec.get("memory"))
    profile = profile or current_profile(spec)
    plan = plan_policy(cfg, get_family(cfg), getattr(torch, spec["dtype"]), device, profile,
                       Workload(spec["prompt_len"], spec["gen_len"]), budget, max_block=spec.get("max_block"),
                       compression=COMPRESSION[spec.get("compress", "none")])
    return plan.best.policy


def predict(llm, policy, spec: dict, hw) -> dict:
    from flexbatch.planner import Workload, evaluate, machine_model

    c = evaluate(llm.config, llm.family, llm.dtype, machine_model(hw, llm.device), policy,
                 Workload(spec["prompt_len"], spec["gen_len"]))
    return {"predicted_throughput": c.throughput, "predicted_prefill_s": c.prefill_seconds,
            "predicted_decode_s": c.decode_seconds, "predicted_memory_bytes": c.memory_bytes}


def child_hf(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], device_map="auto", max_memory={"cpu": int(spec["memory"] * 0.5)},
        offload_folder=spec["offload_dir"], dtype=getattr(torch, spec["dtype"]))
    ids = torch.tensor(prompts(spec["batch"], spec["prompt_len"]))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model.generate(ids[:1, :8], max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=spec["gen_len"],
                             min_new_tokens=spec["gen_len"], do_sample=False)
        total = time.perf_counter() - start
        start = time.perf_counter()  # the prefill alone, for the breakdown
        model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = min(time.perf_counter() - start, total)
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"prefill_s": prefill, "decode_s": total - prefill, "tokens": tokens, "batch": spec["batch"]}


def run_child(kind: str, spec: dict, memory: int, script: str = __file__) -> dict:
    """Run one measurement (`script --child kind spec`) in a fresh process confined to
    `memory` bytes (page cache included)."""
    group = CGROUP / f"flexbatch-bench-{os.getpid()}"
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(memory))
    drop_page_cache()
    cmd = f"echo $$ > {group}/cgroup.procs && exec {sys.executable} {script} --child {kind} '{json.dumps(spec)}'"
    began = time.perf_counter()
    out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
    wall = time.perf_counter() - began
    peak = int((group / "memory.max_usage_in_bytes").read_text())
    oom_kills = oom_kill_count(group)
    group.rmdir()
    return {**child_result(out, oom_kills), "wall_s": wall, "peak_bytes": peak}


def oom_kill_count(group: Path) -> int:
    """Processes of the group its memory limit's OOM killer ended (cgroup v1 `oom_kill` line)."""
    for line in (group / "memory.oom_control").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill":
            return int(value)
    return 0


def child_result(out: subprocess.CompletedProcess, oom_kills: int = 0) -> dict:
    """A child's JSON result with its throughput (FlexGen's metric), or its error's last lines
    (a child killed by a signal says so, and whether the memory limit's OOM killer did it)."""
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        killed = [f"killed by signal {-out.returncode}"] if out.returncode < 0 else []
        killed += ["the OOM killer of the memory limit ended it"] if oom_kills else []
        return {"error": " | ".join(killed + tail)[-400:]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["throughput"] = result["tokens"] / (result["prefill_s"] + result["decode_s"])
    return result


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        print("warning: cannot drop the page cache (not root?)", file=sys.stderr)


# ---- driver ------------------------------------------------------------------------------
def parse_blocks(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",") if part]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="opt-1.3b")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "flexbatch-bench"))
    p.add_argument("--memory", default="1.5GiB", help="memory limit for each system, page cache included")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--blocks", default="16x2,32x2",
                   help="flexbatch GPU batch size x number of GPU batches, comma separated")
    p.add_argument("--hf-batches", default="4,16", help="HF Accelerate batch sizes (empty to skip)")
    p.add_argument("--compress", default="none",
                   help="flexbatch compression settings to run each block with, comma separated: "
                        "none, weight, cache, both (4 bits, groups of 64), cache-nowindow (the cache "
                        "without its exact window of recent tokens: cache_window 0, as FlexGen compresses it)")
    p.add_argument("--cache-disk", type=float, default=0.0,
                   help="fraction of the KV cache the --blocks runs keep on disk (default 0: all in memory)")
    p.add_argument("--plan", action="store_true",
                   help="also run the planner's own policy for each --compress setting (as `flexbatch run` would)")
    p.add_argument("--max-block", type=int, default=64, help="the planner's largest block (sequences)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="what both systems compute in (float32 on a CPU without fast bf16)")
    args = p.parse_args()
    if args.child:
        fn = child_flexbatch if args.child == "flexbatch" else child_hf
        print(json.dumps(fn(json.loads(args.spec))))
        return
    from dummy_model import opt_config, write_dummy

    from flexbatch.cli.common import parse_bytes

    memory = parse_bytes(args.memory)
    work = Path(args.workdir)
    model = write_dummy(args.shape, work / args.shape)
    cfg = opt_config(args.shape)
    bandwidth = disk_read_bandwidth(work)
    from flexbatch.profiling import hardware_profile

    # measured here, outside the memory limit, and cached for the children
    compute_share = hardware_profile(work, log=print).disk.compute_share_during_reads
    print(f"model {args.shape}: {sum(f.stat().st_size for f in model.glob('*.safetensors')) / 2**30:.2f} GiB, "
          f"memory limit {memory / 2**30:.2f} GiB, disk O_DIRECT read {bandwidth / 1e9:.2f} GB/s")
    common = {"model": str(model), "prompt_len": args.prompt_len, "gen_len": args.gen_len, "memory": memory,
              "dtype": args.dtype}
    results = {"flexbatch": [], "hf_accelerate": []}
    for compress in args.compress.split(","):
        blocks = parse_blocks(args.blocks) + ([("plan", "")] if args.plan else [])
        for gbs, ngb in blocks:
            policy = "plan" if gbs == "plan" else {
                "gpu_batch_size": gbs, "num_gpu_batches": ngb, "weights_device": 0, "weights_host": 0,
                "cache_device": 1 - args.cache_disk, "cache_host": 0, **COMPRESSION[compress]}
            spec = {**common, "policy": policy, "compress": compress, "max_block": args.max_block,
                    "offload_dir": str(work / "flexbatch-offload")}
            # a shared disk's speed drifts: the roofline takes the mean of probes just before and after
            before = disk_read_bandwidth(work)
            r = run_child("flexbatch", spec, memory)
            probes = {"probe_before_Bps": before, "probe_after_Bps": disk_read_bandwidth(work)}
            if gbs == "plan" and "error" not in r:
                gbs, ngb = r["policy"]["gpu_batch_size"], f"{r['policy']['num_gpu_batches']} (plan)"
            if "error" not in r:
                r.update(probes)
                r.update(run_figures(cfg, r, args.prompt_len, args.gen_len, args.dtype, compute_share))
            results["flexbatch"].append({"gbs": gbs, "ngb": ngb, "compress": compress, **r})
            print_row("flexbatch", f"{gbs}x{ngb}" + ("" if compress == "none" else f" {compress}"), r)
    for batch in [int(b) for b in args.hf_batches.split(",") if b]:
        spec = {**common, "batch": batch, "offload_dir": str(work / "hf-offload")}
        r = run_child("hf", spec, memory)
        results["hf_accelerate"].append({"batch": batch, **r})
        print_row("hf_accelerate", str(batch), r)
    best = {k: max((r.get("throughput", 0) for r in v), default=0) for k, v in results.items()}
    for compress in args.compress.split(","):
        best[f"flexbatch_{compress}"] = max((r.get("throughput", 0) for r in results["flexbatch"]
                                             if r["compress"] == compress), default=0)
    summary = {"shape": args.shape, "dtype": args.dtype, "memory_bytes": memory, "prompt_len": args.prompt_len,
               "gen_len": args.gen_len,
               "disk_read_Bps": bandwidth, "best_throughput": best,
               "ratio_flexbatch_over_hf": best["flexbatch"] / best["hf_accelerate"] if best["hf_accelerate"] else None,
               "results": results}
    print(f"best: flexbatch {best['flexbatch']:.3f} tok/s, HF Accelerate {best['hf_accelerate']:.3f} tok/s, "
          f"ratio {summary['ratio_flexbatch_over_hf'] or float('nan'):.2f}x")
    print(json.dumps(summary))


def print_row(system: str, batch: str, r: dict) -> None:
    if "error" in r:
        print(f"{system:14s} batch {batch:>12s}: FAILED ({r['error']})")
        return
    extra = ""
    if "roofline_fraction" in r:
        extra = (f", disk {r['disk_read_GBps']:.2f} GB/s read + {r['disk_write_GBps']:.2f} written "
                 f"({100 * r['disk_share_of_probe']:.0f}% of the probe), "
                 f"{100 * r['roofline_fraction']:.0f}% of roofline, "
                 f"{100 * r['roofline_fraction_contended']:.0f}% of the roofline of matmuls at "
                 f"{100 * r['compute_share_during_reads']:.0f}% speed while the disk reads")
    if "prediction_error" in r:
        extra += f", planner predicted {r['predicted_throughput']:.2f} tok/s ({100 * r['prediction_error']:+.0f}%)"
    if r.get("roofline_fraction_at_run_disk"):
        extra += (f"; the disk was busy {100 * r['disk_busy_share']:.0f}% of the run at "
                  f"{r['disk_busy_GBps']:.2f} GB/s: at that rate {100 * r['roofline_fraction_at_run_disk']:.0f}% "
                  f"of roofline, planner {r['predicted_throughput_at_run_disk']:.2f} tok/s "
                  f"({100 * r['prediction_error_at_run_disk']:+.0f}%)")
    print(f"{system:14s} batch {batch:>12s}: {r['throughput']:.3f} tok/s (prefill {r['prefill_s']:.1f}s, "
          f"decode {r['decode_s']:.1f}s), peak {r['peak_bytes'] / 2**30:.2f} GiB{extra}")


if __name__ == "__main__":
    main()
