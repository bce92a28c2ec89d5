"""`flexbatch eval`: lm-evaluation-harness tasks on a flexbatch model (the `flexbatch[eval]` extra)."""
from __future__ import annotations

import sys

from ..errors import ConfigError
from .common import add_model_args, add_policy_args, run_settings


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="score a model on lm-evaluation-harness tasks",
        description="Run lm-evaluation-harness tasks (multiple choice, perplexity, generation) with flexbatch "
                    "as the model, under any offloading policy, and print lm-eval's results table. Needs "
                    "`pip install 'flexbatch[eval]'`. Datasets come from the Hugging Face hub unless a task is "
                    "defined locally (--include-path; set HF_DATASETS_OFFLINE=1 to forbid downloads).")
    p.add_argument("--tasks", "-t", required=True,
                   help="comma-separated lm-eval task or group names, e.g. hellaswag,arc_easy")
    add_model_args(p)
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="a folder of task YAML files to add to lm-eval's own tasks")
    p.add_argument("--output-path", default=None, metavar="PATH",
                   help="write lm-eval's results JSON here (a folder or a .json file, as lm_eval --output_path)")
    p.add_argument("--log-samples", action="store_true", help="with --output-path, also write every request's output")
    p.add_argument("--limit", type=float, default=None,
                   help="only this many documents per task (or a fraction below 1), for quick checks")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--seed", type=int, default=0, help="seed of lm-eval's few-shot sampling and of sampled generation")
    p.add_argument("--batch-size", type=int, default=None,
                   help="scored rows per block (default: the planner's choice for this machine's memory, up to 256; "
                        "32 with --no-plan); with a policy, its block")
    add_policy_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    if args.log_samples and not args.output_path:
        raise ConfigError("--log-samples writes next to the results: give --output-path too")
    tasks, task_manager = _tasks(args)  # before loading the model: a typo fails at once
    from ..integrations.lm_eval import FlexbatchLM
    from ..prepare import prepare_scoring

    prepared = prepare_scoring(run_settings(args))
    with prepared.build_llm() as llm:
        results = _evaluate(args, FlexbatchLM(llm=llm), tasks, task_manager)
    _report(args, results)
    return 0


def _tasks(args):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'flexbatch[eval]'") from None
    task_manager = TaskManager(include_path=args.include_path)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if not task_manager.match_tasks([t])]
    if unknown:
        where = f" (nor in {args.include_path})" if args.include_path else " (add local ones with --include-path)"
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}: not among lm-eval's tasks{where}; "
                          "`lm_eval ls tasks` lists them.")
    return names, task_manager


def _evaluate(args, model, tasks, task_manager) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=args.num_fewshot,
                                   limit=int(args.limit) if args.limit and args.limit >= 1 else args.limit,
                                   task_manager=task_manager, log_samples=args.log_samples,
                                   random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                   fewshot_random_seed=args.seed)


def _report(args, results: dict) -> None:
    from lm_eval.utils import make_table

    samples = results.pop("samples", None)
    if args.output_path:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=args.output_path)
        # the folder lm-eval writes under (lm_eval --output_path names it after the model)
        tracker.general_config_tracker.model_name = tracker.general_config_tracker.model_name_sanitized = "flexbatch"
        tracker.save_results_aggregated(results=results, samples=samples)
        for task_name in results["configs"] if samples else []:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        print(f"results written under {args.output_path}", file=sys.stderr)
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
