"""The GPU paths: every tier placement on a CUDA device gives exactly the tokens of the run
with everything on the GPU; copies on side streams are ordered against compute; pinned
staging buffers are page-aligned for O_DIRECT. Skipped on machines without CUDA."""
from __future__ import annotations

import json

import pytest
import torch

from flexbatch import LLM, SamplingParams
from flexbatch.config import Policy
from flexbatch.engine.streams import CopyStreams
from flexbatch.storage.aligned import ALIGN, aligned_bytes
from flexbatch.storage.disk import DiskFile

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[5, 6, 7], list(range(10, 31)), [200], [3, 1, 4, 1, 5, 9, 2, 6, 5], [77, 78], list(range(40, 52)), [9, 9]]
PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)
OFF = dict(weights_device=0, weights_host=0)

POLICIES = {
    "weights_host_and_disk": Policy(gpu_batch_size=4, num_gpu_batches=2, weights_device=0.2, weights_host=0.5),
    "weights_disk_cache_disk": Policy(gpu_batch_size=4, num_gpu_batches=2, **OFF, cache_device=0, cache_host=0),
    "cache_host_gpu_attention": Policy(gpu_batch_size=4, num_gpu_batches=2, cache_device=0, cache_host=1),
    "cache_host_cpu_attention": Policy(gpu_batch_size=4, num_gpu_batches=2, cache_device=0, cache_host=1,
                                       cpu_attention=True),
    "cache_disk_cpu_attention": Policy(gpu_batch_size=3, num_gpu_batches=3, **OFF, cache_device=0, cache_host=0,
                                       cpu_attention=True),
    "mixed_three_tiers": Policy(gpu_batch_size=4, num_gpu_batches=2, weights_device=0.3, weights_host=0.3,
                                cache_device=0.3, cache_host=0.4),
    "mixed_cpu_attention_sequential": Policy(gpu_batch_size=4, num_gpu_batches=2, weights_device=0, weights_host=0.5,
                                             cache_device=0.3, cache_host=0.4, cpu_attention=True, overlap=False),
    "one_sequence_batches_pinned_off": Policy(gpu_batch_size=1, num_gpu_batches=4, weights_device=0, weights_host=0.6,
                                              cache_device=0, cache_host=0.5, pin_weights=False),
}


def on_gpu_tokens(folder, **compression):
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, **compression)
    with LLM(folder, dtype="float32", device="cuda", policy=policy) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("kind", ["opt_pre_ln", "llama_gqa_tied_llama3"])
def test_gpu_offloaded_tokens_equal_all_on_gpu(tiny_model, tmp_path, kind, policy_name):
    folder, _ = tiny_model(kind)
    with LLM(folder, dtype="float32", device="cuda", policy=POLICIES[policy_name], offload_dir=tmp_path) as llm:
        got = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    assert got == on_gpu_tokens(folder)


def test_gpu_matches_cpu(tiny_model, tmp_path):
    folder, _ = tiny_model("llama_gqa_tied_llama3")
    cpu = [o.token_ids for o in LLM(folder, dtype="float32", device="cpu").generate(PROMPTS, PARAMS)]
    assert on_gpu_tokens(folder) == cpu


@pytest.mark.parametrize("cache", [(1.0, 0.0), (0.0, 0.0), (0.0, 1.0), (0.3, 0.4)],
                         ids=["gpu", "disk", "host", "mixed"])
def test_gpu_compressed_placements_equal_compressed_on_gpu(tiny_model, tmp_path, cache):
    folder, _ = tiny_model("opt_pre_ln")
    compression = dict(compress_weight=True, compress_cache=True, compress_group=32)
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_device=0, weights_host=0.5,
                    cache_device=cache[0], cache_host=cache[1], **compression)
    with LLM(folder, dtype="float32", device="cuda", policy=policy, offload_dir=tmp_path) as llm:
        got = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    assert got == on_gpu_tokens(folder, **compression)


