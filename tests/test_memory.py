"""Peak resident memory, measured in a subprocess, while a model several times larger than
the memory budget runs with its weights on disk. The child resets its peak-RSS counter
(Linux /proc/self/clear_refs) after imports, so the figure covers loading and generation."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

BUDGET = 128 << 20  # bytes flexbatch may use beyond what the process holds before loading
# Measurement slack beyond the budget (the budget check already includes the engine's
# runtime overhead allowance).
OVERHEAD = 8 << 20

CHILD = textwrap.dedent("""
    import json, sys
    import torch, transformers, safetensors  # imported before the baseline, like any long-lived program
    from flexbatch import LLM, SamplingParams
    from flexbatch.config import Policy
    folder, offload, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))
    torch.ones(1) @ torch.ones(1)  # let torch set up its thread pools before the baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    baseline = status("VmRSS")
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_device=0, weights_host=0)
    # --cpu-memory is for the whole process: what it holds now plus the budget
    with LLM(folder, dtype="float32", policy=policy, offload_dir=offload, cpu_memory=baseline + budget) as llm:
        outs = llm.generate([[1, 2, 3, 4, 5, 6, 7, 8]] * 8, SamplingParams(max_new_tokens=8, ignore_eos=True))
    peak = status("VmHWM")
    print(json.dumps({"baseline": baseline, "peak": peak, "tokens": sum(len(o.token_ids) for o in outs)}))
