"""`flexbatch run INPUT -o OUTPUT`: the durable batch job over a prompt file."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import add_model_args, add_policy_args, add_sampling_args, run_settings, sampling_params
from .stages import add_pipeline_arg, lead_stages, serve_stage, stage_report


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
    p.add_argument("--top-logprobs", type=int, default=0, metavar="N",
                   help="each generated token's N most likely alternatives too (implies --logprobs; at most 20)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences in flight at once, the block (default: the planner's choice; 32 with --no-plan)")
    p.add_argument("--window", type=int, default=None,
                   help="requests read, tokenized and sorted by length at a time (default 50000): bounds "
                        "memory on large inputs; segments never span two windows")
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
    add_pipeline_arg(p)
    add_policy_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    _check_counts(args)
    ranks, shard, place = _placement(args)
    if ranks:
        ranks.start()
        args.device = ranks.device(args.device)
    try:
        if place and not place.first:
            serve_stage(args, place)
        else:
            execute(args, shard, place)
        if ranks:
            ranks.wait_for_all()  # every rank has closed its part
            if ranks.rank == 0 and shard:
                for line in merge_output(Path(args.output)):
                    print(line, file=sys.stderr)
    finally:
        if ranks:
            ranks.close()
    if ranks and ranks.rank != 0:
        return 0
    print(f"results: {args.output}" if not shard or ranks else
          f"results: {shard.part(Path(args.output))} (`flexbatch merge {args.output}` once every shard is done)",
          file=sys.stderr)
    if args.show and (not shard or ranks):
        show_results(Path(args.output))
    return 0


def execute(args, shard=None, place=None):
    """Open (or resume) the job, or its `shard`, load the model, run it; returns the
    JobSummary (also printed). `place`: this process is the first of pipeline stages."""
    from ..jobs.job import Job, JobSpec
    from ..jobs.runner import WindowRunner
    from ..jobs.settings import job_settings

    _check_counts(args)
    job = None

    def open_job():  # every check of the flags, the input and the output runs before the model loads
        nonlocal job
        settings = run_settings(args)
        spec = JobSpec(Path(args.input), Path(args.output), args.format, args.column, args.chat,
                       sampling_params(args), args.window, args.force_new, args.continue_changed, shard)
        job = Job.open(spec)
        run = _prepare(args, settings, job)
        job.bind(job_settings(job, run.opened.path, run.dtype, run.policy, run.batch_size))
        return run

    try:
        run = lead_stages(place, open_job)
        with run.build_llm() as llm:
            print(f"model {llm.model_path}, dtype {str(llm.dtype).removeprefix('torch.')}, "
                  f"block of {llm.batch_size} sequences, policy: {run.policy or 'everything in memory'}",
                  file=sys.stderr)
            summary = WindowRunner(job, llm, llm.model_path.name, progress=True).run()
        if place is not None:
            print(stage_report(llm), file=sys.stderr)
    finally:
        if job is not None:
            job.close()
    for line in summary.lines():
        print(line, file=sys.stderr)
    return summary


def _placement(args):
    """(torchrun's ranks or None, the shard this process runs or None, its pipeline
    StagePlace or None). Under torchrun every pipeline (every rank without stages) is a shard."""
    from ..errors import ConfigError
    from ..jobs.shards import Shard
    from ..ranks import Ranks
    from .stages import stage_place

    ranks = Ranks.from_env()
    place = stage_place(args, ranks)
    if ranks and args.shard:
        raise ConfigError(f"--shard {args.shard} was given under torchrun (WORLD_SIZE={ranks.world}); the ranks are "
                          "the shards there: drop --shard, or run without torchrun.")
    if ranks:
        stages = place.stages if place else 1
        shards = ranks.world // stages
        return ranks, Shard(ranks.rank // stages, shards) if shards > 1 else None, place
    return None, Shard.parse(args.shard) if args.shard else None, None


def merge_output(output: Path) -> list[str]:
    from ..jobs.merge import merge_parts

    return merge_parts(output).lines()


def _check_counts(args) -> None:
    from ..errors import ConfigError

    for flag, value in (("--batch-size", args.batch_size), ("--window", args.window)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")


def _prepare(args, settings, job):
    """The model opened and its policy chosen for this job: as recorded in the job's
    manifest if it has one, else from the flags or the planner (prepare.prepare_run)."""
    from itertools import islice

    from ..jobs.params import most_new_tokens
    from ..prepare import PROMPT_SAMPLE, prepare_run, prompt_shape

    manifest = job.manifest.settings if job.manifest else None
    recorded = (manifest.policy, manifest.block_size) if manifest else None

    def estimate(opened):
        context = opened.config.max_position_embeddings
        sample = [r for r in islice(job.requests(), PROMPT_SAMPLE) if not r.error]
        prompts = (_prompt_of(r, args.chat) for r in sample)
        shape = prompt_shape(opened.load_tokenizer(), prompts, context - args.max_new_tokens)
        # the requests' own max_tokens (a batch file's bodies carry them), within the context
        asked = min(most_new_tokens(sample, job.spec.defaults), context - shape.longest)
        return shape.longest, len(job.index), asked, shape.shared_prefix, shape.grouped

    return prepare_run(settings, args.max_new_tokens, estimate, recorded, "the job manifest")


def _prompt_of(request, chat: bool):
    """A request's prompt as the model will see it: messages for chat requests (and plain
    prompts with --chat), else its text or token ids."""
    if request.kind == "chat" or (chat and isinstance(request.prompt, str)):
        return request.messages or [{"role": "user", "content": request.prompt}]
    return request.prompt


def show_results(output: Path) -> None:
    """Print `id: text` for each line of a results file (either output format)."""
    from ..jobs.output import read_records

    for record in read_records(output):
        rid = record.get("custom_id", record.get("id"))
        if record.get("error"):
            error = record["error"]
            print(f"[{rid}] ERROR: {error['message'] if isinstance(error, dict) else error}\n")
            continue
        body = record.get("response", {}).get("body") or {}
        choice = (body.get("choices") or [{}])[0]
        text = choice.get("message", {}).get("content") if "message" in choice else choice.get("text")
        print(f"[{rid}] {record.get('text', text)}\n")