def test_store_waits_for_the_compute_that_wrote_it():
    device = torch.device("cuda")
    streams = CopyStreams(device)
    a = torch.randn(4096, 4096, device=device)
    result = torch.zeros(4096, 4096, device=device)
    host = torch.empty(4096, 4096, pin_memory=True)
    for _ in range(8):  # queue enough work that an unordered copy would see zeros
        torch.matmul(a, a, out=result)
    streams.run(lambda: host.copy_(result), after=streams.mark())
    assert torch.equal(host, (a @ a).cpu())


def test_pinned_staging_is_page_aligned_and_reads_o_direct(tmp_path):
    buf = aligned_bytes(3 * ALIGN + 5, pinned=True)
    assert buf.is_pinned() and buf.data_ptr() % ALIGN == 0 and buf.numel() == 4 * ALIGN
    data = aligned_bytes(buf.numel())
    data.copy_(torch.arange(buf.numel()).to(torch.uint8))
    f = DiskFile(tmp_path / "x", buf.numel())
    f.write_from(data, 0, buf.numel())
    f.read_into(buf, 0, buf.numel())
    assert torch.equal(buf, data)


def test_profile_measures_the_gpu():
    from flexbatch.planner import ComputeRates, DiskRates, HardwareProfile
    from flexbatch.profiling.gpu import measure_gpu

    gpu = measure_gpu()
    assert 1e9 < gpu.host_to_gpu_bps < 1e12 and 1e9 < gpu.gpu_to_host_bps < 1e12  # PCIe 3 x16 to NVLink-C2C
    assert gpu.memory_bytes == torch.cuda.get_device_properties(0).total_memory
    (table,) = gpu.compute.matmul_flops.values()  # in the GPU's compute dtype
    assert 1e12 < table[8192] < 1e16 and table[1] < table[8192]  # a GPU needs rows to reach its peak
    rates = gpu.compute
    (attention,) = rates.attention_bps.values()  # in the GPU's compute dtype
    assert attention > 1e10 and rates.kv_decode_bps > 1e9 and rates.dequantize_params_per_s["int4"] > 1e9
    assert 1e8 < gpu.cpu_attention_bps < attention  # the CPU, over host rows, while the link streams
    assert set(gpu.op_seconds) == {"compute", "cache_load", "cpu_attention"} and 0 < gpu.op_seconds["compute"] < 0.1
    profile = HardwareProfile("t", 1, ComputeRates({"float32": {1: 1.0}}), DiskRates(1e9, 1e9), gpu)
    assert HardwareProfile.from_json(json.loads(json.dumps(profile.to_json()))) == profile


def test_gpu_peak_memory_is_within_the_memory_plan(tmp_path):
    """The GPU memory a block takes at its peak, its admission included, is at most what its
    memory plan counts (the plan the budget check and the planner trust). A 128-row block of
    an OPT-125m-shaped model in bf16, weights and KV cache in host RAM."""
    from transformers import AutoModelForCausalLM, OPTConfig

    from flexbatch.sizing import run_memory

    cfg = OPTConfig(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=4, num_attention_heads=12,
                    max_position_embeddings=2048)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path / "model")
    policy = Policy(gpu_batch_size=32, num_gpu_batches=4, weights_device=0, weights_host=1, cache_device=0,
                    cache_host=1)
    prompts = torch.randint(10, 50000, (128, 128), generator=torch.Generator().manual_seed(0)).tolist()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with LLM(tmp_path / "model", dtype="bfloat16", device="cuda", policy=policy, offload_dir=tmp_path / "off") as llm:
        llm.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
        plan = run_memory(llm.config, llm.family, policy, llm.dtype, 128, 128 + 8, 128, llm.device)
    peak, planned = torch.cuda.max_memory_allocated() - before, sum(plan.device.values())
    assert peak <= planned, f"peak {peak / 2**20:.0f} MiB, planned {planned / 2**20:.0f} MiB: {plan.device}"
