"""Loading the tokenizer that belongs to a model (HF folder, converted store, or GGUF)."""
from __future__ import annotations

import logging
from pathlib import Path

from .errors import ModelFormatError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: Path, kind: str):
    """Return a transformers tokenizer, or None if the model ships none (token ids only)."""
    from transformers import AutoTokenizer

    # transformers logs noisy notices when building a tokenizer from GGUF; they are not errors.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if kind == "gguf":
        if not _gguf_has_tokenizer(path):
            return None
        try:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:
            raise ModelFormatError(f"cannot build a tokenizer from GGUF file {path}: {e}") from e
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ModelFormatError(f"cannot load the tokenizer in {path}: {e}") from e


def _gguf_has_tokenizer(path: Path) -> bool:
    from gguf import GGUFReader

    return "tokenizer.ggml.tokens" in GGUFReader(str(path)).fields
