"""Perplexity evaluation against the transformers reference protocol of DESIGN.md."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flexbatch.errors import ConfigError
from flexbatch.evaluation import chunk_tokens

REFERENCE_PPL = 15.8514  # SmolLM2-135M-Instruct, fp32, transformers, same protocol


@pytest.mark.slow
def test_default_model_fp32_perplexity_matches_reference(default_model_store):
    out = subprocess.run([sys.executable, "-m", "flexbatch", "eval-ppl", "--model", str(default_model_store),
                          "--dtype", "float32"], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["num_tokens"] == 20 * 1023
    assert abs(result["perplexity"] - REFERENCE_PPL) / REFERENCE_PPL < 1e-3


def test_chunking_is_non_overlapping_and_checks_length():
    chunks = chunk_tokens(list(range(100)), 10, 3)
    assert chunks == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    with pytest.raises(ConfigError, match="enough for 2 chunks"):
        chunk_tokens(list(range(25)), 10, 3)
