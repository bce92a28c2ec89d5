"""Arguments shared by several commands (the model, policy and compression flags live in
flexbatch/options.py, shared with lm-eval's model_args)."""
from __future__ import annotations

import argparse

from ..options import (  # noqa: F401  (the commands import them from here)
    add_compression_args,
    add_model_args,
    add_policy_args,
    build_policy,
    compression_fields,
    parse_bytes,
    run_settings,
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
                          ignore_eos=args.ignore_eos, logprobs=getattr(args, "logprobs", False),
                          top_logprobs=getattr(args, "top_logprobs", 0))
