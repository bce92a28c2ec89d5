"""Offloading: every policy yields exactly the tokens of the in-memory run, tensors live
where the policy says, the schedule orders loads before use, and budgets are enforced."""
from __future__ import annotations

from dataclasses import replace

import pytest

from flexbatch import LLM, SamplingParams
from flexbatch.config import Policy
from flexbatch.engine.memory import process_rss_bytes
from flexbatch.engine.schedule import Op, OpKind
from flexbatch.errors import ConfigError
from flexbatch.storage.tiers import Tier

PROMPTS = [[5, 6, 7], list(range(10, 31)), [200], [3, 1, 4, 1, 5, 9, 2, 6, 5], [77, 78], list(range(40, 52)), [9, 9]]
PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)

POLICIES = {
    "all_in_memory": Policy(gpu_batch_size=4, num_gpu_batches=2),
    "weights_on_disk": Policy(gpu_batch_size=4, num_gpu_batches=2, weights_device=0, weights_host=0),
    "cache_on_disk": Policy(gpu_batch_size=4, num_gpu_batches=2, cache_device=0, cache_host=0),
    "all_on_disk_sequential": Policy(gpu_batch_size=2, num_gpu_batches=3, weights_device=0, weights_host=0,
                                     cache_device=0, cache_host=0, overlap=False),
    "mixed_30_70": Policy(gpu_batch_size=4, num_gpu_batches=2, weights_device=0.3, weights_host=0,
                          cache_device=0.3, cache_host=0.2),
    "odd_block_three_batches": Policy(gpu_batch_size=3, num_gpu_batches=3, weights_device=0.1, weights_host=0.4,
                                      cache_device=0.5, cache_host=0),
    "one_sequence_batches": Policy(gpu_batch_size=1, num_gpu_batches=4, weights_device=0, weights_host=0.5,
                                   cache_device=0, cache_host=0.0, overlap=True),
}


def in_memory_tokens(folder):
    return [o.token_ids for o in LLM(folder, dtype="float32", batch_size=len(PROMPTS)).generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("kind", ["opt_pre_ln", "llama_gqa_tied_llama3"])
def test_offloaded_tokens_equal_in_memory(tiny_model, tmp_path, kind, policy_name):
    folder, _ = tiny_model(kind)
    with LLM(folder, dtype="float32", policy=POLICIES[policy_name], offload_dir=tmp_path) as llm:
        got = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    assert got == in_memory_tokens(folder)


def test_default_model_offloaded_equals_in_memory(default_model_store, tmp_path):
    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time, in a small village,", "Hi"]
    params = SamplingParams(max_new_tokens=12)
    expected = [o.token_ids for o in LLM(default_model_store, dtype="float32").generate(prompts, params)]
    for policy in (Policy(gpu_batch_size=2, num_gpu_batches=2, weights_device=0, weights_host=0,
                          cache_device=0, cache_host=0),
                   Policy(gpu_batch_size=3, num_gpu_batches=1, weights_device=0.3, weights_host=0.0,
                          cache_device=0.4, cache_host=0, overlap=False)):
        with LLM(default_model_store, dtype="float32", policy=policy, offload_dir=tmp_path / "o") as llm:
            assert [o.token_ids for o in llm.generate(prompts, params)] == expected


def test_offloaded_score_equals_in_memory(tiny_model, tmp_path):
    folder, _ = tiny_model("qwen2")
    texts = [list(range(3, 30)), [9, 8, 7, 6]]
    expected = [s.logprobs for s in LLM(folder, dtype="float32").score(texts)]
    policy = Policy(gpu_batch_size=1, num_gpu_batches=2, weights_device=0, weights_host=0, cache_device=0, cache_host=0)
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path) as llm:
        got = [s.logprobs for s in llm.score(texts)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-6)


