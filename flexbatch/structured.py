"""Structured output: a request's `response_format` (OpenAI's form) as a grammar, and the
per-step masks that keep each constrained sequence inside its grammar.

    {"type": "json_schema", "json_schema": {"name": "person", "schema": {...}, "strict": true}}
    {"type": "json_object"}        any JSON object
    {"type": "text"}               no constraint

The grammar library is llguidance (an optional dependency, imported only when a request
asks for structured output). It was chosen over xgrammar and outlines-core by measurement
(benchmarks/grammar_libs_bench.py, the default model's 49,152-token vocabulary, one CPU
thread): llguidance compiles a schema in ~5 ms against xgrammar's ~190 ms and outlines-core's
~400 ms, and each request may carry its own schema, so compilation is paid per request; its
mask costs ~30 us per step (median; xgrammar ~5 us, outlines-core ~7 us), which is small next
to a decode step of the model; it installs as one wheel with no dependencies (xgrammar's
requires triton, a GPU compiler); and it checks a schema without a tokenizer, so a bad one
is refused when the request is read.

This module knows nothing of the engine: the generation loop hands it logits and sampled
tokens (engine/generation.py).
"""
from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from .errors import ConfigError

INSTALL_HINT = "pip install llguidance==1.9.1 (or the extra: pip install 'flexbatch[structured]')"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ANY_OBJECT = {"type": "object"}
# Compact JSON (no free whitespace between tokens): fewer tokens, and a model cannot spend
# its budget on spaces and newlines.
COMPILE_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class ResponseFormat:
    """A JSON schema every generated text must match (`schema_json` is its JSON text)."""

    schema_json: str
    name: str | None = None
    strict: bool = False

    @property
    def schema(self) -> dict:
        return json.loads(self.schema_json)

    @classmethod
    def parse(cls, value: Any) -> "ResponseFormat | None":
        """A ResponseFormat from OpenAI's `response_format` (or one already parsed, or its
        dataclass fields as a dict); None for {"type": "text"}. The schema is checked here:
        ConfigError names what is wrong."""
        if value is None or isinstance(value, ResponseFormat):
            return value
        if isinstance(value, dict) and "schema_json" in value:
            return check(cls(**value))
        kind = value.get("type") if isinstance(value, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return check(cls(json.dumps(ANY_OBJECT)))
        if kind != "json_schema":
            raise ConfigError(f"response_format must be an object with type \"json_schema\", \"json_object\" or "
                              f"\"text\", got {_short(value)}")
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ConfigError("response_format json_schema must be an object "
                              "{\"name\": ..., \"schema\": {...}, \"strict\": true|false}, got " + _short(spec))
        name, strict = spec.get("name"), spec.get("strict", False)
        if name is not None and not (isinstance(name, str) and NAME_PATTERN.match(name)):
            raise ConfigError("response_format json_schema name must be 1-64 letters, digits, _ or -, got "
                              + _short(name))
        if not isinstance(strict, bool) and strict is not None:
            raise ConfigError(f"response_format json_schema strict must be true or false, got {_short(strict)}")
        schema = spec.get("schema", ANY_OBJECT)
        return check(cls(json.dumps(schema), name, bool(strict)))  # key order: the order generated


def check(fmt: ResponseFormat) -> ResponseFormat:
    grammar_of(fmt.schema_json)
    return fmt


@lru_cache(maxsize=1024)
def grammar_of(schema_json: str) -> str:
    """The llguidance grammar of a JSON schema; ConfigError if the schema is not one it can follow."""
    llguidance = _llguidance()
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_json, defaults=COMPILE_OPTIONS)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"response_format schema is not valid JSON schema: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ConfigError(f"response_format schema cannot be used: {error.strip()}. Fix the schema "
                          "(JSON Schema draft 2020-12 keywords: type, properties, required, enum, items, ...)")
    return grammar


