"""`flexbatch merge OUTPUT`: assemble a sharded job's parts into OUTPUT."""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge", help="assemble the parts of a sharded job (run --shard I/N) into its output",
        description="Write OUTPUT with exactly one result line per request of the job, in input order, from the "
                    "part files its shards wrote (OUTPUT.shard-I-of-N). Refuses when a request has results in two "
                    "parts, and names the requests that have none yet (rerun their shards, then merge again). "
                    "The parts are kept unless --remove-parts; merging again is always safe.")
    p.add_argument("output", help="the OUTPUT given to `flexbatch run ... --shard I/N`")
    p.add_argument("--input", default=None,
                   help="the job's input, read only to name missing requests (default: the path the job "
                        "manifest records)")
    p.add_argument("--remove-parts", action="store_true",
                   help="delete the part files once OUTPUT is complete and on disk")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..jobs.merge import merge_parts

    summary = merge_parts(Path(args.output), Path(args.input) if args.input else None, args.remove_parts)
    for line in summary.lines():
        print(line, file=sys.stderr)
    print(f"results: {args.output}", file=sys.stderr)
    return 0
