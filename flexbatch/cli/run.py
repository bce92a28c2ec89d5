"""`flexbatch run INPUT -o OUTPUT`: the durable batch job over a prompt file."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import add_model_args, add_policy_args, add_sampling_args, build_policy, make_llm, sampling_params


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="run a resumable batch job over a file of requests",
        description="Generate for every request in INPUT and append one result line per request to "
                    "OUTPUT. Rerun the same command after a crash: finished requests are skipped. "
                    "Inputs: OpenAI Batch API JSONL (/v1/completions, /v1/chat/completions), JSONL "
                    "with `prompt`, a text file with one prompt per line, or a CSV.")
    p.add_argument("input", help="requests file (.jsonl, .txt or .csv)")
    p.add_argument("-o", "--output", required=True, help="results file (JSONL), appended to")
    p.add_argument("--format", default="auto", choices=["auto", "openai", "jsonl", "text", "csv"],
                   help="input format (default: from the extension and the first line)")
    p.add_argument("--column", default="prompt", help="CSV column holding the prompts (default: prompt)")
    p.add_argument("--chat", action="store_true", help="apply the chat template to plain prompts")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--logprobs", action="store_true", help="include per-token log-probabilities by default")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per block without a policy (default 32)")
    p.add_argument("--show", action="store_true", help="at the end, print every result's text (id: text)")
    add_policy_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..jobs.runner import run_job

    defaults = sampling_params(args)
    policy = build_policy(args, planned=True)
    if policy is None and not args.no_plan:
        from .plan import auto_policy

        prompt_len, num_requests = estimate_workload(args)
        policy = auto_policy(args, prompt_len, args.max_new_tokens, num_requests)
    with make_llm(args, policy) as llm:
        print(f"model {llm.model_path}, dtype {str(llm.dtype).removeprefix('torch.')}, "
              f"block of {llm.batch_size} sequences, policy: {policy or 'everything in memory'}", file=sys.stderr)
        summary = run_job(llm, args.input, args.output, fmt=args.format, column=args.column, defaults=defaults,
                          chat=args.chat)
    for line in summary.lines():
        print(line, file=sys.stderr)
    print(f"results: {args.output}", file=sys.stderr)
    if args.show:
        show_results(Path(args.output))
    return 0


def show_results(output: Path) -> None:
    """Print `id: text` for each line of a results file (either output format)."""
    import json

    for line in output.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        rid = record.get("custom_id", record.get("id"))
        if record.get("error"):
            error = record["error"]
            print(f"[{rid}] ERROR: {error['message'] if isinstance(error, dict) else error}\n")
            continue
        body = record.get("response", {}).get("body") or {}
        choice = (body.get("choices") or [{}])[0]
        text = choice.get("message", {}).get("content") if "message" in choice else choice.get("text")
        print(f"[{rid}] {record.get('text', text)}\n")


def estimate_workload(args, sample: int = 512) -> tuple[int, int]:
    """(longest prompt in tokens among the first `sample` requests, number of requests)."""
    from ..default_model import default_model_path
    from ..jobs.inputs import detect_format, read_requests
    from ..weights.source import open_model

    requests = [r for r in read_requests(args.input, detect_format(Path(args.input), args.format), args.column)
                if not r.error]
    tokenizer = open_model(args.model or default_model_path()).load_tokenizer()
    lengths = [64]
    for r in requests[:sample]:
        if r.kind == "chat" or args.chat:
            messages = r.messages or [{"role": "user", "content": r.prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = r.prompt
        lengths.append(len(tokenizer(text)["input_ids"]))
    return max(lengths), max(len(requests), 1)