class GrammarMasks:
    """The grammar state of each constrained sequence of a block, by block row, and their
    token masks. Masks are computed only for constrained rows, into one bitmask, then
    applied to the logits in one call."""

    def __init__(self, tokenizer, vocab_size: int):
        self.cached = _matchers_for(tokenizer, vocab_size)
        self.words = (vocab_size + 31) // 32
        self.matchers = {}
        self.bitmask = torch.zeros((0, self.words), dtype=torch.int32)

    def compile(self, fmt: ResponseFormat):
        """The compiled grammar of `fmt` (cached per schema); a ConfigError if it cannot be used."""
        templates = self.cached.templates
        if fmt.schema_json not in templates:
            template = _llguidance().LLMatcher(self.cached.tokenizer, grammar_of(fmt.schema_json), log_level=0)
            if template.is_error():
                raise ConfigError(f"response_format schema cannot be used: {template.get_error()}")
            templates[fmt.schema_json] = template
        return templates[fmt.schema_json]

    def assign(self, row: int, fmt: ResponseFormat | None) -> None:
        """Row `row` now holds a new sequence, constrained by `fmt` (None: unconstrained)."""
        self.matchers.pop(row, None)
        if fmt is not None:
            self.matchers[row] = self.compile(fmt).deep_copy()

    def apply(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """logits [n, V] of block rows `rows`, each constrained row's disallowed tokens at -inf
        (a new tensor when any row is masked; the input, the model's own distribution, is kept)."""
        picked = [(i, row) for i, row in enumerate(rows)
                  if row in self.matchers and not self.matchers[row].is_stopped()]
        if not picked:
            return logits
        if self.bitmask.shape[0] < len(picked):
            self.bitmask = torch.zeros((len(picked), self.words), dtype=torch.int32)
        bits = self.bitmask[:len(picked)]
        for i, (_, row) in enumerate(picked):
            self.matchers[row].unsafe_compute_mask_ptr(bits[i].data_ptr(), bits.shape[1] * 4)
        bias = mask_bias(bits, logits.shape[-1])
        if len(picked) == logits.shape[0]:
            return logits + bias
        return logits.clone().index_add_(0, torch.tensor([i for i, _ in picked]), bias)

    def advance(self, row: int, token: int) -> bool:
        """Move row's grammar past `token`; True when the grammar is complete (nothing may follow)."""
        matcher = self.matchers.get(row)
        if matcher is None:
            return False
        if not matcher.consume_token(token):
            raise RuntimeError(f"grammar rejected a masked token ({matcher.get_error()})")
        return matcher.is_stopped()


# BYTE_BIAS[x, i]: 0 where bit i of byte x is set, else -inf. The bitmask's int32 words are
# little-endian, so byte j of word w holds tokens 32w + 8j ... 32w + 8j + 7, lowest bit first.
# One gather from this table and one add mask the logits without branches: on CPU several
# times faster than unpacking with shifts, and than masked_fill or where over booleans.
BYTE_BIAS = torch.zeros(256, 8).masked_fill(((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1) == 0,
                                            float("-inf"))


def mask_bias(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A bitmask [R, W] int32 (bit k of word w = token 32w + k) as an additive bias [R, vocab_size]."""
    as_bytes = bits.view(torch.uint8).reshape(-1).long()  # [R * 4W]
    return BYTE_BIAS.index_select(0, as_bytes).reshape(bits.shape[0], -1)[:, :vocab_size]


class _TokenizerMatchers:
    """llguidance's view of a tokenizer (about 1 s to build) and one compiled matcher per
    schema, copied for each sequence that uses it."""

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance.hf

        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.templates: dict[str, Any] = {}


_BY_TOKENIZER: "weakref.WeakKeyDictionary[Any, dict[int, _TokenizerMatchers]]" = weakref.WeakKeyDictionary()


def _matchers_for(tokenizer, vocab_size: int) -> _TokenizerMatchers:
    if tokenizer is None:
        raise ConfigError("response_format needs the model's tokenizer, and this model has none")
    per_vocab = _BY_TOKENIZER.setdefault(tokenizer, {})
    if vocab_size not in per_vocab:
        per_vocab[vocab_size] = _TokenizerMatchers(tokenizer, vocab_size)
    return per_vocab[vocab_size]


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ConfigError(f"response_format needs the grammar library llguidance: {INSTALL_HINT}") from None
    return llguidance


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