@pytest.mark.parametrize("fractions", [(0.3, 0.0), (0.0, 0.5), (0.2, 0.3), (0.45, 0.45), (0.0, 0.0)])
def test_weights_are_placed_by_fraction(tiny_model, tmp_path, fractions):
    folder, _ = tiny_model("llama_mha_bias")
    device, host = fractions
    policy = Policy(weights_device=device, weights_host=host)
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path) as llm:
        home = llm.runner.home
        spec_bytes = {s.name: s.numel() * 4 for s in llm.family.layer_specs(llm.config)}
        total, largest = sum(spec_bytes.values()) * llm.config.num_layers, max(spec_bytes.values())
        placed = home.tier_bytes()
        for tier, share in ((Tier.DEVICE, device), (Tier.HOST, host), (Tier.DISK, 1 - device - host)):
            assert abs(placed[tier] - share * total) <= largest
        for j, tiers in enumerate(home.tiers):  # each tensor is where the placement says
            on_disk = set(home.disk[j].entries) if home.disk[j] else set()
            assert on_disk == {n for n, t in tiers.items() if t is Tier.DISK}
            assert set(home.memory[j]) == {n for n, t in tiers.items() if t is not Tier.DISK}
            if on_disk:
                assert home.disk[j].file.path.stat().st_size >= sum(spec_bytes[n] for n in on_disk)


def test_schedule_loads_before_use_and_modes_do_the_same_work(tiny_model, tmp_path):
    """The executor's trace: prefill computes each (layer, GPU batch) on its own; a decode
    step computes each layer once for the whole block, its attention reaching each GPU
    batch's cache between that cache's load and its store."""
    folder, _ = tiny_model("opt_pre_ln")
    traces = {}
    for overlap in (True, False):
        policy = Policy(gpu_batch_size=2, num_gpu_batches=3, weights_device=0, weights_host=0,
                        cache_device=0, cache_host=0, overlap=overlap)
        with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path / str(overlap)) as llm:
            llm.runner.executor.trace = []
            llm.generate(PROMPTS[:6], SamplingParams(max_new_tokens=3, ignore_eos=True))
            traces[overlap] = llm.runner.executor.trace
    num_layers, uses = 3, (OpKind.COMPUTE, OpKind.ATTEND)
    for overlap, steps in traces.items():
        assert len(steps) == 3
        carried = []  # weight loads issued by the previous step for this one
        for i, ops in enumerate(steps):
            computes = [op for op in ops if op.kind is OpKind.COMPUTE]
            # the prompts' step per GPU batch, the two decode steps once per layer for the block
            assert [op.batch for op in computes] == ([0, 1, 2] if i == 0 else [None]) * num_layers
            for n, op in enumerate(ops):
                before = carried + [o for o in ops[:n] if o.token == 0]
                if op.kind is OpKind.COMPUTE:
                    assert Op(OpKind.LOAD_WEIGHT, op.layer) in before
                if op.kind is OpKind.ATTEND:  # inside its layer's compute of the block
                    assert [o for o in before if o.kind is OpKind.COMPUTE][-1] == Op(OpKind.COMPUTE, op.layer)
                if op.kind in uses and op.batch is not None:
                    assert Op(OpKind.LOAD_CACHE, op.layer, op.batch) in before
                    assert Op(OpKind.STORE_CACHE, op.layer, op.batch) in ops[n + 1:]
            # one weight load per layer per token, reused by all three GPU batches
            loads = carried + [o for o in ops if o.kind is OpKind.LOAD_WEIGHT and o.token == 0]
            assert sorted(o.layer for o in loads) == list(range(num_layers))
            reached = [(o.layer, o.batch) for o in ops if o.kind in uses and o.batch is not None]
            assert sorted(reached) == [(j, k) for j in range(num_layers) for k in range(3)]
            for kind in (OpKind.LOAD_CACHE, OpKind.STORE_CACHE):
                assert sorted((o.layer, o.batch) for o in ops if o.kind is kind) == sorted(reached)
            carried = [replace(o, token=0) for o in ops if o.token == 1]
        # the overlapped order loads the next token's first layer during the last layer
        assert carried == ([Op(OpKind.LOAD_WEIGHT, 0)] if overlap else [])
    same_step_work = lambda steps: sorted(repr(replace(o, token=0)) for ops in steps for o in ops)
    assert same_step_work(traces[True]) == sorted(same_step_work(traces[False]) + [repr(Op(OpKind.LOAD_WEIGHT, 0))])
    assert traces[True] != traces[False]  # the overlapped order really differs


