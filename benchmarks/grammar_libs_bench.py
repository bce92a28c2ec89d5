"""Which grammar library constrains decoding fastest on this CPU: llguidance, xgrammar, outlines-core.

For each library: compile a JSON schema against the default model's tokenizer (49,152 tokens),
then walk a valid document token by token, computing the allowed-token mask before each
token and checking the token is in it (the work a constrained decode step adds). Reports
compile time and mean mask time per step; the figure that decides is the per-step time,
since it is paid for every constrained sequence at every step. Libraries not installed are
skipped. Last line: one JSON object.

    pip install outlines-core==0.2.14
    pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2   # its triton is GPU-only
    OMP_NUM_THREADS=1 python benchmarks/grammar_libs_bench.py

Measured here (2 shared cores): compile 4-6 ms / ~190 ms / ~400 ms, median mask 30 / 5 / 7 us,
mean mask 70-80 / 17-24 / 55 us per step (llguidance / xgrammar / outlines-core).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "kind": {"enum": ["person", "company", "place"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "kind", "age", "score", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace", "kind": "person", "age": 36, "score": 0.875,
            "tags": ["mathematics", "analytical engine", "poetry"],
            "address": {"city": "London", "zip": "W1J 7NT"}}


def walk(name: str, compile_fn, tokens: list[int]) -> dict:
    start = time.perf_counter()
    step_fn = compile_fn()
    compile_s = time.perf_counter() - start
    mask_s = []
    for token in tokens:
        t0 = time.perf_counter()
        mask = step_fn(None)
        mask_s.append(time.perf_counter() - t0)
        assert unpack(mask, 1 + token)[0, token], f"{name}: token {token} not allowed"
        step_fn(token)
    mean_us = 1e6 * sum(mask_s) / len(mask_s)
    return {"library": name, "compile_ms": 1e3 * compile_s, "mask_us_per_step": mean_us,
            "median_mask_us": 1e6 * sorted(mask_s)[len(mask_s) // 2], "max_mask_us": 1e6 * max(mask_s),
            "steps": len(tokens)}


def llguidance_fn(tok, vocab: int):
    import llguidance
    import llguidance.hf

    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)

    def build():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
        matcher = llguidance.LLMatcher(lltok, grammar)
        mask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)

        def step(token):
            if token is not None:
                return matcher.consume_token(token)
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            return mask
        return step
    return build


def xgrammar_fn(tok, vocab: int):
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info)

    def build():
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                               separators=(",", ":"))
        matcher = xgrammar.GrammarMatcher(compiled)
        mask = xgrammar.allocate_token_bitmask(1, vocab)

        def step(token):
            if token is not None:
                return matcher.accept_token(token)
            matcher.fill_next_token_bitmask(mask, 0)
            return mask
        return step
    return build


def outlines_fn(tok, vocab: int):
    import outlines_core
    byte_of = {c: b for b, c in byte_level_alphabet().items()}
    table: dict[bytes, list[int]] = {}
    for piece, i in tok.get_vocab().items():
        if i != tok.eos_token_id and i < vocab and all(c in byte_of for c in piece):
            table.setdefault(bytes(byte_of[c] for c in piece), []).append(i)
    vocabulary = outlines_core.Vocabulary(tok.eos_token_id, table)

    def build():
        regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA), r"")
        guide = outlines_core.Guide(outlines_core.Index(regex, vocabulary))
        mask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)

        def step(token):
            if token is not None:
                return guide.advance(token)
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            return mask
        return step
    return build


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte as the printable character its tokens use."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def unpack(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = (mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(mask.shape[0], -1)[:, :vocab].bool()


def main() -> None:
    from flexbatch.default_model import default_model_path
    from flexbatch.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(default_model_path(), "store")
    vocab = len(tok)
    tokens = tok(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)["input_ids"]
    rows = []
    for name, make in (("llguidance", llguidance_fn), ("xgrammar", xgrammar_fn), ("outlines-core", outlines_fn)):
        try:
            build = make(tok, vocab)
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        try:
            row = walk(name, build, tokens)
        except Exception as e:  # a library that cannot run here is a result too
            row = {"library": name, "error": f"{type(e).__name__}: {e}"[:200]}
        rows.append(row)
        print(row)
    print(json.dumps({"benchmark": "grammar_libs", "vocab": vocab, "results": rows}))


if __name__ == "__main__":
    main()
