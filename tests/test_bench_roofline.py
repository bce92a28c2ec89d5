"""The offloading benchmark's roofline (benchmarks/offload_figures.py), hand-computed on a
one-parameter-wide model: the figure issue notes report runs against must be right."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import offload_figures  # noqa: E402

# hidden 1, one layer, vocabulary 1: a layer holds 12 + 9 = 21 values, 84 fp32 bytes; a
# one-token prompt of one sequence costs 1 x (2 x 21 + 2 x 1) + 2 (the head) = 46 FLOPs
CFG = {"hidden_size": 1, "num_hidden_layers": 1, "vocab_size": 1}
POLICY = {"gpu_batch_size": 1, "num_gpu_batches": 1, "weights_device": 0, "weights_host": 0,
          "cache_device": 1, "cache_host": 0, "compress_weight": False, "compress_cache": False}


@pytest.mark.parametrize("flops, share, seconds, contended", [
    (46 / 3, 0.5, 3.0, 4.0),   # compute 3 s, reads 2 s: the longer; reads halving the matmuls: 3 + 2 / 2
    (46.0, 0.5, 2.0, 2.0),     # compute 1 s: done at half speed within the 2 s of reads
    (46.0, 0.25, 2.0, 2.5),    # at a quarter, 1 s + 3/4 x 2 s
])
def test_a_step_is_its_reads_or_its_compute_slowed_by_them(monkeypatch, flops, share, seconds, contended):
    monkeypatch.setattr(offload_figures, "matmul_flops", lambda rows, hidden, dtype: flops)
    # 84 bytes of weights at 42 B/s: 2 s of reads; no decode step (gen_len 1)
    r = offload_figures.roofline(CFG, POLICY, prompt_len=1, gen_len=1, bandwidth=42.0, dtype="float32",
                                 compute_share=share)
    assert r["roofline_s"] == pytest.approx(seconds)
    assert r["roofline_contended_s"] == pytest.approx(contended)
