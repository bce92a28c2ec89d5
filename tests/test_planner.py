"""The planner: cost model terms against hand computation, monotonicity in memory, every
returned policy within the budget, infeasible budgets refused, and the plan's memory
prediction holding for a real run (peak RSS in a subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from flexbatch.config import Policy
from flexbatch.devices import default_dtype
from flexbatch.errors import ConfigError
from flexbatch.models import get_family
from flexbatch.models.spec import config_from_hf_dict
from flexbatch.planner import ComputeRates, DiskRates, HardwareProfile, Workload, evaluate, search
from flexbatch.planner.cpu_model import CpuModel
from flexbatch.planner.terms import term_value
from flexbatch.sizing import CACHES_READ_AHEAD, MemoryBudget, run_memory

FLAT = {r: 1e12 for r in (1, 2048)}


def profile(flops, read=1e9, write=5e8, busy=None, share=1.0, gpu=None, memory=1 << 34, kv_read_busy_bps=None,
            **cpu) -> HardwareProfile:
    """A hardware profile with the given rates (CPU fields by name: attention_bps, ...)."""
    disk = DiskRates(read, write, busy, share, kv_read_busy_bps)
    return HardwareProfile("test", memory, ComputeRates(flops, **cpu), disk, gpu)


HW = CpuModel(profile({"bfloat16": FLAT, "float32": FLAT}, attention_bps={"bfloat16": 1e10}, kv_decode_bps=2e9))
# an OPT-style model: hidden 1024, 8 layers
CFG = config_from_hf_dict({"model_type": "opt", "vocab_size": 1000, "hidden_size": 1024, "ffn_dim": 4096,
                           "num_hidden_layers": 8, "num_attention_heads": 16, "max_position_embeddings": 2048})
FAMILY = get_family(CFG)
WORK = Workload(prompt_len=100, gen_len=11)


def test_layer_costs_by_hand():
    costs = HW.layer_costs(CFG, FAMILY, torch.bfloat16, Policy(gpu_batch_size=4, num_gpu_batches=2), WORK)
    # q, k, v, out (with biases), fc1, fc2 (with biases), two LayerNorms (weight + bias)
    params = 4 * (1024 * 1024 + 1024) + (4096 * 1024 + 4096) + (1024 * 4096 + 1024) + 4 * 1024
    weight_bytes = 2 * params
    kv = 2 * 16 * 64 * 2  # K and V, 16 heads x 64 dims, bf16
    batch, s, t = 8, 100, 100 + 11 / 2
    assert costs.pre["io"][0] == pytest.approx(weight_bytes / 1e9 + batch * s * kv / 5e8)
    assert costs.pre["io"][1] == pytest.approx(-weight_bytes / 1e9)  # all weights in memory: no weight reads
    assert costs.gen["io"][0] == pytest.approx(weight_bytes / 1e9 + batch * t * kv / 1e9 + batch * kv / 5e8)
    prefill = batch * s * 2 * params / 1e12 + batch * 2 * s * s * 1024 / 1e12
    assert costs.pre["compute"] == pytest.approx((prefill, 0, 0))
    # decode attention reads the whole cache at the measured attention rate
    assert costs.gen["compute"] == pytest.approx((batch * 2 * params / 1e12 + batch * t * kv / 1e10, 0, 0))



def test_decode_attention_is_priced_at_the_rate_measured_in_the_runs_dtype():
    """A CPU without fast bf16 (AVX2 only: bf16 attention measured at 0.86 GB/s, fp32 at 7.6):
    an fp32 run's decode attention costs its K and V bytes at the fp32 rate, a bf16 run's at
    the bf16 rate, by hand. Priced at the bf16 rate, an fp32 run's attention was 9x too slow
    and its decode step predicted 24 s where it took 19."""
    hw = CpuModel(profile({"bfloat16": FLAT, "float32": FLAT}, attention_bps={"bfloat16": 1e9, "float32": 8e9}))
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2)
    batch, t = 8, 100 + 11 / 2
    for dtype, rate in ((torch.float32, 8e9), (torch.bfloat16, 1e9)):
        kv = 2 * 16 * 64 * dtype.itemsize  # K and V, 16 heads x 64 dims
        params = 4 * (1024 * 1024 + 1024) + (4096 * 1024 + 4096) + (1024 * 4096 + 1024) + 4 * 1024
        costs = hw.layer_costs(CFG, FAMILY, dtype, policy, WORK)
        assert costs.gen["compute"][0] == pytest.approx(batch * 2 * params / 1e12 + batch * t * kv / rate)


def test_decode_matmuls_are_priced_at_the_whole_blocks_rows():
    """A decode step multiplies all the block's rows by each weight at once (the engine's
    BlockDecodeStep), so its matmuls cost their FLOPs at the rate measured at B rows, not at
    a GPU batch's: here 4 x 2 sequences, a matmul of 4 rows at 1e11 FLOP/s, of 8 at 4e11
    (fp32 [2048 x 8192] on 2 AVX2 cores: 31 GFLOP/s at 32 rows, 85 at 256)."""
    rows_rates = {1: 2.5e10, 4: 1e11, 8: 4e11, 2048: 4e11}
    hw = CpuModel(profile({"bfloat16": rows_rates}, attention_bps={"bfloat16": 1e10}))
    costs = hw.layer_costs(CFG, FAMILY, torch.bfloat16, Policy(gpu_batch_size=4, num_gpu_batches=2), WORK)
    params = 4 * (1024 * 1024 + 1024) + (4096 * 1024 + 4096) + (1024 * 4096 + 1024) + 4 * 1024
    batch, t, kv = 8, 100 + 11 / 2, 2 * 16 * 64 * 2
    assert costs.gen["compute"][0] == pytest.approx(batch * 2 * params / 4e11 + batch * t * kv / 1e10)


def test_a_decode_step_reads_caches_behind_attention_beyond_the_first_few():
    """A decode step over 8 GPU batches of 1 (weights and cache on disk): the first
    a = CACHES_READ_AHEAD caches are read during the matmuls; each later one once attention
    reaches the one a before it. By hand: matmuls 1 s (1.6e10 FLOPs at 1.6e10), attention
    0.4 s, cache reads 2 s (1e9 B/s), weights 0.5 s, 80% of matmul speed left while reading:
    the window is 1 + 0.4 a / 8 + 0.2 x (0.5 + 2 a / 8) + (8 - a) / 8 x 2 (2.65 s at a = 3),
    longer than the reads (2.5 s plus the write) and compute (1.4 + 0.2 x 2.5). A step of
    no more GPU batches than it reads ahead reads them all during the matmuls."""
    params = 4 * (1024 * 1024 + 1024) + (4096 * 1024 + 4096) + (1024 * 4096 + 1024) + 4 * 1024
    batch, t, kv, a = 8, 100 + 11 / 2, 2 * 16 * 64 * 2, CACHES_READ_AHEAD
    flops = batch * 2 * params  # a decode step's matmuls, one layer
    cache_bytes = batch * t * kv
    hw = CpuModel(profile({"bfloat16": {1: flops, 2048: flops}}, read=2 * params / 0.5, write=1e12,
                          kv_read_busy_bps=cache_bytes / 2, share=0.8, attention_bps={"bfloat16": cache_bytes / 0.4}))
    disk = Policy(gpu_batch_size=1, num_gpu_batches=8, weights_device=0, cache_device=0)
    x = CpuModel.placement(hw, disk)
    gen = hw.layer_costs(CFG, FAMILY, torch.bfloat16, disk, WORK).gen
    window = 1 + 0.4 * a / 8 + 0.2 * (0.5 + 2 * a / 8) + (8 - a) / 8 * 2
    assert term_value(gen["attention_window"], x) == pytest.approx(window)
    assert max(term_value(lane, x) for lane in gen.values()) == pytest.approx(max(window, 2.5 + batch * kv / 1e12))
    few = replace(disk, gpu_batch_size=batch // a, num_gpu_batches=a)
    assert "attention_window" not in hw.layer_costs(CFG, FAMILY, torch.bfloat16, few, WORK).gen


def test_a_shared_prefix_is_prefilled_once_per_block():
    """Prompts of 100 tokens whose first 60 all share: an admission computes those once for
    the block, and each sequence's own 40, which attend to the 60 and causally to each
    other, at the measured attention rate. Every row still holds the prefix's keys and
    values, so what is stored is unchanged; the offloading runner reads every row's copy in
    decode, while in memory a step reads each row's own 40 + 5.5 tokens and attends to the
    prefix once, as many-query attention."""
    hw = CpuModel(profile({"bfloat16": FLAT, "float32": FLAT}, attention_bps={"bfloat16": 1e10}, kv_decode_bps=2e9,
                          prompt_attention_flops=2.5e11))
    in_memory = Policy(gpu_batch_size=4, num_gpu_batches=2)
    offloaded = replace(in_memory, weights_device=0.5)
    work = replace(WORK, shared_prefix=60)
    params = 4 * (1024 * 1024 + 1024) + (4096 * 1024 + 4096) + (1024 * 4096 + 1024) + 4 * 1024
    kv = 2 * 16 * 64 * 2
    batch, own, prefix, t = 8, 40, 60, 100 + 11 / 2
    attention_flop = batch * 4 * own * (prefix + own / 2) * 1024 + 4 * prefix * (prefix / 2) * 1024
    prefill = (batch * own + prefix) * 2 * params / 1e12 + attention_flop / 2.5e11
    for policy in (in_memory, offloaded):
        shared = hw.layer_costs(CFG, FAMILY, torch.bfloat16, policy, work)
        plain = hw.layer_costs(CFG, FAMILY, torch.bfloat16, policy, WORK)
        assert shared.pre["compute"] == pytest.approx((prefill, 0, 0))
        assert shared.pre["io"] == pytest.approx(plain.pre["io"])
        assert shared.gen["io"] == pytest.approx(plain.gen["io"])
    assert shared.gen["compute"] == pytest.approx(plain.gen["compute"])  # the offloading runner
    decode = batch * 2 * params / 1e12 + batch * (t - prefix) * kv / 1e10 + batch * 4 * prefix * 1024 / 2.5e11
    in_memory_costs = hw.layer_costs(CFG, FAMILY, torch.bfloat16, in_memory, work)
    assert in_memory_costs.gen["compute"] == pytest.approx((decode, 0, 0))


def test_prompts_of_many_lengths_are_priced_as_each_runner_computes_them():
    """Prompts of up to 100 tokens of which the in-memory runner computes 40 a sequence (its
    groups start where their longest prompt does), while the offloading runner pads an
    admission to its longest prompt: prefill is priced at 40 and 100 tokens; decode
    attention reads the 40 a row holds in both (the C kernel reads only the keys a row
    holds); the KV cache and what moves to and from disk stay sized for 100."""
    in_memory = Policy(gpu_batch_size=4, num_gpu_batches=2)
    offloaded = replace(in_memory, weights_device=0.5, cache_device=0.5)
    grouped = replace(WORK, grouped_prompt_len=40)
    params = 4 * (1024 * 1024 + 1024) + (4096 * 1024 + 4096) + (1024 * 4096 + 1024) + 4 * 1024
    kv = 2 * 16 * 64 * 2
    batch, t = 8, 40 + 11 / 2
    for policy, s in ((in_memory, 40), (offloaded, 100)):
        spread, plain = (HW.layer_costs(CFG, FAMILY, torch.bfloat16, policy, work) for work in (grouped, WORK))
        prefill = batch * s * 2 * params / 1e12 + batch * 2 * s * s * 1024 / 1e12  # weights, then causal attention
        assert spread.pre["compute"] == pytest.approx((prefill, 0, 0))
        assert spread.gen["compute"] == pytest.approx((batch * 2 * params / 1e12 + batch * t * kv / 1e10, 0, 0))
        for phase in ("pre", "gen"):
            assert getattr(spread, phase)["io"] == pytest.approx(getattr(plain, phase)["io"])
        sized = [evaluate(CFG, FAMILY, torch.bfloat16, HW, policy, work).memory for work in (grouped, WORK)]
        assert sized[0] == sized[1]


def test_the_prompt_tokens_the_in_memory_runner_computes():
    """64 prompts of 100 tokens and 64 of 10 join together: laid out longest first, in groups
    of at most 4096 computed tokens each computed from its longest prompt's start, they are
    rows 0-39 (40 x 100), 40-79 (24 long and 16 short, all 100 wide) and 80-127 (48 x 10)."""
    from flexbatch.engine.runner import PREFILL_TOKENS
    from flexbatch.prepare import grouped_prompt_tokens

    assert PREFILL_TOKENS == 4096
    prompts = [[5] * 10, [6] * 100] * 64
    assert grouped_prompt_tokens(prompts, 0) == pytest.approx((40 * 100 + 40 * 100 + 48 * 10) / 128)
    prefixed = [[1] * 20 + p for p in prompts]  # a shared prefix is counted once a sequence, as computed
    assert grouped_prompt_tokens(prefixed, 20) == pytest.approx(20 + (40 * 100 + 40 * 100 + 48 * 10) / 128)


def test_the_prompt_shape_the_planner_is_told():
    """The longest prompt, the prefix every prompt shares, as the engine computes it once (at
    least MIN_SHARED_PREFIX tokens, by two or more prompts, each keeping one of its own), and
    the tokens per prompt the in-memory runner computes."""
    from flexbatch.engine.generation import MIN_SHARED_PREFIX
    from flexbatch.prepare import MIN_PROMPT_TOKENS, prompt_shape

    by_bytes = lambda text: {"input_ids": list(text.encode())}  # a byte-level tokenizer for text prompts
    prefix = list(range(1, 21))
    rows = [prefix + [30, 31, 32], prefix + [40], prefix + [50] * 80]
    assert prompt_shape(by_bytes, rows, limit=1000) == (100, 20, 100)  # one group, as wide as the longest
    assert prompt_shape(by_bytes, [*rows, prefix], limit=1000)[:2] == (100, 19)  # one keeps its last token
    assert prompt_shape(by_bytes, [*rows, [7] * 500], limit=400) == (100, 20, 100)  # refused later: not counted
    assert prompt_shape(by_bytes, [*rows, "some text"], limit=1000)[:2] == (100, 0)  # shares nothing
    for kept in (MIN_SHARED_PREFIX - 1, MIN_SHARED_PREFIX):  # of the 20 shared tokens
        trimmed = [r[20 - kept:] for r in rows]
        assert prompt_shape(by_bytes, trimmed, limit=1000)[1] == (0 if kept < MIN_SHARED_PREFIX else kept)
    assert prompt_shape(by_bytes, rows[:1], limit=1000) == (MIN_PROMPT_TOKENS, 0, 23)  # one shares nothing


def test_overlapped_io_slows_compute_by_the_measured_share():
    hw = CpuModel(profile({"bfloat16": FLAT, "float32": FLAT}, share=0.75, attention_bps={"bfloat16": 1e10}))
    costs = hw.layer_costs(CFG, FAMILY, torch.bfloat16, Policy(gpu_batch_size=4, num_gpu_batches=2), WORK)
    alone = HW.layer_costs(CFG, FAMILY, torch.bfloat16, Policy(gpu_batch_size=4, num_gpu_batches=2), WORK)
    for comp, comp_alone, io in ((costs.pre["compute"], alone.pre["compute"], costs.pre["io"]),
                                 (costs.gen["compute"], alone.gen["compute"], costs.gen["io"])):
        # a quarter of every overlapped I/O second is taken from the matmuls
        assert comp == pytest.approx((comp_alone[0] + 0.25 * io[0], 0.25 * io[1], 0.25 * io[2]))
    sequential = hw.layer_costs(CFG, FAMILY, torch.bfloat16, Policy(gpu_batch_size=4, num_gpu_batches=2,
                                                                     overlap=False), WORK)
    assert sequential.gen["compute"] == pytest.approx(alone.gen["compute"])


@pytest.mark.parametrize("overlap", [True, False])
def test_overlapped_reads_use_the_busy_disk_rate(overlap):
    hw = CpuModel(profile({"bfloat16": FLAT, "float32": FLAT}, busy=4e8))
    costs = hw.layer_costs(CFG, FAMILY, torch.bfloat16, Policy(gpu_batch_size=4, overlap=overlap), WORK)
    weight_bytes = -costs.gen["io"][1] * (4e8 if overlap else 1e9)
    plain = HW.layer_costs(CFG, FAMILY, torch.bfloat16, Policy(gpu_batch_size=4), WORK)
    assert weight_bytes == pytest.approx(-plain.gen["io"][1] * 1e9)


@pytest.mark.parametrize("dequantize_rate,fused_wins", [(1e9, True), (1e12, False)])
def test_compressed_layer_costs_by_hand(dequantize_rate, fused_wins):
    rates = {"bfloat16": FLAT, "float32": FLAT, "int4": {1: 2.5e11, 2048: 2.5e11}}
    hw = CpuModel(profile(rates, attention_bps={"bfloat16": 1e10}, kv_decode_bps=2e9,
                          dequantize_params_per_s={"int4": dequantize_rate}))
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, compress_weight=True, compress_cache=True)
    costs = hw.layer_costs(CFG, FAMILY, torch.bfloat16, policy, WORK)
    matrices = 4 * 1024 * 1024 + 2 * 4096 * 1024
    small = 4 * 1024 + 4096 + 1024 + 4 * 1024  # biases and norms stay bf16
    weight_bytes = matrices // 2 + matrices // 64 * 2 * 2 + 2 * small  # 4-bit levels, bf16 step and zero per 64
    kv = 2 * 16 * (64 // 2 + 2 * 2)  # per head: 32 bytes of levels, one bf16 minimum and step
    dense_kv = 2 * 16 * 64 * 2
    batch, s, t, window = 8, 100, 100 + 11 / 2, 32  # the last 32 tokens are also kept dense (cache_window)
    stored = lambda tokens: tokens * kv + window * dense_kv  # every token quantized, read back with the window
    assert costs.pre["io"][0] == pytest.approx(weight_bytes / 1e9 + batch * stored(s) / 5e8)
    appended = batch * (kv + dense_kv) / 5e8
    assert costs.gen["io"][0] == pytest.approx(weight_bytes / 1e9 + batch * stored(t) / 1e9 + appended)
    params = matrices + small
    fused = batch * 2 * params / 2.5e11  # the fused kernel, once per GPU batch
    dequantized = params / dequantize_rate + batch * 2 * params / 1e12  # one dequantization per load, then bf16
    assert (fused < dequantized) == fused_wins
    # attention runs on the dense cache, after dequantizing what is not in the window
    attention = batch * t * dense_kv / 1e10 + batch * (t - window) * dense_kv / 2e9
    assert costs.gen["compute"] == pytest.approx((min(fused, dequantized) + attention, 0, 0))


def test_compressed_weights_without_a_fused_kernel_are_dequantized():
    hw = CpuModel(profile({"bfloat16": FLAT, "float32": FLAT}, dequantize_params_per_s={"int8": 1e9}))
    policy = Policy(gpu_batch_size=4, compress_weight=True, compress_bits=8)
    params = 4 * (1024 * 1024 + 1024) + (4096 * 1024 + 4096) + (1024 * 4096 + 1024) + 4 * 1024
    costs = hw.layer_costs(CFG, FAMILY, torch.bfloat16, policy, WORK)
    assert costs.gen["compute"][0] == pytest.approx(params / 1e9 + 4 * 2 * params / 1e12)


def budget(gib: float) -> MemoryBudget:
    return MemoryBudget(device_bytes=int(gib * 2**30), host_bytes=int(gib * 2**30))


def test_more_memory_never_predicts_less_throughput():
    throughputs = [search(CFG, FAMILY, torch.bfloat16, HW, WORK, budget(g)).best.throughput
                   for g in (0.15, 0.2, 0.4, 0.8, 1.6, 3.2)]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(throughputs, throughputs[1:]))
    assert throughputs[-1] > throughputs[0]


@pytest.mark.parametrize("gib", [0.13, 0.3, 2.0])
def test_every_returned_policy_fits_its_budget(gib):
    plan = search(CFG, FAMILY, torch.bfloat16, HW, WORK, budget(gib))
    for c in [plan.best, *plan.runners_up]:
        p = c.policy
        memory = run_memory(CFG, FAMILY, p, torch.bfloat16, p.block_size, WORK.prompt_len + WORK.gen_len,
                            WORK.prompt_len)
        memory.check(budget(gib), unified=True, hint="")  # raises if over
        assert c.throughput >= best_on_grid(p, budget(gib)) * (1 - 1e-3)


def best_on_grid(policy: Policy, limit: MemoryBudget, step: float = 0.05) -> float:
    """Independent of the LP: the best predicted throughput of `policy`'s block shape over a
    grid of placements (weights and cache in memory, in `step`s), among those that fit."""
    grid = [i * step for i in range(round(1 / step) + 1)]
    best = 0.0
    for w in grid:
        for c in grid:
            p = replace(policy, weights_device=w, weights_host=0.0, cache_device=c, cache_host=0.0)
            candidate = evaluate(CFG, FAMILY, torch.bfloat16, HW, p, WORK)
            try:
                candidate.memory.check(limit, unified=True, hint="")
            except ConfigError:
                continue
            best = max(best, candidate.throughput)
    return best


def test_planner_prefers_memory_when_it_fits_and_disk_when_not():
    roomy = search(CFG, FAMILY, torch.bfloat16, HW, WORK, budget(8)).best.policy
    tight = search(CFG, FAMILY, torch.bfloat16, HW, WORK, budget(0.15)).best.policy
    assert roomy.weights_device == pytest.approx(1.0, abs=1e-5)
    assert tight.weights_device < 0.5


def test_infeasible_budget_says_how_much_is_missing():
    with pytest.raises(ConfigError, match=r"no policy fits.*GiB short"):
        search(CFG, FAMILY, torch.bfloat16, HW, WORK, budget(0.001))


CHILD = textwrap.dedent("""
    import json, sys
    import torch, transformers, safetensors
    from flexbatch import LLM, SamplingParams
    from flexbatch.config import Policy
    folder, offload, policy = sys.argv[1], sys.argv[2], Policy(**json.loads(sys.argv[3]))
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))
    torch.ones(1) @ torch.ones(1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = status("VmRSS")
    with LLM(folder, dtype="float32", policy=policy, offload_dir=offload) as llm:
        loading = status("VmHWM") - baseline  # converting weights into the offload folder
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        llm.generate([[5] * 60] * policy.block_size, SamplingParams(max_new_tokens=20, ignore_eos=True))
    print(json.dumps({"loading": loading, "growth": status("VmHWM") - baseline}))
""")


def test_planned_policy_runs_within_its_predicted_memory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    from flexbatch.weights.source import open_model

    opened = open_model(tmp_path / "m")
    work = Workload(prompt_len=60, gen_len=20)
    limit = MemoryBudget(device_bytes=0, host_bytes=128 << 20)  # the model is 160 MiB in fp32
    plan = search(opened.config, get_family(opened.config), torch.float32, HW, work, limit, max_block=16)
    predicted = plan.best.memory_bytes
    assert predicted <= limit.host_bytes and plan.best.policy.weights_device < 1
    policy = json.dumps({k: v for k, v in vars(plan.best.policy).items()})
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "m"), str(tmp_path / "off"), policy],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    # Generation's peak, counted from before loading, within the prediction (which includes
    # the engine's stated runtime overhead) plus 8 MiB of measurement slack.
    growth = report["growth"]
    assert growth <= predicted + (8 << 20), f"grew {growth / 2**20:.1f} MiB, predicted {predicted / 2**20:.1f} MiB"
    assert report["loading"] <= predicted


def test_planner_with_compression_returns_compressed_policies_that_fit():
    hw = CpuModel(profile({"bfloat16": FLAT, "float32": FLAT, "int4": FLAT}))
    both = {"compress_weight": True, "compress_cache": True}
    tight = budget(0.2)
    plain = search(CFG, FAMILY, torch.bfloat16, hw, WORK, tight)
    packed = search(CFG, FAMILY, torch.bfloat16, hw, WORK, tight, compression=both)
    for c in [packed.best, *packed.runners_up]:
        assert c.policy.compress_weight and c.policy.compress_cache
        c.memory.check(tight, unified=True, hint="")
    # a quarter of the bytes to read per token at equal FLOP/s: compression predicts more throughput
    assert packed.best.throughput > plain.best.throughput


# this machine's profile, rounded (2-core EPYC, bf16 without AMX)
EPYC = profile({"bfloat16": {1: 1.69e10, 8: 1.23e11, 32: 2.62e11, 128: 3.73e11, 512: 4.18e11, 2048: 3.97e11},
                "float32": {1: 1e10, 2048: 1.5e11}},
               read=1.53e9, write=1.99e9, busy=1.55e9, share=0.844, memory=24 << 30, attention_bps={"bfloat16": 8.15e9})
OPT_1_3B = config_from_hf_dict({"model_type": "opt", "vocab_size": 50272, "hidden_size": 2048, "ffn_dim": 8192,
                                "num_hidden_layers": 24, "num_attention_heads": 32,
                                "max_position_embeddings": 2048})


def test_inefficient_gpu_batches_only_when_nothing_else_fits(monkeypatch):
    """The planner benchmark's workload (OPT-1.3B, 2 GiB, 64 prompts of 128 + 32): GPU
    batches under half the peak matmul rate are passed over while larger ones fit, and used
    when the block allows nothing larger."""
    family, work = get_family(OPT_1_3B), Workload(128, 32)
    machine = CpuModel(EPYC)
    plan = lambda block: search(OPT_1_3B, family, torch.bfloat16, machine, work, budget(2), max_block=block).best.policy
    assert plan(64).gpu_batch_size >= 32
    assert plan(8).block_size <= 8
    from flexbatch.planner import cpu_model

    monkeypatch.setattr(cpu_model, "MIN_MATMUL_EFFICIENCY", 0.0)
    assert plan(64).gpu_batch_size < 32  # what the rule prevents: measured 12% slower than 64 x 1


def test_disk_only_refresh_keeps_the_rest_of_the_profile(monkeypatch, tmp_path):
    from flexbatch import profiling as hardware

    cache = tmp_path / "hardware.json"
    monkeypatch.setattr(hardware, "fingerprint", lambda folder: "this machine")
    monkeypatch.setattr(hardware, "measure", lambda folder, log: replace(EPYC, fingerprint="this machine"))
    first = hardware.load_or_measure(cache, tmp_path)
    monkeypatch.setattr(hardware, "measure", lambda folder, log: pytest.fail("the whole profile was measured again"))
    probed = []
    monkeypatch.setattr(hardware, "measure_disk", lambda folder, dtype: probed.append(dtype) or (1e9, 2e9, 5e8, 0.5))
    refreshed = hardware.load_or_measure(cache, tmp_path, disk_only=True)
    assert refreshed.disk == DiskRates(1e9, 2e9, 5e8, 0.5)
    # the reads overlap matmuls in the dtype the engine computes in here (fp32 without fast bf16)
    assert probed == [default_dtype(torch.device("cpu"))]
    assert refreshed.cpu == first.cpu
    assert hardware.load_or_measure(cache, tmp_path) == refreshed  # and it is what later plans read


def test_compute_rates_follow_a_spot_check_of_current_speed(monkeypatch):
    """A CPU measured 20% slower now than when profiled: every compute-bound rate (matmul
    tables, fused kernel, dequantization) scales by 0.8; memory-bound rates and the disk stay."""
    from flexbatch import profiling as hardware

    then = profile({"bfloat16": {1: 1e10, 512: 4e11}, "int4": {512: 1.6e11}},
                   attention_bps={"bfloat16": 1e10}, dequantize_params_per_s={"int4": 1e9})
    monkeypatch.setattr(hardware, "measure_matmul", lambda dtype, rows_list: {rows_list[0]: 3.2e11})
    now = hardware.at_current_speed(then, torch.bfloat16)
    assert now.cpu.matmul_flops == {"bfloat16": {1: pytest.approx(8e9), 512: pytest.approx(3.2e11)},
                                    "int4": {512: pytest.approx(1.28e11)}}
    assert now.cpu.dequantize_params_per_s == {"int4": pytest.approx(8e8)}
    assert (now.cpu.attention_bps, now.disk) == ({"bfloat16": 1e10}, then.disk)
    assert hardware.at_current_speed(then, torch.float16) is then  # no table to compare with


def test_a_mixture_of_experts_reads_every_expert_but_computes_with_the_routed_ones():
    """Mixtral-style, 8 experts, top 2: a layer's weight bytes (read from disk) count every
    expert, its matmul FLOPs per token only the shared part and two experts."""
    cfg = config_from_hf_dict({"model_type": "mixtral", "vocab_size": 1000, "hidden_size": 256,
                               "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
                               "max_position_embeddings": 512})
    family = get_family(cfg)
    expert = 3 * 256 * 512  # gate, up and down of one expert
    attention = 256 * 256 * 2 + 2 * 256 * 128  # q and o; k and v over 2 KV heads of 64
    shared = attention + 8 * 256 + 2 * 256  # router, two RMSNorms
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_device=0.0)
    costs = HW.layer_costs(cfg, family, torch.bfloat16, policy, WORK)
    assert costs.gen["io"][0] == pytest.approx(2 * (shared + 8 * expert) / 1e9 + 8 * (100 + 11 / 2) * 2 * 2 * 128 / 1e9
                                               + 8 * 2 * 2 * 128 / 5e8)
    attended = 8 * (100 + 11 / 2) * 2 * 2 * 128 / 1e10
    assert costs.gen["compute"][0] == pytest.approx(8 * 2 * (shared + 2 * expert) / 1e12 + attended)


@pytest.mark.parametrize("kv_decode_bps,compressed", [(1e12, True), (1e3, False)])
def test_the_planner_weighs_kv_cache_compression_and_says_why(kv_decode_bps, compressed):
    """With --compress-cache-if-faster the planner searches both settings: on a slow disk
    that must hold the KV cache, a cheap dequantization makes compression win; an absurdly
    slow one makes it lose. The note gives both predictions and the decode's KV reads from
    disk per step, computed here by hand for the policy each setting chose."""
    from flexbatch.config import COMPRESS_IF_FASTER
    from flexbatch.planner import plan_policy

    slow_disk = profile({"bfloat16": FLAT, "float32": FLAT}, read=1e8, write=1e8, attention_bps={"bfloat16": 1e10},
                        kv_decode_bps=kv_decode_bps)
    work = Workload(prompt_len=100, gen_len=200)
    tight = budget(0.35)
    plan_with = lambda cache: plan_policy(CFG, FAMILY, torch.bfloat16, torch.device("cpu"), slow_disk, work, tight,
                                          compression={"compress_cache": cache}, block_size=64)
    chosen = plan_with(COMPRESS_IF_FASTER)
    forced = {flag: plan_with(flag).best for flag in (False, True)}
    assert chosen.best.policy.compress_cache is compressed
    assert chosen.best.throughput == pytest.approx(forced[compressed].throughput)
    assert chosen.best.throughput > forced[not compressed].throughput
    note = chosen.notes[0]
    assert note.startswith(f"KV cache compression: {'on' if compressed else 'off'}, the planner's choice")
    assert f"{forced[True].throughput:.2f} tok/s compressed, {forced[False].throughput:.2f} uncompressed" in note

    def kv_disk_gb(policy: Policy) -> float:
        dense = 2 * 16 * 64 * 2  # K and V of a token in one layer: 16 heads x 64 dims in bf16
        packed = 2 * 16 * (64 // 2 + 2 * 2)  # 4-bit values of a head, plus its bf16 minimum and step (group 64)
        context = 100 + 200 / 2
        # compressed: every token 4-bit, and the last 32 (cache_window) dense as well
        per_sequence = context * packed + 32 * dense if policy.compress_cache else context * dense
        return policy.block_size * per_sequence * CFG.num_layers * policy.cache_disk / 1e9

    reads = [kv_disk_gb(forced[flag].policy) for flag in (True, False)]
    assert all(r > 0 for r in reads), "the budget must put the KV cache on disk for this test"
    assert f"{reads[0]:.2f} GB of KV cache from disk per step compressed, {reads[1]:.2f} GB uncompressed" in note


def test_a_forced_setting_names_the_faster_one_it_forgoes():
    from flexbatch.planner import plan_policy

    slow_disk = profile({"bfloat16": FLAT, "float32": FLAT}, read=1e8, write=1e8, attention_bps={"bfloat16": 1e10},
                        kv_decode_bps=1e12)
    plan = plan_policy(CFG, FAMILY, torch.bfloat16, torch.device("cpu"), slow_disk, Workload(100, 200), budget(0.35),
                       block_size=64)
    assert not plan.best.policy.compress_cache
    assert plan.notes[0].startswith("KV cache compression: off, not asked")
    assert "--compress-cache-if-faster" in plan.notes[0]


def test_decode_kv_reads_are_priced_at_the_rate_of_their_own_pattern():
    """Decode reads each K or V prefix in one large request, one in flight: those bytes cost
    the profile's KV read rate; weight reads keep the busy rate of several 4 MiB requests."""
    hw = CpuModel(profile({"bfloat16": FLAT, "float32": FLAT}, read=1e9, write=5e8, busy=8e8,
                          attention_bps={"bfloat16": 1e10}, kv_read_busy_bps=2.5e8))
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_device=0.0, cache_device=0.0)
    costs = hw.layer_costs(CFG, FAMILY, torch.bfloat16, policy, WORK)
    params = 4 * (1024 * 1024 + 1024) + (4096 * 1024 + 4096) + (1024 * 4096 + 1024) + 4 * 1024
    kv, batch, t = 2 * 16 * 64 * 2, 8, 100 + 11 / 2
    assert costs.gen["io"][0] == pytest.approx(2 * params / 8e8 + batch * t * kv / 2.5e8 + batch * kv / 5e8)
    sequential = hw.layer_costs(CFG, FAMILY, torch.bfloat16, replace(policy, overlap=False), WORK)
    assert sequential.gen["io"][0] == pytest.approx(2 * params / 1e9 + batch * t * kv / 1e9 + batch * kv / 5e8)


