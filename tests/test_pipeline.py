"""Pipeline stages under real torchrun processes (gloo, on this CPU): a model's layers split
over 2 and 3 processes must generate exactly what one process does.

Oracles: transformers' greedy tokens on the same weights (dense runs); the one-process run
of the same compressed policy, itself checked against a compressed oracle in
test_compressed_oracle.py (compressed runs); the job's input for the CLI (every request once).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from flexbatch.config import Policy
from flexbatch.engine.pipeline import StagePlace, stage_layers
from flexbatch.errors import ConfigError

from shard_util import (
    JOB_FLAGS,
    MAX_NEW_TOKENS,
    finish,
    hf_greedy,
    one_thread,
    records,
    reference_job,
    same_results,
    token_prompts,
)

REPO = Path(__file__).resolve().parents[1]
# two GPU batches of 2, every weight on disk, the KV cache split over memory and disk
ON_DISK = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_device=0.0, weights_host=0.0,
                 cache_device=0.5, cache_host=0.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def launch(stages: int, *command: str, procs: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs or stages)]
    return subprocess.Popen([*launcher, *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def generate_on_stages(tmp_path, folder, prompts, stages: int, policy: Policy | None, **extra):
    """(return code, output, the first stage's generated token ids or None)."""
    out = tmp_path / f"tokens-{stages}.json"
    spec = {"model": str(folder), "prompts": prompts, "policy": asdict(policy) if policy else None, "stages": stages,
            "max_new_tokens": MAX_NEW_TOKENS, "out": str(out), **extra}
    spec_file = tmp_path / f"spec-{stages}.json"
    spec_file.write_text(json.dumps(spec))
    code, output = finish(launch(stages, str(REPO / "tests" / "pipeline_worker.py"), str(spec_file)))
    return code, output, json.loads(out.read_text()) if out.exists() else None


def test_layers_split_in_contiguous_balanced_ranges():
    assert [stage_layers(3, 2, s) for s in range(2)] == [range(0, 2), range(2, 3)]
    assert [stage_layers(24, 5, s) for s in range(5)] == [range(0, 5), range(5, 10), range(10, 15),
                                                           range(15, 20), range(20, 24)]
    with pytest.raises(ConfigError, match="exceeds the model's 3 layers"):
        stage_layers(3, 4, 0)


def test_ranks_form_one_pipeline_per_shard():
    assert StagePlace.of(3, 4, 2) == StagePlace(1, 2, 2)  # rank 3: shard 1's second stage
    assert StagePlace.of(4, 6, 3) == StagePlace(1, 3, 3)
    with pytest.raises(ConfigError, match="must divide the 3 processes"):
        StagePlace.of(0, 3, 2)


# global tensors only the head uses, and only the embedding (None: tied to the head)
HEAD_ONLY = {"opt_pre_ln": "model.decoder.final_layer_norm.weight",
             "opt_post_ln_proj": "model.decoder.project_out.weight",
             "llama_gqa_tied_llama3": "model.norm.weight", "llama_mha_bias": "model.norm.weight"}
EMBEDDING_ONLY = {"opt_pre_ln": "model.decoder.embed_positions.weight",
                  "opt_post_ln_proj": "model.decoder.project_in.weight", "llama_mha_bias": "model.embed_tokens.weight"}


@pytest.mark.parametrize("kind,stages", [("opt_pre_ln", 2), ("llama_gqa_tied_llama3", 3),
                                         ("opt_post_ln_proj", 3), ("llama_mha_bias", 2)])
def test_stages_generate_what_transformers_does(tiny_model, tmp_path, kind, stages):
    folder, hf = tiny_model(kind)
    prompts = token_prompts(10, seed=3)
    code, output, tokens = generate_on_stages(tmp_path, folder, prompts, stages, ON_DISK, calls=2)
    assert code == 0, output[-3000:]
    assert tokens == hf_greedy(hf, prompts)
    held = [set(json.loads((tmp_path / f"tokens-{stages}.json.globals-of-rank{r}").read_text()))
            for r in range(stages)]
    assert all(not h for h in held[1:-1])  # a middle stage holds no global tensor
    head_only, embedding_only = HEAD_ONLY[kind], EMBEDDING_ONLY.get(kind)
    assert head_only in held[-1] and all(head_only not in h for h in held[:-1])
    if embedding_only:
        assert embedding_only in held[0] and all(embedding_only not in h for h in held[1:])


def test_compressed_stages_generate_what_one_process_does(tiny_model, tmp_path):
    from flexbatch import LLM, SamplingParams

    folder, _ = tiny_model("llama_gqa_tied_llama3")
    prompts = token_prompts(10, seed=4)
    policy = replace(ON_DISK, compress_weight=True, compress_cache=True, compress_group=32)
    with LLM(str(folder), dtype="float32", policy=policy) as llm:
        one = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))]
    code, output, tokens = generate_on_stages(tmp_path, folder, prompts, 2, policy)
    assert code == 0, output[-3000:]
    assert tokens == one


