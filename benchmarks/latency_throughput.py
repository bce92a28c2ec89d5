"""The latency-throughput picture (FlexGen's Figure 1) for the default model on this machine:
throughput against the time a sequence spends in flight, over block sizes, for flexbatch in
memory, flexbatch with its weights on disk, vLLM's CPU build and HF `generate`.

At each block size B, N = max(--min-prompts, 2B) prompts of the `fixed` workload
(vllm_bench.py: 16-199 token continuations, --gen-len tokens each, EOS ignored) run in a fresh
process per system (vllm_bench.run_child). Throughput is generated tokens over wall time;
latency is the mean time a sequence is in flight, by Little's law min(B, N) * wall / N, the
same definition for every system (a static batch of B sequences: the batch's time).

    .venv/bin/pip install 'matplotlib==3.11.2'       # the `bench` extra
    .venv/bin/python benchmarks/latency_throughput.py --vllm-python /work/vllm-venv/bin/python

Writes latency_throughput.png (and .json) in --out, prints the table, and last one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_bench import hf_folder, make_workloads, run_child  # noqa: E402

WEIGHTS_ON_DISK = {"weights_device": 0.0, "weights_host": 0.0, "cache_device": 1.0, "cache_host": 0.0}


def systems(block: int, vllm_python: str) -> dict[str, tuple[str, str, dict]]:
    """name -> (python, child name in vllm_bench, extra spec) at block size `block`."""
    return {"flexbatch (in memory)": (sys.executable, "flexbatch_generate", {}),
            "flexbatch (weights on disk)": (sys.executable, "flexbatch_generate",
                                            {"policy": {"gpu_batch_size": block, **WEIGHTS_ON_DISK}}),
            "vLLM-CPU": (vllm_python, "vllm", {"max_num_seqs": block}),
            "HF generate": (sys.executable, "hf", {})}


def plot(points: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in points.items():
        rows = [r for r in rows if "tok_per_s" in r]
        if not rows:
            continue
        ax.plot([r["latency_s"] for r in rows], [r["tok_per_s"] for r in rows], marker="o", label=name)
        for r in rows:
            ax.annotate(str(r["block"]), (r["latency_s"], r["tok_per_s"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("latency: seconds a sequence is in flight (log scale)")
    ax.set_ylabel("throughput (generated tokens/s)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="4,16,64,256", help="block sizes (sequences in flight) to sweep")
    p.add_argument("--min-prompts", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    p.add_argument("--skip", default="", help="systems to leave out, comma-separated names as in the table")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "flexbatch-vllm-bench"))
    p.add_argument("--out", default=".", help="folder for latency_throughput.png and .json")
    p.add_argument("--replot", help="draw the plot again from a latency_throughput.json, measuring nothing")
    args = p.parse_args()
    if args.replot:
        summary = json.loads(Path(args.replot).read_text())
        plot(summary["points"], Path(args.out) / "latency_throughput.png", summary["title"])
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    folder = hf_folder(work)
    blocks = [int(b) for b in args.blocks.split(",")]
    counts = {b: max(args.min_prompts, 2 * b) for b in blocks}
    prompts = make_workloads(folder, max(counts.values()))["fixed"]
    skip = set(filter(None, args.skip.split(",")))
    points: dict[str, list[dict]] = {}
    for block in blocks:
        n = counts[block]
        for name, (python, child, extra) in systems(block, args.vllm_python).items():
            if name in skip:
                continue
            spec = {"model": str(folder), "prompts": prompts[:n], "batch_size": block, "max_tokens": args.gen_len,
                    "ignore_eos": True, **extra}
            r = run_child(python, child, spec, work, args.threads)
            r.update(block=block, prompts=n)
            if "tokens" in r:
                r.update(tok_per_s=r["tokens"] / r["seconds"], latency_s=min(block, n) * r["seconds"] / n)
                print(f"block {block:4d} | {name:28s} | {r['tok_per_s']:8.1f} tok/s | {r['latency_s']:7.2f} s latency",
                      flush=True)
            else:
                print(f"block {block:4d} | {name:28s} | FAILED: {r['error'][-200:]}", flush=True)
            points.setdefault(name, []).append(r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"default model (SmolLM2-135M, bf16), {args.threads} threads, {args.gen_len} new tokens, "
             f"prompts 16-199 tokens")
    plot(points, out / "latency_throughput.png", title)
    summary = {"blocks": blocks, "gen_len": args.gen_len, "threads": args.threads, "title": title,
               "points": points, "plot": str(out / "latency_throughput.png")}
    (out / "latency_throughput.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