def test_disk_rates_follow_a_read_of_the_disk_now(monkeypatch, tmp_path):
    """The offload disk reading at half its profiled speed now: every disk bandwidth halves,
    the compute share during reads stays. The probe itself reads a real file and removes it."""
    from flexbatch import profiling as hardware

    assert hardware.disk_read_now(tmp_path, 16 << 20) > 0 and not list(tmp_path.iterdir())
    then = profile({"bfloat16": {1: 1e10}}, read=2e9, write=1e9, busy=1.6e9, share=0.7, kv_read_busy_bps=1.2e9)
    monkeypatch.setattr(hardware, "disk_read_now", lambda folder: 1e9)
    now = hardware.at_current_speed(then, torch.float16, disk_folder=tmp_path)
    assert now.disk == DiskRates(1e9, 5e8, 8e8, 0.7, 6e8) and now.cpu == then.cpu


def test_a_disk_that_cannot_take_the_drift_probe_leaves_the_profile_as_it_is(tmp_path):
    from flexbatch import profiling as hardware

    (tmp_path / "not-a-folder").write_text("a file where the offload folder should be")
    then = profile({"bfloat16": {1: 1e10}}, read=2e9)
    assert hardware.disk_read_now(tmp_path / "not-a-folder") is None
    assert hardware.at_current_speed(then, torch.float16, disk_folder=tmp_path / "not-a-folder") is then




