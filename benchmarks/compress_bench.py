"""In-memory speed of compressed weights vs bf16, by batch size, on the same model and prompts.

Both runs use the same runner (a policy with everything in memory); one packs the layer
weights to 4 bits (groups of 64). Reports decode and end-to-end generated tokens/s per batch
size and the ratio. Model load and a warm-up are excluded. Last line: one JSON object.

    python benchmarks/compress_bench.py --batches 1,4,16,64 --prompt-len 64 --gen-len 32
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def prompts(n: int, length: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(7)
    return [torch.randint(10, 30000, (length,), generator=g).tolist() for _ in range(n)]


def measure(model, batch: int, prompt_len: int, gen_len: int, compress: bool, bits: int) -> dict:
    from flexbatch import LLM, SamplingParams
    from flexbatch.config import Policy

    policy = Policy(gpu_batch_size=batch, compress_weight=compress, compress_bits=bits)
    params = SamplingParams(max_new_tokens=gen_len, ignore_eos=True)
    with LLM(model, dtype="bfloat16", policy=policy) as llm:
        llm.generate(prompts(batch, 8), SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
        llm.runner.step_seconds = []
        start = time.perf_counter()
        outs = llm.generate(prompts(batch, prompt_len), params)
        total = time.perf_counter() - start
        steps = llm.runner.step_seconds
    tokens = sum(len(o.token_ids) for o in outs)
    return {"batch": batch, "compressed": compress, "tokens": tokens, "seconds": total,
            "throughput": tokens / total, "decode_tokens_per_s": batch * (len(steps) - 1) / sum(steps[1:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: the default model)")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    args = p.parse_args()
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        plain = measure(args.model, batch, args.prompt_len, args.gen_len, False, args.bits)
        packed = measure(args.model, batch, args.prompt_len, args.gen_len, True, args.bits)
        ratio = packed["throughput"] / plain["throughput"]
        decode_ratio = packed["decode_tokens_per_s"] / plain["decode_tokens_per_s"]
        rows.append({"batch": batch, "bf16": plain, "compressed": packed, "ratio": ratio, "decode_ratio": decode_ratio})
        print(f"batch {batch:4d}: bf16 {plain['throughput']:8.1f} tok/s, {args.bits}-bit {packed['throughput']:8.1f} "
              f"tok/s, ratio {ratio:.2f} (decode only {decode_ratio:.2f})")
    import torch

    from flexbatch.config import Policy
    from flexbatch.model_policy import kernel_choice

    # the choice every run above was given (the override, else the hardware profile's rates)
    choice = kernel_choice(Policy(gpu_batch_size=1, compress_weight=True, compress_bits=args.bits),
                           torch.device("cpu"), torch.bfloat16)
    print(json.dumps({"bits": args.bits, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                      "fused_max_rows": choice.fused_max_rows, "rows": rows}))


if __name__ == "__main__":
    main()
