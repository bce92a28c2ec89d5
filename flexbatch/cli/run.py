"""`flexbatch run INPUT -o OUTPUT`: the durable batch job over a prompt file."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import (
    DEFAULT_BATCH_SIZE,
    add_model_args,
    add_policy_args,
    add_sampling_args,
    make_llm,
    resolve_policy,
    sampling_params,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="run a resumable batch job over a file of requests",
        description="Generate for every request in INPUT and append one result line per request to "
                    "OUTPUT. Rerun the same command after a crash: finished requests are skipped. "
                    "The first run records the job's settings in OUTPUT.job.json; a rerun with other "
                    "settings or an edited input is refused unless --force-new or --continue-changed. "
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
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per block (default: the planner's choice; 32 with --no-plan)")
    p.add_argument("--window", type=int, default=None,
                   help="requests read, tokenized and sorted by length at a time (default 50000): bounds "
                        "memory on large inputs; blocks never span two windows")
    p.add_argument("--force-new", action="store_true",
                   help="start a new job even if OUTPUT holds one (the old output and manifest are renamed "
                        "OUTPUT.<time>.old*, never deleted)")
    p.add_argument("--continue-changed", action="store_true",
                   help="resume although the settings or the input changed since the job started (results "
                        "already written are kept; the change is noted in OUTPUT.job.json)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run shard I of N (I counts from 0) of the job, for schedulers that start N copies of "
                        "one command and hand each an index (Slurm arrays: --shard "
                        "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; Kubernetes indexed jobs: "
                        "$JOB_COMPLETION_INDEX/N). Each shard writes OUTPUT.shard-I-of-N; `flexbatch merge OUTPUT` "
                        "assembles them when all are done. Under torchrun the ranks are the shards and rank 0 "
                        "merges at the end, so no flag is needed")
    p.add_argument("--show", action="store_true", help="at the end, print every result's text (id: text)")
    add_policy_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..jobs.job import JobSpec

    _check_counts(args)
    if args.no_plan and args.batch_size is None:
        args.batch_size = DEFAULT_BATCH_SIZE
    ranks, shard = _shard(args)
    spec = JobSpec(Path(args.input), Path(args.output), args.format, args.column, args.chat, sampling_params(args),
                   args.window, args.force_new, args.continue_changed, shard)
    if ranks:
        ranks.start()
        args.device = ranks.device(args.device)
    try:
        summary = _run_job(args, spec)
        if ranks:
            ranks.wait_for_all()  # every rank has closed its part
            if ranks.rank == 0:
                summary.notes += merge_output(Path(args.output))
    finally:
        if ranks:
            ranks.close()
    for line in summary.lines():
        print(line, file=sys.stderr)
    print(f"results: {args.output}" if not shard or ranks else
          f"results: {shard.part(Path(args.output))} (`flexbatch merge {args.output}` once every shard is done)",
          file=sys.stderr)
    if args.show and (not shard or ranks and ranks.rank == 0):
        show_results(Path(args.output))
    return 0


def _run_job(args, spec):
    from ..jobs.job import Job
    from ..jobs.runner import WindowRunner

    job = Job.open(spec)  # every check of the input and output runs before the model loads
    try:
        opened, policy, batch_size = _job_policy(args, job)
        job.bind(_settings(args, job, opened, policy, batch_size))
        with make_llm(args, policy, opened, batch_size) as llm:
            print(f"model {llm.model_path}, dtype {str(llm.dtype).removeprefix('torch.')}, "
                  f"block of {llm.batch_size} sequences, policy: {policy or 'everything in memory'}", file=sys.stderr)
            return WindowRunner(job, llm, llm.model_path.name, progress=True).run()
    finally:
        job.close()


def _shard(args):
    """(torchrun's ranks or None, the shard this process runs or None)."""
    from ..errors import ConfigError
    from ..jobs.shards import Shard
    from .ranks import Ranks

    ranks = Ranks.from_env()
    if ranks and args.shard:
        raise ConfigError(f"--shard {args.shard} was given under torchrun (WORLD_SIZE={ranks.world}); the ranks are "
                          "the shards there: drop --shard, or run without torchrun.")
    if ranks:
        return ranks, Shard(ranks.rank, ranks.world)
    return None, Shard.parse(args.shard) if args.shard else None


def merge_output(output: Path) -> list[str]:
    from ..jobs.merge import merge_parts

    return merge_parts(output).lines()


def _check_counts(args) -> None:
    from ..errors import ConfigError

    for flag, value in (("--batch-size", args.batch_size), ("--window", args.window)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")


def _job_policy(args, job):
    """(opened model, policy or None, block size), as `resolve_policy` decides for this job."""
    from ..default_model import default_model_path
    from ..weights.source import open_model

    opened = open_model(args.model or default_model_path())
    settings = job.manifest.settings if job.manifest else None
    recorded = (settings.policy, settings.block_size) if settings else None

    def workload():
        limit = opened.config.max_position_embeddings - args.max_new_tokens
        return sample_prompt_tokens(job, opened.load_tokenizer(), args.chat, limit), len(job.index)

    policy, batch_size = resolve_policy(args, opened, recorded, workload, "the job manifest")
    return opened, policy, batch_size


def _settings(args, job, opened, policy, batch_size):
    from ..api import effective_policy
    from ..config import parse_dtype
    from ..devices import default_dtype, pick_device
    from ..jobs.settings import job_settings

    dtype = parse_dtype(args.dtype) or default_dtype(pick_device(args.device))
    policy = effective_policy(opened, policy, batch_size)
    return job_settings(job, opened.path, dtype, policy, policy.block_size if policy else batch_size)


def sample_prompt_tokens(job, tokenizer, chat: bool, limit: int, sample: int = 512) -> int:
    """Tokens of the longest prompt among the job's first `sample` valid requests (at least
    64), for the planner; reads only those requests. Prompts over `limit` tokens will get error
    records, so they do not count."""
    from itertools import islice

    lengths = [64]
    for request in islice(job.requests(), sample):
        if request.error or tokenizer is None:
            continue
        if request.kind == "chat" or (chat and isinstance(request.prompt, str)):
            messages = request.messages or [{"role": "user", "content": request.prompt}]
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # a request the template rejects gets its error record later
                continue
        else:
            text = request.prompt
        length = len(text) if not isinstance(text, str) else len(tokenizer(text)["input_ids"])
        if length <= limit:
            lengths.append(length)
    return max(lengths)


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