def test_reads_while_computing_are_timed_by_the_reads_not_by_the_multiplies():
    """Four reads of 10 ms, one in flight, beside multiplies of 250 ms each: the rate is the
    reads' (4 units in ~40 ms), not 4 units over the multiply they ended within. Timed by the
    multiplies, an AVX2-only CPU (a bf16 multiply of 0.9 s) measured KV cache reads at 0.60 GB/s
    (2.98 timed by the reads), and the planner priced decode's at a quarter of the engine's
    2.34 GB/s."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from flexbatch.profiling.cpu import _read_while_computing

    class TenMillisecondReads:
        def read_into(self, buf, start, end):
            time.sleep(0.01)

    with ThreadPoolExecutor(1) as pool:
        rate, _ = _read_while_computing(pool, TenMillisecondReads(), None, 4, 1, passes=1,
                                        multiply=lambda: time.sleep(0.25))
    seconds = 4 / rate
    assert 0.04 <= seconds < 0.15

SPOT_CHECK_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from flexbatch.engine.memory import process_rss_bytes
    from flexbatch.malloc import give_back_freed_memory
    from flexbatch.planner import ComputeRates, DiskRates, HardwareProfile
    from flexbatch.profiling import at_current_speed

    then = HardwareProfile("test", 1 << 34, ComputeRates({"float32": {512: 1e11}}), DiskRates(1e9, 5e8))
    check = lambda: at_current_speed(then, torch.float32, disk_folder=Path(sys.argv[1]))
    check()  # the first allocates what libraries keep for good (thread pools, kernels)
    give_back_freed_memory()
    before = process_rss_bytes()
    assert check().cpu.matmul_flops["float32"][512] != 1e11  # the spot check ran
    print(json.dumps({"growth": process_rss_bytes() - before}))
""")


