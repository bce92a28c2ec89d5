"""A job is an identity: a resume continues exactly the job its manifest records, or is
refused with a message naming what changed; outputs that are not this job's are never
appended to; disk errors end the run with one line and leave the output resumable."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from flexbatch import LLM, SamplingParams
from flexbatch.errors import ConfigError, StorageError
from flexbatch.jobs import output as output_module
from flexbatch.jobs.runner import run_job

PROMPTS = [f"Write one word about the number {i}." for i in range(10)]
PARAMS = SamplingParams(max_new_tokens=4)


@pytest.fixture(scope="module")
def llm(default_model_store):
    return LLM(default_model_store, dtype="float32", batch_size=3)


def read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def texts(path):
    return {r["id"]: r.get("text", r.get("error")) for r in read(path)}


@pytest.fixture
def job(tmp_path, llm):
    """An input, and an output holding the first 4 results (an interrupted job)."""
    src, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    src.write_text("".join(p + "\n" for p in PROMPTS))
    run_job(llm, src, out, defaults=PARAMS, progress=False)
    full = texts(out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]))
    return src, out, full


def test_resume_with_the_same_settings_finishes_the_job(llm, job):
    src, out, full = job
    summary = run_job(llm, src, out, defaults=PARAMS, progress=False)
    assert summary.already_done == 4 and summary.completed == 6 and texts(out) == full
    runs = json.loads(out.with_name("out.jsonl.job.json").read_text())["runs"]
    assert [r["note"] for r in runs] == ["first run", "resumed"]


def test_resume_with_another_flag_is_refused_naming_it(llm, job):
    src, out, _ = job
    before = out.read_bytes()
    with pytest.raises(ConfigError, match=r"--max-new-tokens: 4 -> 5"):
        run_job(llm, src, out, defaults=SamplingParams(max_new_tokens=5), progress=False)
    with pytest.raises(ConfigError, match=r"--window: 50000 -> 2"):
        run_job(llm, src, out, defaults=PARAMS, window=2, progress=False)
    assert out.read_bytes() == before


def test_continue_changed_goes_on_and_records_the_change(llm, job):
    src, out, full = job
    written = out.read_text().splitlines()
    summary = run_job(llm, src, out, defaults=SamplingParams(max_new_tokens=2), progress=False,
                      continue_changed=True)
    assert summary.completed == 6
    lines = out.read_text().splitlines()
    assert lines[:4] == written and len(lines) == 10  # results already written are kept as they were
    assert all(json.loads(x)["completion_tokens"] <= 2 for x in lines[4:])
    runs = json.loads(out.with_name("out.jsonl.job.json").read_text())["runs"]
    assert "--max-new-tokens: 4 -> 2" in runs[-1]["note"]


def test_resume_with_another_model_is_refused(job, default_gguf):
    src, out, _ = job
    other = LLM(default_gguf, dtype="float32", batch_size=3)
    with pytest.raises(ConfigError, match="the model's files"):
        run_job(other, src, out, defaults=PARAMS, progress=False)


def test_an_edited_request_is_refused_naming_its_line(llm, job):
    src, out, _ = job
    lines = src.read_text().splitlines()
    lines[6] = "An edited prompt."
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"1 request\(s\) changed.*line 7, id 'line-7'"):
        run_job(llm, src, out, defaults=PARAMS, progress=False)


def test_removed_requests_are_refused(llm, job):
    src, out, _ = job
    src.write_text("".join(p + "\n" for p in PROMPTS[:8]))
    with pytest.raises(ConfigError, match=r"2 request\(s\) were removed"):
        run_job(llm, src, out, defaults=PARAMS, progress=False)


def test_added_requests_join_the_job(llm, job):
    src, out, full = job
    with open(src, "a") as f:
        f.write("The moon is\n")
    summary = run_job(llm, src, out, defaults=PARAMS, progress=False)
    assert summary.completed == 7 and any("1 request(s) were added" in n for n in summary.notes)
    got = texts(out)
    assert {k: got[k] for k in full} == full
    assert got["line-11"] == llm.generate(["The moon is"], PARAMS)[0].text


def test_force_new_moves_the_old_output_aside(llm, job):
    src, out, full = job
    old = out.read_bytes()
    summary = run_job(llm, src, out, defaults=SamplingParams(max_new_tokens=2), progress=False, force_new=True)
    assert summary.already_done == 0 and summary.completed == 10
    kept = [p for p in out.parent.iterdir() if ".old" in p.name]
    assert len(kept) == 3 and any(p.read_bytes() == old for p in kept)


def test_an_output_with_foreign_lines_is_never_appended_to(llm, tmp_path):
    src, other = tmp_path / "in.txt", tmp_path / "other.jsonl"
    src.write_text("Hello\n")
    other.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                 "body": {"prompt": "x"}}) + "\n")
    before = other.read_bytes()
    with pytest.raises(ConfigError, match="has no job manifest"):
        run_job(llm, src, other, defaults=PARAMS, progress=False)
    assert other.read_bytes() == before


def test_an_output_holding_another_jobs_ids_is_refused(llm, job):
    src, out, _ = job
    with open(out, "a") as f:
        f.write(json.dumps({"id": "line-999", "text": "from elsewhere"}) + "\n")
    with pytest.raises(ConfigError, match="1 result\\(s\\) whose ids are not requests of this job"):
        run_job(llm, src, out, defaults=PARAMS, progress=False)


def test_a_hard_link_of_the_input_is_refused_as_output(llm, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "Hello"}) + "\n")
    os.link(src, tmp_path / "link.jsonl")
    with pytest.raises(ConfigError, match="is the input file"):
        run_job(llm, src, tmp_path / "link.jsonl", defaults=PARAMS, progress=False)
    assert src.read_text().count("\n") == 1


def test_disk_full_while_writing_stops_with_one_line_and_resumes(llm, tmp_path, monkeypatch):
    src, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    src.write_text("".join(p + "\n" for p in PROMPTS))
    reference = tmp_path / "reference.jsonl"
    run_job(llm, src, reference, defaults=PARAMS, progress=False)
    real_write, calls = output_module.write_fd, []

    def full_disk(fd, data):  # the first write of results fails half way, as a full disk does
        calls.append(fd)
        if len(calls) == 1:
            real_write(fd, bytes(data)[:25])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(output_module, "write_fd", full_disk)
    with pytest.raises(StorageError) as err:
        run_job(llm, src, out, defaults=PARAMS, progress=False)
    monkeypatch.undo()
    message = str(err.value)
    assert "\n" not in message and str(out) in message and "ENOSPC" in message and "rerun" in message
    run_job(llm, src, out, defaults=PARAMS, progress=False)
    assert texts(out) == texts(reference) and len(read(out)) == len(PROMPTS)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (needs root, as CI has)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def flexbatch_run(*args):
    return subprocess.run([sys.executable, "-m", "flexbatch", "run", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_output_on_a_full_disk_is_refused_before_the_model_loads(default_model_store, tmp_path, tiny_disk):
    src = tmp_path / "in.txt"
    src.write_text("Hello\n" * 2000)
    proc = flexbatch_run(src, "-o", tiny_disk / "out.jsonl", "--model", default_model_store, "--no-plan")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the output folder" in proc.stderr and "free" in proc.stderr
    assert "model " not in proc.stderr  # refused before loading


def test_offload_folder_too_small_is_refused_before_writing(default_model_store, tmp_path, tiny_disk):
    src = tmp_path / "in.txt"
    src.write_text("Hello\n")
    proc = flexbatch_run(src, "-o", tmp_path / "out.jsonl", "--model", default_model_store, "--percent",
                         0, 0, 100, 0, 100, 0, "--offload-dir", tiny_disk, "--max-new-tokens", 2)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the weights kept on disk needs" in proc.stderr and str(tiny_disk) in proc.stderr
    assert not any(tiny_disk.rglob("*.weights"))


def test_batch_size_is_honoured_with_the_planner_and_a_conflict_is_refused(default_model_store, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("".join(p + "\n" for p in PROMPTS))
    out = tmp_path / "out.jsonl"
    proc = flexbatch_run(src, "-o", out, "--model", default_model_store, "--batch-size", 3, "--max-new-tokens", 2)
    assert proc.returncode == 0, proc.stderr
    settings = json.loads(out.with_name("out.jsonl.job.json").read_text())["settings"]
    assert settings["block_size"] == 3 and "block of 3 sequences" in proc.stderr
    assert settings["policy"]["gpu_batch_size"] * settings["policy"]["num_gpu_batches"] == 3
    conflict = flexbatch_run(src, "-o", tmp_path / "b.jsonl", "--model", default_model_store, "--batch-size", 4,
                             "--gpu-batch-size", 2, "--num-gpu-batches", 3)
    assert conflict.returncode == 2 and "--batch-size 4 conflicts with the policy's block of 2 x 3" in conflict.stderr


def test_cpu_memory_is_checked_without_the_planner(default_model_store, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("Hello\n")
    proc = flexbatch_run(src, "-o", tmp_path / "out.jsonl", "--model", default_model_store, "--no-plan",
                         "--cpu-memory", "64MiB")  # less than the weights alone
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "memory budget of 0.06 GiB" in proc.stderr and "model " not in proc.stderr


def test_output_on_a_read_only_disk_is_one_line_before_the_model_loads(default_model_store, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        src = tmp_path / "in.txt"
        src.write_text("Hello\n")
        proc = flexbatch_run(src, "-o", mount / "out.jsonl", "--model", default_model_store)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(error) == 1 and "EROFS" in error[0] and "read-only" in error[0] and str(mount) in error[0]


def test_a_sampling_field_added_since_the_job_started_counts_at_its_default():
    from dataclasses import asdict, replace

    from flexbatch.jobs.manifest import JobSettings

    now = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(PARAMS).items()}
    recorded = {k: v for k, v in now.items() if k != "top_logprobs"}  # written before the field existed
    job = JobSettings("text", "prompt", False, "m", "fp", "float32", None, 3, 50_000, recorded)
    assert replace(job, defaults=now).differences(job) == []
    changed = replace(job, defaults={**now, "top_logprobs": 2})
    assert changed.differences(job) == ["--top-logprobs: 0 -> 2"]