""")


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=32,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("big")
    model.save_pretrained(folder)
    return folder, sum(p.numel() * 4 for p in model.parameters())


def test_weights_on_disk_keep_peak_rss_under_budget(big_model, tmp_path):
    folder, model_bytes = big_model
    assert model_bytes > 2.5 * BUDGET
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(tmp_path / "offload"), str(BUDGET)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["tokens"] == 64
    growth = report["peak"] - report["baseline"]
    assert growth < BUDGET + OVERHEAD, \
        f"peak RSS grew {growth / 2**20:.1f} MiB for a {model_bytes / 2**20:.0f} MiB model"


def test_gpu_memory_plan_puts_staging_and_streamed_layers_on_the_gpu(tiny_model):
    """The plan a GPU run is checked against, by hand: KV rows attended on the GPU need
    device staging for KV_IN_FLIGHT caches in flight (none with CPU attention), and layers
    streamed from host or disk need three layer copies on the GPU."""
    from flexbatch import LLM
    from flexbatch.config import Policy
    from flexbatch.sizing import KV_IN_FLIGHT, kv_bytes_per_token, layer_weight_bytes, run_memory

    llm = LLM(tiny_model("opt_pre_ln")[0], dtype="float32", device="cpu")
    cfg, family, gpu = llm.config, llm.family, torch.device("cuda")
    capacity, gbs = 64, 4
    per_layer_batch = kv_bytes_per_token(cfg, torch.float32) * capacity * gbs  # K and V of one block
    layer = layer_weight_bytes(cfg, family, torch.float32)
    for cpu_attention, staged in ((False, KV_IN_FLIGHT * per_layer_batch * 0.7), (True, 0)):
        policy = Policy(gpu_batch_size=gbs, num_gpu_batches=2, weights_device=0.25, weights_host=0.5,
                        cache_device=0.3, cache_host=0.5, cpu_attention=cpu_attention)
        plan = run_memory(cfg, family, policy, torch.float32, 8, capacity, 32, gpu)
        assert plan.device.get("KV staging buffers", 0) == pytest.approx(staged, abs=1)  # whole bytes
        assert plan.host["KV staging buffers"] == pytest.approx(KV_IN_FLIGHT * per_layer_batch * 0.2, abs=1)
        assert plan.device["streamed layer weights"] == pytest.approx(3 * layer * 0.75, abs=1)
    assert "streamed layer weights" not in run_memory(cfg, family, policy, torch.float32, 8, capacity, 32).device


def test_a_merged_plan_sums_what_both_tiers_hold_for_the_same_purpose():
    from flexbatch.sizing import MemoryPlan

    plan = MemoryPlan()
    plan.add(True, "weights", 300)
    plan.add(False, "weights", 200)
    plan.add(False, "runtime overhead", 64)
    assert plan.merged() == {"weights": 500, "runtime overhead": 64}
    assert plan.device == {"weights": 300}  # the tiers themselves are unchanged


def test_kv_layout_by_hand():
    """Which tier's sequences form a segment and where each is attended, for 1 sequence on
    the device, 2 in host RAM and 3 on disk."""
    from flexbatch.config import Policy
    from flexbatch.sizing import KVSegmentPlace as Place
    from flexbatch.sizing import kv_route
    from flexbatch.storage.tiers import Tier

    split = {Tier.DEVICE: 1, Tier.HOST: 2, Tier.DISK: 3}
    segments = lambda gpu, **switches: kv_route(Policy(**switches), gpu).segments(split)
    # a CPU-only machine: device and host are one RAM, and everything is attended there
    assert segments(False) == [Place(3, Tier.DEVICE, True), Place(3, Tier.DISK, True)]
    assert segments(False, cpu_attention=True) == segments(False)
    # a GPU: rows are copied to it, unless CPU attention keeps the plain host and disk rows on the CPU
    assert segments(True) == [Place(1, Tier.DEVICE, True), Place(2, Tier.HOST, True), Place(3, Tier.DISK, True)]
    assert segments(True, cpu_attention=True) == [
        Place(1, Tier.DEVICE, True), Place(2, Tier.HOST, False), Place(3, Tier.DISK, False)]
    # a compressed cache is decoded where it lives and attended on the GPU
    assert segments(True, cpu_attention=True, compress_cache=True) == segments(True)
    assert kv_route(Policy(), True).segments({Tier.DEVICE: 0, Tier.HOST: 4, Tier.DISK: 0}) == [
        Place(4, Tier.HOST, True)]


@pytest.mark.parametrize("compress_cache", [False, True])
def test_the_kv_buffers_a_gpu_block_allocates_are_what_its_memory_plan_counts(tiny_model, compress_cache):
    """The engine's KV buffer pools for a GPU block, summed per tier, equal the plan the
    policy is checked against: staging for plain rows attended on the GPU (host and disk
    shares), or dense decode buffers for a compressed cache (every share), KV_IN_FLIGHT
    caches of K and V each; host read buffers for the disk share (its quantized rows, and a
    compressed cache's exact window rows)."""
    from flexbatch import LLM
    from flexbatch.config import Policy
    from flexbatch.engine.kv_cache import KVFormat, buffer_needs
    from flexbatch.sizing import KV_IN_FLIGHT, kv_route, run_memory
    from flexbatch.storage.placement import split_sequences
    from flexbatch.storage.tiers import Tier

    llm = LLM(tiny_model("opt_pre_ln")[0], dtype="float32", device="cpu")
    cfg, gpu, capacity = llm.config, torch.device("cuda"), 64
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, cache_device=0.25, cache_host=0.25,
                    compress_cache=compress_cache, cache_window=8)
    split = split_sequences(4, {Tier.DEVICE: 0.25, Tier.HOST: 0.25, Tier.DISK: 0.5})
    fmt = KVFormat(cfg.num_kv_heads, cfg.head_dim, capacity, torch.float32, policy.cache_quant, policy.cache_window)
    needs = buffer_needs([kv_route(policy, True).segments(split)] * 2, fmt, gpu)
    allocated = {"cuda": 0, "cpu": 0}
    for nbytes, where, _ in needs.values():
        allocated[where.type] += 2 * KV_IN_FLIGHT * nbytes
    plan = run_memory(cfg, llm.family, policy, torch.float32, 8, capacity, 32, gpu)
    on_gpu = plan.device.get("dequantized KV in flight" if compress_cache else "KV staging buffers")
    assert allocated["cuda"] == pytest.approx(on_gpu, abs=1)
    assert allocated["cpu"] == pytest.approx(plan.host["KV staging buffers"], abs=1)


FAULTS_CHILD = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "kept":  # importing flexbatch keeps freed memory
        from flexbatch.malloc import keep_freed_memory
        assert keep_freed_memory()
    def step(keys):  # a decode step's fp32 scores and two temporaries like them: 3 x 3.75 MiB
        return [torch.ones(3, 768, keys) for _ in range(3)]
    step(407)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for keys in range(408, 428):  # the context grows by a token each step
        step(keys)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def test_a_steps_temporaries_reuse_freed_memory():
    """With keep_freed_memory (set when flexbatch is imported), temporaries of a few MiB made and freed at
    every step reuse the same pages. By default glibc maps each block a little larger than the
    last one freed on its own and unmaps it when freed, so each step faults its pages in again
    (~2,800 a step here). Minor page faults counted in subprocesses; the steps only fill memory,
    so the count does not depend on the CPU's matmul kernels."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS_CHILD, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("kept", "default")}
    assert faults["default"] > 10 * faults["kept"], faults