def test_checking_the_current_speed_leaves_no_freed_memory_behind(tmp_path):
    """The spot check's temporaries (an fp32 layer of hidden 2048: ~140 MB of heap, which
    malloc.py keeps) are given back. Kept, they stayed the process's for the run: a memory
    limit counts them, the plan (whose budget is taken before the check) does not, and the
    engine's own fit check, taken after it with 64 MB of headroom, counted them as in use."""
    out = subprocess.run([sys.executable, "-c", SPOT_CHECK_CHILD, str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    growth = json.loads(out.stdout.splitlines()[-1])["growth"]
    assert growth < 32 << 20, f"the process kept {growth / 2**20:.0f} MiB after checking its speed"

@pytest.mark.parametrize("gib", [0.3, 2.0])
def test_a_pipeline_stage_is_planned_with_every_block_in_flight(gib):
    """A stage keeps one block's KV cache per stage in flight: the memory it is planned in
    counts them all, and its policy keeps the block split the first stage chose."""
    from flexbatch.sizing import block_capacity

    staged = replace(WORK, blocks_in_flight=2)
    p = search(CFG, FAMILY, torch.bfloat16, HW, staged, budget(gib), block_size=16, gpu_batch_size=8).best.policy
    assert (p.gpu_batch_size, p.num_gpu_batches) == (8, 2)
    capacity = block_capacity(WORK.prompt_len + WORK.gen_len)
    run_memory(CFG, FAMILY, p, torch.bfloat16, 2 * p.block_size, capacity, WORK.prompt_len).check(
        budget(gib), unified=True, hint="")  # raises if the two blocks do not fit
    in_memory = replace(p, cache_device=1.0, cache_host=0.0)
    kv_per_block = 2 * CFG.num_kv_heads * CFG.head_dim * 2 * capacity * CFG.num_layers * 16  # K and V, bf16
    kv = lambda work: evaluate(CFG, FAMILY, torch.bfloat16, HW, in_memory, work).memory.merged()["KV cache"]
    assert kv(WORK) == pytest.approx(kv_per_block) and kv(staged) == pytest.approx(2 * kv_per_block)


class _Planned(Exception):
    pass


@pytest.mark.parametrize("stages", [1, 2])
def test_the_largest_block_the_planner_may_choose(tiny_model, monkeypatch, stages):
    """A generation job may run all its requests in one block (per pipeline stage); scoring
    blocks hold at most MAX_SCORING_BLOCK rows. Checked where the planner is asked."""
    from flexbatch import prepare

    folder, _ = tiny_model("llama_gqa_tied_llama3")
    asked = []

    def plan_for(settings, opened, device, dtype, work, max_block=None, *rest, **named):
        asked.append(max_block)
        raise _Planned

    monkeypatch.setattr(prepare, "plan_for", plan_for)
    settings = prepare.RunSettings(model=str(folder), dtype="float32", pipeline_stages=stages)
    with pytest.raises(_Planned):
        prepare.prepare_run(settings, 8, lambda opened: (20, 1000))
    with pytest.raises(_Planned):
        prepare.prepare_scoring(settings)
    assert asked == [1000 // stages, prepare.MAX_SCORING_BLOCK // stages]


def test_a_job_is_planned_for_the_tokens_its_requests_ask_for(tiny_model, monkeypatch, tmp_path):
    """`flexbatch run` plans for the most tokens the job's requests may generate (a batch
    file's bodies carry max_tokens), not for the --max-new-tokens default alone: the KV cache
    the plan sizes must hold them. A request whose max_tokens is invalid does not count."""
    from flexbatch import prepare
    from flexbatch.cli.main import main

    folder, _ = tiny_model("llama_gqa_tied_llama3")
    planned = []

    def plan_for(settings, opened, device, dtype, work, *rest, **named):
        planned.append(work.gen_len)
        raise _Planned

    monkeypatch.setattr(prepare, "plan_for", plan_for)
    for asked, expected in (([5, 90, -1, None], 90), ([5, 3], 5), ([None, 3], 7)):
        requests = tmp_path / "requests.jsonl"
        requests.write_text("".join(json.dumps({
            "custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": "m", "prompt": "a short prompt", **({} if n is None else {"max_tokens": n})}}) + "\n"
            for i, n in enumerate(asked)))
        with pytest.raises(_Planned):
            main(["run", str(requests), "-o", str(tmp_path / "out.jsonl"), "--model", str(folder), "--dtype", "float32",
                  "--max-new-tokens", "7", "--force-new"])
        assert planned[-1] == expected, asked
