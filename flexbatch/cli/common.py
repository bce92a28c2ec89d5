"""Arguments shared by several commands (the model, policy and compression flags live in
flexbatch/options.py, shared with lm-eval's model_args)."""
from __future__ import annotations

import argparse
import sys

from ..options import (  # noqa: F401  (the commands import them from here)
    add_compression_args,
    add_model_args,
    add_policy_args,
    build_policy,
    compression_fields,
    make_llm,
    parse_bytes,
)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible runs)")
    g.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="stop when this string is generated (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")


def sampling_params(args):
    from ..config import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop),
                          ignore_eos=args.ignore_eos, logprobs=getattr(args, "logprobs", False))


DEFAULT_BATCH_SIZE = 32  # sequences per block without a policy or the planner


def resolve_policy(args, opened, recorded, workload, recorded_where: str):
    """(policy or None, block size) a command runs with: the policy flags if any were given;
    else what an earlier run recorded (`recorded`: (policy fields or None, block size), named
    `recorded_where` in the message), so a resume forms the same blocks; else with --no-plan
    everything in memory; else the planner's choice for `workload()` -> (prompt tokens,
    sequences). A --batch-size that conflicts with the policy flags is refused."""
    from ..config import Policy
    from ..errors import ConfigError

    policy = build_policy(args, planned=True)
    if policy is not None:
        if args.batch_size is not None and args.batch_size != policy.block_size:
            raise ConfigError(f"--batch-size {args.batch_size} conflicts with the policy's block of "
                              f"{policy.gpu_batch_size} x {policy.num_gpu_batches} = {policy.block_size} sequences; "
                              "drop one of them.")
        return policy, policy.block_size
    if recorded and not args.no_plan and args.batch_size in (None, recorded[1]):
        print(f"policy and block size as recorded in {recorded_where}", file=sys.stderr)
        return (Policy(**recorded[0]) if recorded[0] else None), recorded[1]
    if args.no_plan:
        return None, args.batch_size or DEFAULT_BATCH_SIZE
    from .plan import auto_policy

    prompt_len, num_sequences = workload()
    policy = auto_policy(args, prompt_len, args.max_new_tokens, num_sequences, opened, args.batch_size)
    return policy, policy.block_size
