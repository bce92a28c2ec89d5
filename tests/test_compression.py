"""Compressed weights and KV cache: the packed format against an fp32 oracle, the fused int4
kernel against dequantize-then-matmul, and every placement of compressed tensors giving
the tokens of the compressed in-memory run."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexbatch import LLM, SamplingParams
from flexbatch.config import Policy
from flexbatch.kernels import KernelChoice
from flexbatch.kernels import packed as packed_linear
from flexbatch.kernels.attention import orthonormal
from flexbatch.kernels.packed import dequantize_linear, pack_linear, unpack_levels
from flexbatch.kernels.quant import QuantConfig
from flexbatch.sizing import layer_weight_bytes
from flexbatch.storage.kv_rows import RowCodec

PROMPTS = [[5, 6, 7], list(range(10, 31)), [200], [3, 1, 4, 1, 5, 9, 2, 6, 5], [77, 78], list(range(40, 52)), [9, 9]]
PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)


@settings(max_examples=30, deadline=None)
@given(tiles=st.integers(1, 3), groups=st.integers(1, 4), group=st.sampled_from([8, 32, 64]),
       bits=st.sampled_from([4, 8]), seed=st.integers(0, 1000))
def test_packed_weight_round_trip_within_half_a_step(tiles, groups, group, bits, seed):
    torch.manual_seed(seed)
    w = torch.randn(64 * tiles, group * groups) * torch.rand(1) * 3
    p = pack_linear(w, bits, group)
    q = unpack_levels(p).float().reshape(w.shape[0], groups, group)
    # independent oracle: levels recomputed from each group's min and max in fp32
    g = w.reshape(w.shape[0], groups, group)
    low, high = g.amin(2, keepdim=True), g.amax(2, keepdim=True)
    step = (high - low) / ((1 << bits) - 1)
    assert torch.all(q <= (1 << bits) - 1)
    assert torch.allclose(q, torch.round((g - low) / torch.where(step > 0, step, torch.ones_like(step))))
    error = (dequantize_linear(p).reshape_as(g) - g).abs()
    assert torch.all(error <= step / 2 + 1e-5 * (1 + g.abs()))
    assert p.nbytes() == w.numel() * bits // 8 + 2 * groups * w.shape[0] * 4


def test_fused_kernel_reads_our_layout():
    if not packed_linear.fused_kernel_available():
        pytest.skip("this torch build has no CPU int4 kernel that reads our tile layout; the dequantize path is used")
    torch.manual_seed(0)
    p = pack_linear(torch.randn(192, 256, dtype=torch.bfloat16), 4, 64)
    for rows in (1, 5, 64):
        x = torch.randn(rows, 256, dtype=torch.bfloat16)
        fused = packed_linear.fused_int4_matmul(x, p).float()
        dense = (x.float() @ dequantize_linear(p).float().T)
        # both round to bf16 once per output; the tolerance is a few bf16 ulps of the output scale
        assert torch.allclose(fused, dense, atol=0.03 * dense.abs().max().item(), rtol=0.02)


@pytest.mark.parametrize("fused_rows", [0, 1024])
def test_linear_uses_either_kernel_with_the_same_result(fused_rows):
    torch.manual_seed(1)
    w = torch.randn(128, 128)
    p = pack_linear(w, 4, 32, KernelChoice(fused_rows))
    x = torch.randn(3, 7, 128)
    expected = x @ dequantize_linear(p).T + 1.0
    got = p.to(torch.device("cpu")).linear(x, torch.ones(128))
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", [QuantConfig(4, 64), QuantConfig(8, 8), QuantConfig(4, 4)])
def test_kv_rows_decode_what_was_encoded(quant, dtype):
    torch.manual_seed(2)
    x = torch.randn(3, 2, 5, 16).to(dtype)
    codec = RowCodec(3, 2, 16, dtype, quant)
    rows = codec.encode(x)
    assert rows.shape == (5, codec.row_bytes)
    # each token's row decodes on its own, so rows written step by step read back the same
    one_by_one = torch.cat([codec.decode(rows[t:t + 1]) for t in range(5)], dim=2)
    assert torch.equal(one_by_one, codec.decode(rows))
    # within half a step of each group (plus the rounding of the stored scales and of the
    # output to the cache dtype)
    group = min(quant.group_size, 16)
    g = x.float().reshape(3, 2, 5, 16 // group, group)
    step = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / quant.levels
    decoded = codec.decode(rows).float().reshape_as(g)
    slack = 1e-5 if dtype == torch.float32 else 0.02 * (1 + g.abs().amax(-1, keepdim=True))
    assert torch.all((decoded - g).abs() <= step / 2 + slack)


def test_kv_rows_encoded_a_few_tokens_at_a_time_are_the_rows_of_all_at_once(monkeypatch):
    """A store quantizes its tokens in chunks (`ENCODE_CHUNK_VALUES` values) to bound its
    temporaries: each token's row depends on that token alone, so chunks of 2 tokens (with a
    short last one) give the bytes of one call over all seven."""
    from flexbatch.storage import kv_rows

    monkeypatch.setattr(kv_rows, "ENCODE_CHUNK_VALUES", 2 * 3 * 2 * 16)
    torch.manual_seed(4)
    tokens = torch.randn(7, 3, 2, 16, dtype=torch.bfloat16)  # [T, n, Hkv, D]
    codec = RowCodec(3, 2, 16, torch.bfloat16, QuantConfig(4, 16))
    out = torch.zeros(7, codec.row_bytes, dtype=torch.uint8)
    codec.encode_rows_into(tokens, out)
    assert torch.equal(out, torch.cat([codec.encode_rows(tokens[t:t + 1]) for t in range(7)]))


@pytest.mark.parametrize("n", [16, 24])
def test_rotation_is_orthonormal(n):
    rotation = orthonormal(n)
    assert torch.allclose(rotation @ rotation.T, torch.eye(n), atol=1e-5)


def test_compressed_weights_take_their_stored_bytes(tiny_model):
    folder, _ = tiny_model("opt_pre_ln")
    llm = LLM(folder, dtype="float32")
    plain = layer_weight_bytes(llm.config, llm.family, torch.float32)
    packed = layer_weight_bytes(llm.config, llm.family, torch.float32, QuantConfig(4, 32, 1))
    # OPT tiny layer: 4 [64,64] and 2 [128,64]/[64,128] weights pack; norms and biases stay fp32
    dense = 4 * 64 * 64 + 2 * 128 * 64
    assert plain - packed == dense * 4 - (dense // 2 + 2 * (dense // 32) * 4)


def _compressed(policy: Policy, **switches) -> Policy:
    fields = {**policy.__dict__, "compress_group": 32, "cache_window": 0, **switches}
    return Policy(**fields)


PLACEMENTS = {
    "in_memory": Policy(gpu_batch_size=4, num_gpu_batches=2),
    "weights_on_disk": Policy(gpu_batch_size=4, num_gpu_batches=2, weights_device=0, weights_host=0),
    "cache_on_disk": Policy(gpu_batch_size=4, num_gpu_batches=2, cache_device=0, cache_host=0),
    "mixed_sequential": Policy(gpu_batch_size=3, num_gpu_batches=3, weights_device=0.3, weights_host=0.2,
                               cache_device=0.4, cache_host=0.2, overlap=False),
    "all_on_disk": Policy(gpu_batch_size=2, num_gpu_batches=2, weights_device=0, weights_host=0,
                          cache_device=0, cache_host=0),
}


@pytest.mark.parametrize("switches", [dict(compress_weight=True), dict(compress_cache=True, cache_window=0),
                                      dict(compress_cache=True, cache_window=3),
                                      dict(compress_weight=True, compress_cache=True, compress_bits=8, cache_window=5),
                                      dict(attn_sparsity=0.3), dict(attn_sparsity=0.5, compress_cache=True)])
@pytest.mark.parametrize("kind", ["opt_pre_ln", "llama_gqa_tied_llama3"])
def test_compressed_placements_match_compressed_in_memory(tiny_model, tmp_path, kind, switches):
    folder, _ = tiny_model(kind)
    results = {}
    for name, policy in PLACEMENTS.items():
        with LLM(folder, dtype="float32", policy=_compressed(policy, **switches), offload_dir=tmp_path / name) as llm:
            results[name] = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    for name, tokens in results.items():
        assert tokens == results["in_memory"], name


def test_compression_changes_the_computation(tiny_model, tmp_path):
    """Guards the test above: compressed runs really use quantized values."""
    folder, _ = tiny_model("opt_pre_ln")
    policy = Policy(gpu_batch_size=7)
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path / "a") as llm:
        plain = [s.logprobs for s in llm.score(PROMPTS[1:2])]
    with LLM(folder, dtype="float32", policy=_compressed(policy, compress_weight=True),
             offload_dir=tmp_path / "b") as llm:
        packed = [s.logprobs for s in llm.score(PROMPTS[1:2])]
    assert plain != packed


def test_cache_window_longer_than_sequences_is_exact(tiny_model, tmp_path):
    """Every token inside the unquantized window: the tokens of the uncompressed run."""
    folder, _ = tiny_model("llama_gqa_tied_llama3")
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, cache_device=0.5, cache_host=0)
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path / "a") as llm:
        plain = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    windowed = Policy(**{**policy.__dict__, "compress_cache": True, "cache_window": 64})
    with LLM(folder, dtype="float32", policy=windowed, offload_dir=tmp_path / "b") as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == plain
    no_window = Policy(**{**windowed.__dict__, "cache_window": 0})
    with LLM(folder, dtype="float32", policy=no_window, offload_dir=tmp_path / "c") as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] != plain


def test_compressed_store_runs_as_compressing_on_load(tiny_model, tmp_path):
    """`convert --compress-weight` stores the packed weights; running from that store gives
    the tokens of packing the original weights on load, and the index records the packing."""
    import json

    from flexbatch.cli.main import main
    from flexbatch.weights.source import open_model

    folder, _ = tiny_model("opt_pre_ln")
    dst = tmp_path / "store"
    assert main(["convert", str(folder), str(dst), "--compress-weight", "--compress-group", "32"]) == 0
    index = json.loads((dst / "flexbatch.json").read_text())["tensors"]
    packed = index["model.decoder.layers.0.self_attn.q_proj.weight"]["packed"]
    assert (packed["bits"], packed["group"]) == (4, 32)
    assert packed["parts"]["data"]["nbytes"] == 64 * 64 // 2
    assert "packed" not in index["model.decoder.layers.0.self_attn.q_proj.bias"]
    assert "packed" not in index["model.decoder.embed_tokens.weight"]
    source = open_model(dst).source
    original = open_model(folder).source.read("model.decoder.layers.1.fc1.weight")
    assert torch.equal(source.read("model.decoder.layers.1.fc1.weight"),
                       dequantize_linear(pack_linear(original, 4, 32)))

    llm = LLM(dst, dtype="float32", batch_size=4)
    assert llm.policy.compress_weight and llm.policy.compress_group == 32
    with llm:
        from_store = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    policy = Policy(gpu_batch_size=4, compress_weight=True, compress_group=32)
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path / "o") as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == from_store


def test_corrupted_packed_weight_is_named(tiny_model, tmp_path):
    import json

    from flexbatch.errors import WeightFileError
    from flexbatch.weights.source import open_model
    from flexbatch.weights.store import write_store

    folder, _ = tiny_model("opt_pre_ln")
    dst = write_store(open_model(folder), tmp_path / "store", quant=QuantConfig(4, 32, 1))
    entry = json.loads((dst / "flexbatch.json").read_text())["tensors"]["model.decoder.layers.2.fc2.weight"]
    data_file = dst / entry["packed"]["parts"]["data"]["file"]
    raw = bytearray(data_file.read_bytes())
    raw[5] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    with pytest.raises(WeightFileError, match="fc2.weight#data"):
        open_model(dst).source.read("model.decoder.layers.2.fc2.weight")


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.1])
def test_sparse_attention_matches_a_loop_oracle(keep):
    import math

    from flexbatch.kernels import grouped_attention

    torch.manual_seed(3)
    b, h, hkv, t, d = 2, 4, 2, 13, 8
    q, keys, values = torch.randn(b, h, 1, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    mask = torch.zeros(b, 1, 1, t)
    mask[0, ..., :3] = float("-inf")  # left padding of the first sequence
    got = grouped_attention(q, keys, values, mask, 0.5, keep)
    for i in range(b):
        kept = max(1, math.ceil(keep * int(torch.isfinite(mask[i]).sum())))
        for head in range(h):
            kv = head // (h // hkv)
            scores = (keys[i, kv] @ q[i, head, 0]) * 0.5 + mask[i, 0, 0]
            top = scores.topk(kept).indices
            weights = torch.softmax(scores[top], dim=0)
            expected = weights @ values[i, kv, top]
            assert torch.allclose(got[i, head, 0], expected, atol=1e-5), (i, head)


@pytest.mark.parametrize("offloaded", [False, True])
def test_scoring_in_pieces_equals_one_pass(tiny_model, tmp_path, offloaded):
    """Pieces read earlier tokens back from the (uncompressed) cache: same log-probabilities."""
    folder, _ = tiny_model("qwen2")
    texts = [list(range(3, 30)), [9, 8, 7, 6, 5]]
    policy = Policy(gpu_batch_size=1, num_gpu_batches=2, cache_device=0, cache_host=0) if offloaded else None
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path) as llm:
        whole = [s.logprobs for s in llm.score(texts)]
        for piece in (1, 4, 7):
            pieces = [s.logprobs for s in llm.score(texts, piece=piece)]
            for a, b in zip(pieces, whole):
                assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("fused_max_rows", [0, 1 << 20], ids=["dequantize", "fused"])
def test_bf16_compressed_placements_match(tiny_model, tmp_path, monkeypatch, fused_max_rows):
    """The compute dtype the CLI picks on this CPU: scales stored in bf16 on every tier.
    The placements use different batch sizes, so which kernel runs is pinned (in bf16 the two
    round differently)."""
    monkeypatch.setenv("FLEXBATCH_INT4_FUSED_MAX_ROWS", str(fused_max_rows))  # the knob LLM reads
    folder, _ = tiny_model("llama_gqa_tied_llama3")
    switches = dict(compress_weight=True, compress_cache=True, cache_window=2)
    results = []
    for name in ("in_memory", "all_on_disk", "mixed_sequential"):
        with LLM(folder, dtype="bfloat16", policy=_compressed(PLACEMENTS[name], **switches),
                 offload_dir=tmp_path / name) as llm:
            results.append([o.token_ids for o in llm.generate(PROMPTS, PARAMS)])
    assert results[1] == results[0] and results[2] == results[0]
