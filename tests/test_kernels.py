"""The kernels package's seams: one quantizer for weights and KV cache, one `linear` entry for
every weight format, and the 4-bit kernel choice handed in from the hardware profile (or the
override at the top), never measured inside a matmul."""
from __future__ import annotations

import pytest
import torch

import flexbatch.profiling
from flexbatch import LLM, SamplingParams
from flexbatch.config import Policy
from flexbatch.errors import ConfigError
from flexbatch.kernels import KernelChoice, linear
from flexbatch.kernels.packed import PackedLinear, dequantize_linear, pack_linear, unpack_levels
from flexbatch.kernels.quant import QuantConfig, quantize
from flexbatch.planner import ComputeRates, DiskRates, HardwareProfile
from flexbatch.storage.kv_rows import RowCodec

FLAT = {1: 1e10, 2048: 1e10}


def test_weights_and_kv_rows_share_one_quantizer():
    """A packed weight's levels and a KV row's levels come from the same group quantizer."""
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    from_weight = unpack_levels(pack_linear(w, 4, 32))
    qt = quantize(w, QuantConfig(4, 32, 1))
    high, low = qt.data >> 4, qt.data & 0x0F
    from_quantize = torch.stack([high, low], -1).reshape(64, 128)
    assert torch.equal(from_weight, from_quantize)
    codec = RowCodec(1, 64, 128, torch.float32, QuantConfig(4, 32))
    rows = codec.decode(codec.encode(w.reshape(1, 64, 1, 128)))
    assert torch.allclose(rows.reshape(64, 128), dequantize_linear(pack_linear(w, 4, 32)), atol=1e-5)


@pytest.mark.parametrize("fused_max_rows", [0, 8])
def test_linear_is_one_entry_for_dense_and_packed_weights(fused_max_rows):
    torch.manual_seed(2)
    w, bias, x = torch.randn(64, 96), torch.randn(64), torch.randn(2, 3, 96)
    packed = pack_linear(w, 4, 32, KernelChoice(fused_max_rows))
    assert torch.allclose(linear(x, w, bias), x @ w.T + bias, atol=1e-5)
    assert torch.allclose(linear(x, packed, bias), x @ dequantize_linear(packed).T + bias, atol=1e-4)


def test_the_choice_follows_rows_and_travels_with_the_weight():
    p = pack_linear(torch.randn(64, 64), 4, 32, KernelChoice(4))
    moved = p.to(torch.device("cpu"))
    assert moved.choice == KernelChoice(4) and moved._dense is None
    moved.prepare(rows=4)
    assert moved._dense is None  # within the crossover: the fused kernel, nothing dequantized
    moved.prepare(rows=5)
    assert moved._dense is not None  # past it: dequantized once for the whole block
    assert PackedLinear(p.data, p.scale_zero, 4, 32).choice == KernelChoice(0)  # unmeasured: never fused


@pytest.mark.parametrize("dequantize_rate,expected", [(1e12, 2), (1e9, 8), (1e6, 2048), (0.0, 2)])
def test_crossover_from_rates_by_hand(dequantize_rate, expected):
    """Fused at 1e10 FLOP/s flat; dense at 2e10 from 4 rows on, slower below. Per parameter
    and row count r: fused 2r / 1e10 against 1 / rate + 2r / dense(r)."""
    dense = lambda rows: 2e10 if rows >= 4 else 2e9
    choice = KernelChoice.from_rates(lambda rows: 1e10, dense, dequantize_rate)
    assert choice.fused_max_rows == expected


def cpu_profile(flops, **rates) -> HardwareProfile:
    return HardwareProfile("test", 1 << 34, ComputeRates(flops, **rates), DiskRates(1e9, 1e9))


def test_profile_gives_the_choice_its_rates_imply():
    profile = cpu_profile({"bfloat16": {1: 1e9, 2048: 2e12}, "int4": FLAT}, dequantize_params_per_s={"int4": 1e10})
    rows = profile.kernel_choice(torch.bfloat16).fused_max_rows
    per_param = lambda r: (2 * r / profile.cpu.flops(torch.bfloat16, r, 4),
                           1 / 1e10 + 2 * r / profile.cpu.flops(torch.bfloat16, r))
    fused, dense = per_param(rows)
    assert 0 < rows < 2048 and fused < dense
    fused, dense = per_param(2 * rows)
    assert fused >= dense
    no_kernel = cpu_profile({"bfloat16": FLAT})
    assert no_kernel.kernel_choice(torch.bfloat16) == KernelChoice(0)


def _packed_choices(llm) -> set[KernelChoice]:
    home = llm.runner.home
    loaded = home.load(0)
    try:
        return {w.choice for w in loaded.weights.values() if isinstance(w, PackedLinear)}
    finally:
        home.release(loaded)  # its read slot, if layer 0 was read from disk


def test_llm_takes_the_choice_from_the_override_else_the_profile(tiny_model, tmp_path, monkeypatch):
    folder, _ = tiny_model("llama_mha_bias")
    policy = Policy(gpu_batch_size=2, compress_weight=True, compress_group=32)
    monkeypatch.setenv("FLEXBATCH_INT4_FUSED_MAX_ROWS", "3")
    monkeypatch.setattr(flexbatch.profiling, "hardware_profile", lambda *a, **kw: pytest.fail("profile read"))
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path / "a") as llm:
        assert _packed_choices(llm) == {KernelChoice(3)}
    monkeypatch.delenv("FLEXBATCH_INT4_FUSED_MAX_ROWS")
    profile = cpu_profile({"float32": {1: 1e9, 2048: 2e12}, "int4": FLAT}, dequantize_params_per_s={"int4": 1e10})
    monkeypatch.setattr(flexbatch.profiling, "hardware_profile", lambda *a, **kw: profile)
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path / "b") as llm:
        assert _packed_choices(llm) == {profile.kernel_choice(torch.float32)}
        assert len(llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2, ignore_eos=True))[0].token_ids) == 2
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path / "c", kernels=KernelChoice(7)) as llm:
        assert _packed_choices(llm) == {KernelChoice(7)}


def test_a_bad_override_is_named(tiny_model, tmp_path, monkeypatch):
    folder, _ = tiny_model("llama_mha_bias")
    monkeypatch.setenv("FLEXBATCH_INT4_FUSED_MAX_ROWS", "many")
    with pytest.raises(ConfigError, match="FLEXBATCH_INT4_FUSED_MAX_ROWS"):
        LLM(folder, dtype="float32", policy=Policy(gpu_batch_size=2, compress_weight=True), offload_dir=tmp_path)
