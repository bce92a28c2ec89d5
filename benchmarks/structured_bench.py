"""The cost of structured output: throughput with a JSON schema vs without, on the same requests.

The default model extracts a record from short texts, first with a response_format (every
output a JSON object of the schema), then without one, each request generating exactly the
number of tokens its constrained run generated (ignore_eos, max_new_tokens = that count), so
both runs do the same model work and differ only by the grammar masks. A warm-up run (which
builds llguidance's tokenizer view, about a second, once per model) is excluded. Reports
generated tokens/s of both and their ratio (aim: >= 0.9), the median over alternating rounds,
and the share of the constrained run spent computing and applying masks (timed directly, so
less sensitive to the load of a shared machine). Last line: one JSON object.

    OMP_NUM_THREADS=2 python benchmarks/structured_bench.py --requests 32 --batch-size 32
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "occupation": {"type": "string", "maxLength": 40},
        "born": {"type": "integer", "minimum": 1000, "maximum": 2100},
        "field": {"enum": ["science", "arts", "politics", "sports", "other"]},
        "places": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
    },
    "required": ["name", "occupation", "born", "field", "places"],
    "additionalProperties": False,
}
PEOPLE = [
    "Ada Lovelace (1815-1852) was an English mathematician who worked on Babbage's Analytical Engine in London.",
    "Marie Curie, born 1867 in Warsaw, was a physicist and chemist who worked in Paris.",
    "Pele, born in 1940 in Tres Coracoes, Brazil, was a footballer who played for Santos.",
    "Frida Kahlo (1907-1954) was a Mexican painter from Coyoacan, Mexico City.",
    "Nelson Mandela, born 1918 in Mvezo, was a South African president and activist.",
    "Alan Turing (1912-1954) was a British computer scientist at Bletchley Park and Manchester.",
    "Serena Williams, born 1981 in Saginaw, Michigan, is a tennis player.",
    "Johann Sebastian Bach, born 1685 in Eisenach, was a composer who worked in Leipzig.",
]


def conversations(n: int) -> list[list[dict]]:
    ask = "Extract the person in this text as JSON with name, occupation, born, field and places:\n"
    return [[{"role": "user", "content": ask + PEOPLE[i % len(PEOPLE)]}] for i in range(n)]


def timed(llm, prompts, params) -> tuple[list, float]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return outs, time.perf_counter() - start


def time_grammar_work() -> list[float]:
    """Wrap GrammarMasks' per-step methods to add their time to the returned one-item list."""
    from flexbatch.structured import GrammarMasks

    total = [0.0]

    def timing(method):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - start
        return wrapped

    GrammarMasks.apply = timing(GrammarMasks.apply)
    GrammarMasks.advance = timing(GrammarMasks.advance)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: the default model)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each; the median ratio is reported")
    args = p.parse_args()

    from flexbatch import LLM, SamplingParams

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    llm = LLM(args.model, batch_size=args.batch_size)
    prompts = [llm.apply_chat_template(c) for c in conversations(args.requests)]
    constrained = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=0,
                                 response_format=fmt)
    llm.generate(prompts[:2], constrained)  # warm-up: llguidance's tokenizer view, the schema's grammar
    grammar_seconds = time_grammar_work()
    outs, _ = timed(llm, prompts, constrained)
    lengths = [len(o.token_ids) for o in outs]
    plain = [replace(constrained, response_format=None, ignore_eos=True, max_new_tokens=n) for n in lengths]
    tokens, rounds = sum(lengths), []
    for _ in range(args.rounds):  # alternated, so a change in the machine's load hits both alike
        grammar_seconds[0] = 0.0
        again, seconds = timed(llm, prompts, constrained)
        assert [o.token_ids for o in again] == [o.token_ids for o in outs] or args.temperature > 0
        plain_outs, plain_seconds = timed(llm, prompts, plain)
        assert sum(len(o.token_ids) for o in plain_outs) == tokens
        rounds.append({"with_schema_s": seconds, "without_schema_s": plain_seconds,
                       "grammar_s": grammar_seconds[0], "ratio": plain_seconds / seconds})
        print(f"with schema {tokens / seconds:8.1f} tok/s ({seconds:.2f} s, grammar {grammar_seconds[0]:.2f} s)"
              f"   without {tokens / plain_seconds:8.1f} tok/s ({plain_seconds:.2f} s)"
              f"   ratio {plain_seconds / seconds:.3f}")
    parsed = sum(_parses(o.text) for o in outs)
    median = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
    print(f"{args.requests} requests, batch {args.batch_size}, {tokens} generated tokens; "
          f"{parsed}/{len(outs)} texts parse; example: {outs[0].text}")
    print(json.dumps({"benchmark": "structured_output", "model": str(llm.model_path.name),
                      "requests": args.requests, "batch_size": args.batch_size, "generated_tokens": tokens,
                      "texts_parsed": parsed, "rounds": len(rounds), "median_ratio": round(median["ratio"], 3),
                      "with_schema_tok_s": round(tokens / median["with_schema_s"], 1),
                      "without_schema_tok_s": round(tokens / median["without_schema_s"], 1),
                      "grammar_share_of_time": round(median["grammar_s"] / median["with_schema_s"], 3)}))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


if __name__ == "__main__":
    main()
