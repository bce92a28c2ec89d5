"""`flexbatch <command>`: the entry point of the command line."""
from __future__ import annotations

import argparse
import sys

from ..errors import FlexbatchError
from . import convert, eval_ppl, evaluate, generate, merge, plan, run, serve, wrangle

COMMANDS = [run, merge, serve, wrangle, generate, convert, evaluate, eval_ppl, plan]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexbatch",
        description="High-throughput batch generation with LLMs on hardware that cannot hold them.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def _version() -> str:
    from .. import __version__

    return f"flexbatch {__version__}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except FlexbatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk or file problem no command caught: still one line, naming the file
        from ..errors import storage_error

        print(f"error: {storage_error(e, e.filename or 'a file', 'read or write')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
