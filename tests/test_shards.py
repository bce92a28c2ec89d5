"""Sharded jobs without torch.distributed: `run --shard I/N` for each shard, then `merge`.

Oracles: transformers' greedy tokens on the same weights, and the job's input file (every
request exactly once, in input order). A single-process run of the same job must give the
same records (logprobs to rounding: shards cut smaller segments, jobs/runner.py).
"""
from __future__ import annotations

import shutil

import pytest

from flexbatch.cli.main import main
from flexbatch.errors import ConfigError
from flexbatch.jobs.merge import merge_parts

from shard_util import (
    JOB_FLAGS,
    one_thread,
    records,
    reference_job,
    same_results,
)

NUM_PROMPTS = 20


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    """(model folder, input, the single-process output, the prompts)."""
    return reference_job(tiny_model, tmp_path_factory.mktemp("shards"), NUM_PROMPTS)


def run(folder, src, out, *extra) -> int:
    return main(["run", str(src), "-o", str(out), "--model", str(folder), *JOB_FLAGS, *extra])


@pytest.fixture
def three_parts(job, tmp_path):
    folder, src, _, _ = job
    out = tmp_path / "out.jsonl"
    for i in range(3):
        assert run(folder, src, out, "--shard", f"{i}/3") == 0
    return out


def test_three_shards_merged_equal_one_process_and_transformers(job, three_parts):
    _, _, single, _ = job
    parts = [three_parts.with_name(f"out.jsonl.shard-{i}-of-3") for i in range(3)]
    assert all(len(records(p)) >= 5 for p in parts)  # every shard had a share
    assert main(["merge", str(three_parts)]) == 0
    merged = records(three_parts)
    expected_ids = [f"req-{i}" for i in range(NUM_PROMPTS)] + ["bad"]
    assert [r["custom_id"] for r in merged] == expected_ids  # one line each, in input order
    assert same_results(three_parts, single)
    assert merged[-1]["error"]["code"] == "invalid_request"
    assert main(["merge", str(three_parts)]) == 0  # merging again changes nothing
    assert same_results(three_parts, single)


def test_merge_refuses_a_request_in_two_parts(three_parts):
    first, second = (three_parts.with_name(f"out.jsonl.shard-{i}-of-3") for i in (0, 1))
    with open(second, "a") as f:
        f.write(first.read_text().splitlines(keepends=True)[0])
    copied = records(first)[0]["custom_id"]
    with pytest.raises(ConfigError, match=f"1 request\\(s\\) have a result in more than one part.*'{copied}'"):
        merge_parts(three_parts)
    assert not three_parts.read_text()  # nothing was written


def test_merge_names_the_missing_requests(three_parts):
    part = three_parts.with_name("out.jsonl.shard-2-of-3")
    lines = part.read_text().splitlines(keepends=True)
    dropped = [records(part)[i]["custom_id"] for i in (0, 2)]
    part.write_text("".join(line for i, line in enumerate(lines) if i not in (0, 2)))
    with pytest.raises(ConfigError, match="2 request\\(s\\) have no result yet") as refused:
        merge_parts(three_parts)
    assert all(repr(i) in str(refused.value) for i in dropped)
    assert not three_parts.read_text()


def test_resume_with_another_shard_count_runs_nothing_twice(job, tmp_path):
    folder, src, single, _ = job
    out = tmp_path / "out.jsonl"
    assert run(folder, src, out, "--shard", "1/2") == 0  # a first attempt with 2 shards, half done
    for i in range(3):
        assert run(folder, src, out, "--shard", f"{i}/3") == 0
    assert main(["merge", str(out)]) == 0
    assert same_results(out, single)  # refuses a repeated id


def test_a_crashed_shard_resumes_from_its_part(job, tmp_path):
    folder, src, single, _ = job
    out = tmp_path / "out.jsonl"
    for i in range(2):
        assert run(folder, src, out, "--shard", f"{i}/2") == 0
    part = out.with_name("out.jsonl.shard-0-of-2")
    kept = part.read_text().splitlines(keepends=True)[:3]
    part.write_text("".join(kept) + kept[3 - 1][:40])  # as a crash mid-write leaves it
    assert run(folder, src, out, "--shard", "0/2") == 0
    assert part.read_text().startswith("".join(kept))  # finished lines are never rewritten
    assert main(["merge", str(out), "--remove-parts"]) == 0
    assert same_results(out, single) and not list(tmp_path.glob("out.jsonl.shard-*"))


def test_bad_shard_flags_are_refused_before_any_work(job, tmp_path, capsys):
    folder, src, _, _ = job
    out = tmp_path / "out.jsonl"
    assert run(folder, src, out, "--shard", "3/3") == 2
    assert "the index counts from 0, so with 3 shard(s) it must be 0..2" in capsys.readouterr().err
    assert run(folder, src, out, "--shard", "two") == 2
    assert "write INDEX/COUNT" in capsys.readouterr().err
    assert run(folder, src, out, "--shard", "0/2", "--force-new") == 2
    assert "--force-new cannot start a sharded job" in capsys.readouterr().err
    assert not out.exists() or not out.read_text()


def test_a_single_process_run_refuses_a_sharded_jobs_output(job, tmp_path, capsys):
    folder, src, _, _ = job
    out = tmp_path / "out.jsonl"
    assert run(folder, src, out, "--shard", "0/2") == 0
    assert run(folder, src, out) == 2
    assert "belongs to a sharded job" in capsys.readouterr().err
    assert out.read_text() == ""
    assert run(folder, src, out, "--force-new") == 0  # the sharded job's files are moved aside, kept
    assert len(records(out)) == NUM_PROMPTS + 1
    assert len(list(tmp_path.glob("out.jsonl.*.old.shard-0-of-2"))) == 1


def test_a_single_process_job_continues_sharded(job, tmp_path):
    folder, src, single, _ = job
    out = tmp_path / "out.jsonl"
    for suffix in (".job.json", ".job.requests"):  # the job as a single process left it, crashed
        shutil.copy(single.with_name(single.name + suffix), out.with_name(out.name + suffix))
    kept = single.read_text().splitlines(keepends=True)[:7]
    out.write_text("".join(kept))
    for i in range(2):
        assert run(folder, src, out, "--shard", f"{i}/2") == 0
    in_parts = [r["custom_id"] for i in range(2) for r in records(out.with_name(f"out.jsonl.shard-{i}-of-2"))]
    assert len(in_parts) == NUM_PROMPTS + 1 - 7  # only what the single process had not finished
    assert main(["merge", str(out)]) == 0
    assert same_results(out, single)