def test_policy_that_cannot_fit_is_refused_before_allocation(tiny_model, tmp_path):
    folder, _ = tiny_model("llama_mha_bias")
    offload = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"needs .* GiB of memory \(.*weights.*\) but the budget is"):
        LLM(folder, dtype="float32", policy=Policy(), cpu_memory=process_rss_bytes() + 100_000, offload_dir=offload)
    assert not offload.exists()
    # Weights fit on disk, but a huge block's KV cache in memory does not.
    policy = Policy(gpu_batch_size=64, num_gpu_batches=4, weights_device=0, weights_host=0)
    with LLM(folder, dtype="float32", policy=policy, cpu_memory=process_rss_bytes() + (40 << 20),
             offload_dir=offload) as llm:
        with pytest.raises(ConfigError, match="KV cache"):
            llm.generate([[1, 2, 3]] * 256, SamplingParams(max_new_tokens=200, ignore_eos=True))


def test_budget_already_used_by_the_process_is_refused(tiny_model):
    folder, _ = tiny_model("llama_mha_bias")
    with pytest.raises(ConfigError, match="already used by the running process"):
        LLM(folder, policy=Policy(), cpu_memory=1 << 20)


@pytest.mark.parametrize("bad", [dict(gpu_batch_size=0), dict(weights_device=0.7, weights_host=0.5),
                                 dict(cache_device=-0.1), dict(num_gpu_batches=1.5)])
def test_invalid_policies_name_the_field(bad):
    with pytest.raises(ConfigError, match=next(iter(bad)).split("_")[0]):
        Policy(**bad)


def test_percent_maps_like_flexgen():
    p = Policy.from_percent([20, 30, 0, 100, 100, 0])
    assert (p.weights_device, p.weights_host, p.weights_disk) == pytest.approx((0.2, 0.3, 0.5))
    assert (p.cache_device, p.cache_host, p.cache_disk) == pytest.approx((0.0, 1.0, 0.0))
    with pytest.raises(ConfigError, match="six numbers"):
        Policy.from_percent([100, 0])


def test_host_token_rows_keep_what_steps_wrote():
    """Host-RAM rows (the GPU's host tier) attended where they live: a step's writes into the
    views `load` returns persist, and the next load sees them in [n, Hkv, T, D] order."""
    import torch

    from flexbatch.engine.kv_segments import CPU, RowHome, RowSegment
    from flexbatch.storage.kv_rows import RowCodec

    codec = RowCodec(3, 2, 4, torch.float32, None)
    rows = RowSegment(codec, RowHome(6, codec.row_bytes, CPU), CPU)
    first = torch.randn(3, 2, 2, 4)
    second = torch.randn(3, 2, 1, 4)
    for start, new in ((0, first), (2, second)):
        k, v = rows.load(start)
        k[:, :, start:start + new.shape[2]] = new
        v[:, :, start:start + new.shape[2]] = -new
        rows.store(start, start + new.shape[2])
    k, v = rows.load(3)
    assert torch.equal(k[:, :, :3], torch.cat([first, second], dim=2))
    assert torch.equal(v[:, :, :3], -torch.cat([first, second], dim=2))


@pytest.mark.parametrize("row_bytes_odd", [False, True])
def test_disk_token_rows_round_trip_every_prefix_under_appends(tmp_path, row_bytes_odd):
    """KV rows on disk, appended one token a step as decode does (and a prompt of several
    first): after every append, a load of each prefix length returns exactly what was
    written, in [n, Hkv, T, D] order, and counts its bytes as disk traffic. Odd row sizes
    make every write and read cross 4 KiB block boundaries mid-row."""
    import torch

    from flexbatch.engine.kv_segments import CPU, BufferPool, RowHome, RowSegment
    from flexbatch.storage.disk import DiskFile, Traffic
    from flexbatch.storage.kv_rows import RowCodec

    n, heads, dim, capacity = (3, 5, 12, 40) if row_bytes_odd else (4, 2, 64, 24)
    codec = RowCodec(n, heads, dim, torch.bfloat16, None)
    traffic = Traffic()
    files = [DiskFile(tmp_path / f"rows.{kv}", capacity * codec.row_bytes, traffic=traffic) for kv in "kv"]
    rows = RowSegment(codec, RowHome(capacity, codec.row_bytes, CPU, files, BufferPool(capacity * codec.row_bytes, 2)),
                      CPU)
    truth = torch.randn(2, n, heads, capacity, dim).to(torch.bfloat16)
    prompt = 5
    steps = [(0, prompt)] + [(t, t + 1) for t in range(prompt, capacity)]
    for start, end in steps:
        k, v = rows.load(start)
        k[:, :, start:end], v[:, :, start:end] = truth[0, :, :, start:end], truth[1, :, :, start:end]
        rows.store(start, end)
        for length in range(1, end + 1):
            before = traffic.read
            k, v = rows.load(length)
            assert torch.equal(k[:, :, :length], truth[0, :, :, :length])
            assert torch.equal(v[:, :, :length], truth[1, :, :, :length])
            rows.store(length, length)  # gives the staging buffers back, writes nothing
            assert traffic.read - before >= 2 * length * codec.row_bytes
    assert traffic.written >= 2 * capacity * codec.row_bytes
    rows.close()