def test_a_stage_that_fails_is_named_by_the_first(tiny_model, tmp_path):
    """Stage 1 fails mid-generation (an injected fault): the first stage's call raises an
    error naming that stage, its layers and the cause, and every process ends."""
    folder, _ = tiny_model("opt_pre_ln")
    code, output, tokens = generate_on_stages(tmp_path, folder, token_prompts(6), 2, ON_DISK, fail_on_stage_1=True)
    assert code != 0 and tokens is None
    assert "StageError: pipeline stage 1 (layers 2-2): injected failure" in output, output[-3000:]


def run_job(src, out, stages: int, procs: int | None = None, folder=None) -> subprocess.Popen:
    return launch(stages, "-m", "flexbatch", "run", str(src), "-o", str(out), "--model", str(folder), *JOB_FLAGS,
                  "--pipeline-stages", str(stages), procs=procs)


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    return reference_job(tiny_model, tmp_path_factory.mktemp("pipeline-job"), 24, seed=5)


def test_a_job_over_stages_equals_one_process(job, tmp_path):
    folder, src, single, _ = job
    out = tmp_path / "out.jsonl"
    code, output = finish(run_job(src, out, 2, folder=folder))
    assert code == 0, output[-3000:]
    assert [r["custom_id"] for r in records(out)].count("bad") == 1
    assert sorted(r["custom_id"] for r in records(out)) == sorted(r["custom_id"] for r in records(single))
    assert same_results(out, single)


def test_two_pipelines_share_a_job(job, tmp_path):
    """4 processes, 2 stages: two pipelines, each a shard of the job; rank 0 merges."""
    folder, src, single, _ = job
    out = tmp_path / "out.jsonl"
    code, output = finish(run_job(src, out, 2, procs=4, folder=folder), timeout=300)
    assert code == 0, output[-3000:]
    parts = [records(out.with_name(f"out.jsonl.shard-{s}-of-2")) for s in range(2)]
    assert all(parts) and sum(map(len, parts)) == len(records(single))
    assert sorted(r["custom_id"] for r in records(out)) == sorted(r["custom_id"] for r in records(single))
    assert same_results(out, single)


def test_a_killed_stage_then_the_same_command_again(job, tmp_path):
    """Stage 1 killed mid-job: the first stage stops the job (no request gets an error record
    for it), and the same command finishes it without running a request twice."""
    from test_torchrun import kill_rank_mid_job

    folder, src, single, _ = job
    out = tmp_path / "out.jsonl"
    launcher = run_job(src, out, 2, folder=folder)
    had = kill_rank_mid_job(launcher, out, after_lines=2, rank=1)
    code, output = finish(launcher)
    assert code != 0, output[-3000:]  # torchrun stops the first stage too
    survived = out.read_text().splitlines(keepends=True)
    assert had <= len(survived) < len(records(single)), output[-3000:]
    assert all("engine failed" not in line for line in survived)
    code, output = finish(run_job(src, out, 2, folder=folder))
    assert code == 0, output[-3000:]
    assert out.read_text().startswith("".join(survived))  # resumed, never redone
    assert sorted(r["custom_id"] for r in records(out)) == sorted(r["custom_id"] for r in records(single))
    assert same_results(out, single)


def test_a_lost_stage_stops_the_job_instead_of_failing_its_requests():
    """A stage's process gone is no request's fault: the job runner re-raises it where it
    isolates a request that makes the engine raise."""
    from types import SimpleNamespace

    from flexbatch.errors import StageLostError
    from flexbatch.jobs.runner import generate_isolated

    class LostPipeline:
        calls = 0

        def generate_ids(self, *args, **kwargs):
            self.calls += 1
            raise StageLostError("pipeline stage 1 stopped answering")

    llm = LostPipeline()
    segment = [SimpleNamespace(token_ids=[5, 6], params=None) for _ in range(4)]
    with pytest.raises(StageLostError):
        generate_isolated(llm, segment)
    assert llm.calls == 1  # not retried request by request
