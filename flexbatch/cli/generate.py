"""`flexbatch generate`: generate continuations for prompts given on the command line or in a file."""
from __future__ import annotations

import json
import sys
import time

from ..errors import ConfigError
from .common import add_model_args, add_policy_args, add_sampling_args, run_settings, sampling_params
from .stages import add_pipeline_arg, lead_stages, serve_stage


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text for one or more prompts",
                       description="Generate continuations for prompts (greedy by default).")
    add_model_args(p)
    p.add_argument("--prompt", "-p", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", "-f", help="a text file with one prompt per line")
    p.add_argument("--chat", action="store_true",
                   help="treat each prompt as a user message and apply the model's chat template")
    add_sampling_args(p)
    p.add_argument("--logprobs", action="store_true", help="include per-token log-probabilities (with --json)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences generated together (default: the planner's choice; 32 with --no-plan)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    add_pipeline_arg(p)
    add_policy_args(p)
    p.set_defaults(run=run)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --prompts-file {args.prompts_file}: {e}") from e
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    return prompts


def run(args) -> int:
    from ..ranks import Ranks
    from .stages import stage_place

    ranks = Ranks.from_env()
    place = stage_place(args, ranks)
    if place is None:
        return generate(args)
    if ranks.world != place.stages:
        raise ConfigError(f"generate runs one pipeline: start {place.stages} processes (torchrun --nproc-per-node "
                          f"{place.stages}), not {ranks.world}; to split many prompts over several pipelines, use "
                          "`flexbatch run`.")
    ranks.start()
    args.device = ranks.device(args.device)
    try:
        if not place.first:
            serve_stage(args, place)
            return 0
        return generate(args, place)
    finally:
        ranks.close()


def generate(args, place=None) -> int:
    """Generate and print; `place`: this process is the first of pipeline stages."""
    from ..prepare import prepare_run, prompt_shape

    prompts, as_given, params = [], [], []

    def prepare():  # every check of the flags and the prompts runs before the model loads
        settings = run_settings(args)
        params.append(sampling_params(args))
        prompts[:] = read_prompts(args)
        as_given[:] = [[{"role": "user", "content": p}] for p in prompts] if args.chat else prompts

        def estimate(opened):
            limit = opened.config.max_position_embeddings - args.max_new_tokens
            shape = prompt_shape(opened.load_tokenizer(), as_given, limit)
            return shape.longest, len(prompts), None, shape.shared_prefix, shape.grouped

        return prepare_run(settings, args.max_new_tokens, estimate)

    run = lead_stages(place, prepare)
    params = params[0]
    llm = run.build_llm()
    if run.policy is not None:
        print(f"policy: {run.policy}", file=sys.stderr)
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat(as_given, params, progress=True)
    else:
        outputs = llm.generate(prompts, params, progress=True)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs):
        if args.json:
            record = {"prompt": prompt, "text": out.text, "finish_reason": out.finish_reason,
                      "num_prompt_tokens": len(out.prompt_token_ids), "token_ids": out.token_ids}
            if out.logprobs is not None:
                record["logprobs"] = out.logprobs
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(f"### {prompt}\n{out.text}\n")
    tokens = sum(len(o.token_ids) for o in outputs)
    print(f"{len(outputs)} prompts, {tokens} generated tokens in {elapsed:.1f}s "
          f"({tokens / max(elapsed, 1e-9):.1f} tokens/s), model {llm.model_path.name}, dtype "
          f"{str(llm.dtype).removeprefix('torch.')}", file=sys.stderr)
    llm.close()
    return 0