def file_mappings(path) -> list[tuple[int, int]]:
    """The address ranges this process maps from the file `path` (/proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == str(path):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def test_weights_kept_in_memory_are_not_pages_of_the_model_file(tiny_model, tmp_path):
    """A weight placed in memory must hold memory of its own: a view of the model file's
    mapped pages is dropped under memory pressure and read back on every use."""
    folder, _ = tiny_model("llama_mha_bias")
    weights_file = next(folder.glob("*.safetensors")).resolve()
    with LLM(folder, dtype="float32", policy=Policy(weights_device=0.5, weights_host=0.2), offload_dir=tmp_path) as llm:
        home = llm.runner.home
        tensors = [*home.globals.values(), *(t for layer in home.memory for t in layer.values())]
        mapped = file_mappings(weights_file)
        inside = [t for t in tensors if any(a <= t.data_ptr() < b for a, b in mapped)]
        assert not inside, f"{len(inside)} of {len(tensors)} in-memory weights are pages of {weights_file}"


def test_scoring_blocks_shrink_to_fit_the_memory_budget(tiny_model, tmp_path, monkeypatch):
    """Packed scoring rows too wide for a full block under the budget are scored in smaller
    blocks; where not even one row of 1,024 tokens fits, rows are filled to fewer tokens;
    both with transformers' log-likelihoods. A context that alone does not fit is refused
    with a clear error before any block runs."""
    import torch

    from flexbatch.engine.offload_runner import OffloadRunner
    from flexbatch.engine.scoring import pack_by_context
    from flexbatch.sizing import scoring_memory

    folder, hf = tiny_model("opt_pre_ln")
    gen = torch.Generator().manual_seed(5)
    pairs = [(torch.randint(2, 256, (n,), generator=gen).tolist(), torch.randint(2, 256, (4,), generator=gen).tolist())
             for n in range(300, 180, -10)]
    rows = pack_by_context(pairs)  # groups fill rows of up to 1,024 tokens: 1022, 882, 879 and 193
    assert [r.num_tokens for r in rows] == [1022, 882, 879, 193]
    policy = Policy(gpu_batch_size=8, num_gpu_batches=1, weights_device=0.5, weights_host=0, cache_device=1)
    blocks = []  # (rows, width) of each block scored
    real = OffloadRunner.score_packed
    monkeypatch.setattr(OffloadRunner, "score_packed", lambda self, rows: (
        blocks.append(tuple(rows.input_ids.shape)), real(self, rows))[1])
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path, batch_size=8) as llm:
        need = lambda rows, width: sum(scoring_memory(llm.config, llm.family, policy, torch.float32, rows, width)
                                       .merged().values())
        llm.runner.budget = replace(llm.runner.budget, host_bytes=need(2, 1022))  # two of the widest rows, not 3
        wide = llm.score_continuations(pairs)
        assert [b[0] for b in blocks] == [2, 2]  # and not one block of 4
        llm.runner.budget = replace(llm.runner.budget, host_bytes=need(1, 1024) - 1)
        blocks.clear()
        narrow = llm.score_continuations(pairs)
        assert blocks and max(b[1] for b in blocks) <= 512  # rows filled to 512 tokens
        llm.runner.budget = replace(llm.runner.budget, host_bytes=need(1, 303) - 1)
        blocks.clear()
        with pytest.raises(ConfigError, match="does not fit the memory budget"):
            llm.score_continuations(pairs)  # the 303 tokens of the first context and its continuation
        assert blocks == []  # refused before any block ran
    for (context, continuation), *ours in zip(pairs, wide, narrow):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(ids).logits[0, len(context) - 1:-1], -1)
        expected = logprobs.gather(1, torch.tensor(continuation).unsqueeze(1)).squeeze(1)
        for scored in ours:
            torch.testing.assert_close(torch.tensor(scored.logprobs), expected, rtol=1e-4, atol=1e-4)


def test_an_admission_holds_one_gpu_batch_of_fresh_keys_at_a_time(tiny_model, tmp_path, monkeypatch):
    """Each GPU batch of newcomers' keys and values goes into the block's cache as soon as it
    is computed: an admission never holds a whole layer of them (on a GPU, that made a
    256-row block use 2.2x the memory its plan counts). Tokens stay those of the in-memory run."""
    from flexbatch.engine.offload_steps import AdmitStep

    held, compute = [], AdmitStep.compute

    def counting(step, layer, batch, loaded, cache):
        held.append(len(step.fresh))
        compute(step, layer, batch, loaded, cache)

    monkeypatch.setattr(AdmitStep, "compute", counting)
    folder, _ = tiny_model("llama_gqa_tied_llama3")
    policy = Policy(gpu_batch_size=2, num_gpu_batches=4, weights_device=0, weights_host=0, cache_device=0,
                    cache_host=0, overlap=False)
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path) as llm:
        got = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    assert got == in_memory_tokens(folder)
    assert len(held) == 3 * 4 and max(held) == 1  # 3 layers x 4 GPU batches, one admission


def test_admitted_rows_must_ascend(tiny_model, tmp_path):
    folder, _ = tiny_model("opt_pre_ln")
    with LLM(folder, dtype="float32", policy=POLICIES["weights_on_disk"], offload_dir=tmp_path) as llm:
        # GPU batches of 4 rows: rows 0-2 in the first, 5-7 in the second, 9 in the third
        assert llm.runner.admit_batches([0, 1, 2, 5, 6, 7, 9]) == [slice(0, 3), slice(3, 6), slice(6, 7)]
        with pytest.raises(ValueError, match="ascend"):
            llm.runner.admit_batches([3, 1])


def test_each_decode_step_reports_the_disk_bytes_it_moved_and_the_disk_busy_time(tiny_model, tmp_path):
    """With every weight and the KV cache on disk and no overlap, each decode step reads
    every layer's weights (their size from the model's shapes) and its busy disk time lies
    within the step."""
    from flexbatch.sizing import layer_weight_bytes

    folder, _ = tiny_model("opt_pre_ln")
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_device=0, weights_host=0, cache_device=0,
                    cache_host=0, overlap=False)
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path) as llm:
        r = llm.runner
        weights = r.cfg.num_layers * layer_weight_bytes(r.cfg, r.family, r.dtype, policy.weight_quant)
        llm.generate(PROMPTS[:4], PARAMS)
        assert len(r.step_disk) == len(r.step_seconds) == PARAMS.max_new_tokens - 1
        for (moved, busy), seconds in zip(r.step_disk, r.step_seconds):
            assert moved >= weights and 0 < busy <= seconds


def test_an_offloaded_run_gives_the_freed_heap_back_after_each_prompt_layer_and_once_per_decode_layer(
        tiny_model, tmp_path, monkeypatch):
    """Temporaries fragment the heap (malloc.py): one admission of two GPU batches trims after
    each (layer, GPU batch); each of the nine decode steps once per layer, after its last GPU
    batch (the same sizes within a layer reuse the freed blocks)."""
    import flexbatch.engine.offload_steps as steps

    calls = []
    monkeypatch.setattr(steps, "give_back_freed_memory", lambda: calls.append(1))
    folder, _ = tiny_model("opt_pre_ln")
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_device=0, weights_host=0, cache_device=0,
                    cache_host=0)
    with LLM(folder, dtype="float32", policy=policy, offload_dir=tmp_path) as llm:
        llm.generate(PROMPTS[:4], PARAMS)
        decode_steps = PARAMS.max_new_tokens - 1
        assert len(llm.runner.admit_seconds) == 1 and len(llm.runner.step_seconds) == decode_steps
        assert len(calls) == llm.runner.cfg.num_layers * (2 + decode_steps)
