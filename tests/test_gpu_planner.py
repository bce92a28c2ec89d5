"""The planner on a machine with a GPU, from a synthetic profile (runs without CUDA): each
lane of the GPU cost model against hand computation, the LP's choices against what the
rates make obviously best, monotonicity in both memory budgets, every returned policy
within both budgets, and the infeasible and missing-profile errors."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from flexbatch.config import Policy
from flexbatch.errors import ConfigError
from flexbatch.models import get_family
from flexbatch.planner import ComputeRates, GpuRates, HardwareProfile, evaluate, search
from flexbatch.planner.gpu_model import THREAD_LANES, GpuModel
from flexbatch.planner.terms import term_value
from flexbatch.sizing import GiB, MemoryBudget, run_memory

from test_planner import CFG, FAMILY, HW, WORK

GPU = GpuRates("test GPU", 80 << 30, host_to_gpu_bps=2e10, gpu_to_host_bps=1e10,
               compute=ComputeRates({"bfloat16": {1: 1e14, 8192: 1e14}}, attention_bps={"bfloat16": 1e12},
                                    kv_decode_bps=1e11, dequantize_params_per_s={"int4": 1e12}),
               cpu_attention_bps=5e9)
HW_GPU = replace(HW.profile, gpu=GPU)  # disk reads 1e9 B/s, writes 5e8
# for the planner's choices: a GPU reaches its peak only with many rows, as real ones do
RAMP = replace(HW_GPU, gpu=replace(GPU, compute=replace(GPU.compute,
                                                        matmul_flops={"bfloat16": {1: 2e11, 64: 1e13, 8192: 1e14}})))
PARAMS = 4 * (1024 * 1024 + 1024) + (4096 * 1024 + 4096) + (1024 * 4096 + 1024) + 4 * 1024
W = 2 * PARAMS  # one layer's bf16 bytes
K = 2 * 16 * 64 * 2  # one token's K and V in one layer, bf16
B, S, T = 8, 100, 100 + 11 / 2  # block, prompt, mean context over the generation
R, WR, H, G = 1e9, 5e8, 2e10, 1e10


def lane(constant, w_gpu=0.0, w_host=0.0, c_gpu=0.0, c_host=0.0) -> np.ndarray:
    return np.array([constant, w_gpu, w_host, c_gpu, c_host])


def test_gpu_lanes_by_hand():
    costs = GpuModel(HW_GPU).layer_costs(CFG, FAMILY, torch.bfloat16, Policy(gpu_batch_size=4, num_gpu_batches=2), WORK)
    # weights not on the GPU cross the link; those on disk are read first
    weight_load = lane(W / R + W / H, w_gpu=-(W / R + W / H), w_host=-W / R)
    assert costs.pre["weight_load"] == pytest.approx(weight_load)
    assert costs.gen["weight_load"] == pytest.approx(weight_load)
    prompt_store = B * S * K
    assert costs.pre["cache_store"] == pytest.approx(
        lane(prompt_store * (1 / G + 1 / WR), c_gpu=-prompt_store * (1 / G + 1 / WR), c_host=-prompt_store / WR))
    assert costs.pre["compute"] == pytest.approx(lane(B * S * 2 * PARAMS / 1e14 + B * 2 * S * S * 1024 / 1e14))
    # decode: the off-GPU cache is copied in every step and the new token's rows go back
    context = B * T * K
    assert costs.gen["cache_load"] == pytest.approx(
        lane(context * (1 / R + 1 / H), c_gpu=-context * (1 / R + 1 / H), c_host=-context / R))
    assert costs.gen["compute"] == pytest.approx(lane(B * 2 * PARAMS / 1e14 + context / 1e12))
    disk_cache = context / R + B * K / WR
    assert costs.gen["disk"] == pytest.approx(lane(W / R + disk_cache, w_gpu=-W / R, w_host=-W / R,
                                                   c_gpu=-disk_cache, c_host=-disk_cache))
    assert costs.gen["host_to_gpu"] == pytest.approx(lane(W / H + context / H, w_gpu=-W / H, c_gpu=-context / H))
    assert costs.gen["gpu_to_host"] == pytest.approx(lane(B * K / G, c_gpu=-B * K / G))


def test_compressed_cache_lanes_by_hand():
    """A 4-bit cache with a 32-token dense window, on disk and read at decode's own KV rate:
    the bytes moved are the quantized rows plus the window, as the CPU model counts them."""
    hw = replace(HW_GPU, disk=replace(HW_GPU.disk, kv_read_busy_bps=4e8))
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, compress_cache=True, cache_window=32)
    costs = GpuModel(hw).layer_costs(CFG, FAMILY, torch.bfloat16, policy, WORK)
    kq = 2 * 16 * (64 * 4 // 8 + 2 + 2)  # K and V of a token: 4-bit levels, then a bf16 minimum and step per head
    stored = lambda tokens: tokens * kq + 32 * K  # every token quantized, and the last 32 dense too
    prompt_store = B * stored(S)
    assert costs.pre["cache_store"] == pytest.approx(
        lane(prompt_store * (1 / G + 1 / WR), c_gpu=-prompt_store * (1 / G + 1 / WR), c_host=-prompt_store / WR))
    disk_cache = B * stored(T) / 4e8 + B * (kq + K) / WR  # read the prefix, append a row to both
    assert costs.gen["disk"] == pytest.approx(lane(W / R + disk_cache, w_gpu=-W / R, w_host=-W / R,
                                                   c_gpu=-disk_cache, c_host=-disk_cache))
    dense = B * T * K  # decoded, the window taken as it is, then attended dense on the GPU
    decoded = B * (T - 32) * K
    cpu_decode = HW_GPU.cpu.kv_decode_bps
    assert costs.gen["cache_load"] == pytest.approx(lane(
        B * stored(T) / 4e8 + dense / H + decoded / cpu_decode, c_gpu=-B * stored(T) / 4e8 - dense / H
        + decoded / 1e11 - decoded / cpu_decode, c_host=-B * stored(T) / 4e8))


def test_cpu_attention_lanes_by_hand():
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, cpu_attention=True)
    costs = GpuModel(HW_GPU).layer_costs(CFG, FAMILY, torch.bfloat16, policy, WORK)
    context = B * T * K
    # only the disk part is read, into host RAM, where the CPU attends over it with the host part
    assert costs.gen["cache_load"] == pytest.approx(lane(context / R, c_gpu=-context / R, c_host=-context / R))
    queries = B * 1024 * 2 * (1 / H + 1 / G)  # queries out, attention outputs back, for the off-GPU share
    attention_off_gpu = context / 5e9 + queries
    assert costs.gen["compute"] == pytest.approx(
        lane(B * 2 * PARAMS / 1e14 + attention_off_gpu, c_gpu=context / 1e12 - attention_off_gpu))
    assert costs.gen["host_to_gpu"] == pytest.approx(lane(W / H + B * 1024 * 2 / H, w_gpu=-W / H,
                                                          c_gpu=-B * 1024 * 2 / H))


@pytest.mark.parametrize("overlap", [True, False])
def test_block_time_is_the_longest_lane_or_the_threads_in_sequence(overlap):
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_device=0.25, weights_host=0.5, cache_device=0.5,
                    cache_host=0.25, overlap=overlap)
    costs = GpuModel(HW_GPU).layer_costs(CFG, FAMILY, torch.bfloat16, policy, WORK)
    x = (0.25, 0.5, 0.5, 0.25)
    layer = lambda terms: (max(term_value(t, x) for t in terms.values()) if overlap
                           else sum(term_value(terms[name], x) for name in THREAD_LANES))
    head = B * 11 * 2 * 1000 * 1024 / 1e14
    c = evaluate(CFG, FAMILY, torch.bfloat16, GpuModel(HW_GPU), policy, WORK)
    assert c.prefill_seconds == pytest.approx(8 * layer(costs.pre))
    assert c.decode_seconds == pytest.approx(8 * 10 * layer(costs.gen) + head)
    assert c.throughput == pytest.approx(B * 11 / (c.prefill_seconds + c.decode_seconds))


def gpu_budget(gpu_gib: float, host_gib: float = 64) -> MemoryBudget:
    return MemoryBudget(device_bytes=int(gpu_gib * GiB), host_bytes=int(host_gib * GiB))


def plan(budget: MemoryBudget, hw: HardwareProfile = RAMP, **kwargs):
    return search(CFG, FAMILY, torch.bfloat16, GpuModel(hw), WORK, budget, max_block=256, **kwargs)


def test_a_model_that_fits_stays_on_the_gpu():
    p = plan(gpu_budget(16)).best.policy
    assert (p.weights_device, p.cache_device) == (pytest.approx(1.0, abs=1e-5), pytest.approx(1.0, abs=1e-5))


def test_weights_that_do_not_fit_go_to_host_ram_before_disk():
    # ~200 MB of weights; 0.12 GiB of GPU memory holds about half with a small block
    roomy_host = plan(gpu_budget(0.12)).best.policy
    assert roomy_host.weights_device < 0.9
    assert roomy_host.weights_disk == pytest.approx(0.0, abs=1e-5)  # the link is 20x the disk
    tight_host = plan(gpu_budget(0.12, host_gib=0.15)).best.policy
    assert tight_host.weights_disk > 0.1


def test_cpu_attention_is_chosen_when_the_cpu_attends_faster_than_the_link_copies():
    budget = gpu_budget(0.3)  # the weights fit; the cache of a large block does not
    slow_link = replace(RAMP.gpu, host_to_gpu_bps=1e9)
    fast_cpu = plan(budget, replace(RAMP, gpu=replace(slow_link, cpu_attention_bps=1e12))).best.policy
    slow_cpu = plan(budget, replace(RAMP, gpu=replace(slow_link, cpu_attention_bps=1e8))).best.policy
    assert fast_cpu.cpu_attention and fast_cpu.cache_device < 1
    assert not slow_cpu.cpu_attention


@pytest.mark.parametrize("tier", ["gpu", "host"])
def test_more_memory_on_either_tier_never_predicts_less_throughput(tier):
    sizes = (0.1, 0.15, 0.25, 0.5, 1.0, 4.0)
    budgets = [gpu_budget(0.12, g) if tier == "host" else gpu_budget(g) for g in sizes]
    throughputs = [plan(b).best.throughput for b in budgets]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(throughputs, throughputs[1:]))
    assert throughputs[-1] > throughputs[0]


@pytest.mark.parametrize("gpu_gib,host_gib", [(0.1, 0.2), (0.15, 64), (0.5, 0.3), (4, 64)])
def test_every_returned_gpu_policy_fits_both_budgets(gpu_gib, host_gib):
    budget = gpu_budget(gpu_gib, host_gib)
    result = plan(budget)
    for c in [result.best, *result.runners_up]:
        p = c.policy
        memory = run_memory(CFG, FAMILY, p, torch.bfloat16, p.block_size, WORK.prompt_len + WORK.gen_len,
                            WORK.prompt_len, torch.device("cuda"))
        memory.check(budget, unified=False, hint="")  # raises if either tier is over
        assert c.throughput >= best_on_grid(p, budget) * (1 - 1e-3)


def best_on_grid(policy: Policy, limit: MemoryBudget, step: float = 0.25) -> float:
    """Independent of the LP: the best predicted throughput of `policy`'s block shape and
    cache variant (all on the GPU, or free to leave it) over a grid of the four placement
    fractions, among placements that fit both budgets."""
    grid = [i * step for i in range(round(1 / step) + 1)]
    pairs = [(a, b) for a in grid for b in grid if a + b <= 1]
    cache_pairs = [(1.0, 0.0)] if policy.cache_device == 1 else pairs
    best = 0.0
    for w_gpu, w_host in pairs:
        for c_gpu, c_host in cache_pairs:
            p = replace(policy, weights_device=w_gpu, weights_host=w_host, cache_device=c_gpu, cache_host=c_host)
            candidate = evaluate(CFG, FAMILY, torch.bfloat16, GpuModel(RAMP), p, WORK)
            try:
                candidate.memory.check(limit, unified=False, hint="")
            except ConfigError:
                continue
            best = max(best, candidate.throughput)
    return best


def test_compressed_cache_plans_without_cpu_attention():
    result = plan(gpu_budget(0.15), compression={"compress_cache": True})
    assert all(c.policy.compress_cache and not c.policy.cpu_attention for c in [result.best, *result.runners_up])


def test_too_little_gpu_memory_says_how_much_is_missing():
    with pytest.raises(ConfigError, match=r"no policy fits.*GiB of GPU memory.*GiB short.*--gpu-memory"):
        plan(gpu_budget(0.001))


def test_planning_for_a_gpu_needs_its_measurements():
    with pytest.raises(ConfigError, match="no GPU measurements.*flexbatch profile --force"):
        GpuModel(HW.profile)


def test_gpu_rates_survive_the_profile_cache():
    assert HardwareProfile.from_json(json.loads(json.dumps(HW_GPU.to_json()))) == HW_GPU


@pytest.mark.parametrize("cache,ops", [("gpu", 0.1), ("host", 0.1 + 0.2), ("host_cpu_attention", 0.1 + 0.5)])
def test_each_gpu_batch_operation_adds_its_measured_time_to_compute(cache, ops):
    measured = {"compute": 0.1, "cache_load": 0.2, "cpu_attention": 0.5}  # large: compute becomes the longest lane
    hw = replace(HW_GPU, gpu=replace(GPU, op_seconds=measured))
    placement = {"gpu": {}, "host": dict(cache_device=0, cache_host=1),
                 "host_cpu_attention": dict(cache_device=0, cache_host=1, cpu_attention=True)}[cache]
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, **placement)
    plain = GpuModel(HW_GPU).layer_costs(CFG, FAMILY, torch.bfloat16, policy, WORK)  # no per-operation time
    x = GpuModel(HW_GPU).placement(policy)
    predicted = evaluate(CFG, FAMILY, torch.bfloat16, GpuModel(hw), policy, WORK)
    head = B * 11 * 2 * 1000 * 1024 / 1e14
    # per layer: prefill pays the compute operations of 2 GPU batches, each decode step all of them
    assert predicted.prefill_seconds == pytest.approx(8 * (term_value(plain.pre["compute"], x) + 2 * 0.1))
    assert predicted.decode_seconds == pytest.approx(8 * 10 * (term_value(plain.gen["compute"], x) + 2 * ops) + head)


def test_costly_operations_steer_the_planner_to_fewer_gpu_batches():
    def gpu_batches(per_op: float) -> int:
        hw = replace(RAMP, gpu=replace(RAMP.gpu, op_seconds={"compute": per_op, "cache_load": per_op}))
        return plan(gpu_budget(0.15), hw).best.policy.num_gpu_batches

    assert gpu_batches(0.0) > gpu_batches(1e-2)


def test_the_engine_probe_runs_the_engine_on_a_model_it_makes():
    from flexbatch.models.spec import config_from_hf_dict
    from flexbatch.profiling.engine_probe import TINY, RandomSource, operation_seconds
    from flexbatch.weights.loader import resolve_names

    cfg = config_from_hf_dict(TINY)
    assert set(resolve_names(cfg, FAMILY, RandomSource(cfg)).values()) == RandomSource(cfg).names()
    seconds = operation_seconds(torch.device("cpu"))
    assert set(seconds) == {"compute", "cache_load", "cpu_attention"}
    assert 0 < seconds["compute"] < 0.1 and all(0 <= v < 0.1 for v in seconds.values())


def test_a_probe_can_run_while_other_work_repeats():
    import time

    from flexbatch.profiling.gpu import while_repeating

    calls = []
    result = while_repeating(lambda: time.sleep(0.2) or "measured", lambda: calls.append(time.sleep(0.01)))
    count = len(calls)
    time.sleep(0.05)
    assert result == "measured" and count >= 5 and len(calls) == count  # it ran meanwhile, and stopped after


def test_flexbatch_plan_on_a_gpu_plans_within_the_gpu_budget(tiny_model, tmp_path, monkeypatch, capsys):
    """The CLI path on a (pretended) GPU: the GPU budget reaches the search, which plans with
    the profile's GPU rates, and the written policy fits the GPU budget."""
    import flexbatch.devices
    import flexbatch.profiling
    from flexbatch.cli.main import main
    from flexbatch.weights.source import open_model

    folder, _ = tiny_model("llama_gqa_tied_llama3")
    cfg = open_model(folder).config
    monkeypatch.setattr(flexbatch.devices, "pick_device", lambda name="auto": torch.device("cuda"))
    monkeypatch.setattr(flexbatch.profiling, "hardware_profile", lambda *a, **kw: RAMP)

    def planned(gpu_memory: str) -> Policy:
        out = tmp_path / f"{gpu_memory}.json"
        assert main(["plan", "--model", str(folder), "--dtype", "bfloat16", "--prompt-len", "64", "--gen-len", "16",
                     "--gpu-memory", gpu_memory, "--write-policy", str(out)]) == 0
        return Policy(**json.loads(out.read_text()))

    small, large = planned("1MiB"), planned("64MiB")
    printed = capsys.readouterr().out
    assert "% GPU" in printed and "GPU memory of the chosen policy" in printed
    memory = run_memory(cfg, get_family(cfg), small, torch.bfloat16, small.block_size, 80, 64, torch.device("cuda"))
    assert sum(memory.device.values()) <= 1 << 20
    assert small.block_size < large.block_size  # the budget binds
