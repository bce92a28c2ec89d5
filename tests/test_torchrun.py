"""A sharded job under real torchrun processes (2 ranks on this CPU, gloo), against one process.

Oracles: transformers' greedy tokens on the same weights, and the input (every request once,
in input order). A rank killed with SIGKILL mid-job must leave a job that the same command
finishes, by a rerun or by torchrun's own elastic restart, with no request run twice.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from shard_util import (
    JOB_FLAGS,
    finish,
    one_thread,
    records,
    reference_job,
    same_results,
)

NUM_PROMPTS = 40
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    """(model folder, input, the single-process output, the prompts)."""
    return reference_job(tiny_model, tmp_path_factory.mktemp("torchrun"), NUM_PROMPTS, seed=1)


def torchrun(folder, src, out, *launcher_flags) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               *launcher_flags, "-m", "flexbatch", "run", str(src), "-o", str(out), "--model", str(folder), *JOB_FLAGS]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "flexbatch" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def kill_rank_mid_job(launcher: subprocess.Popen, part: Path, after_lines: int, rank: int = 1,
                      timeout: float = 120) -> int:
    """SIGKILL `rank` once its part holds more than `after_lines` results; returns the lines it
    had then."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = part.read_bytes().count(b"\n") if part.exists() else 0
        worker = rank_process(launcher, rank) if lines > after_lines else None
        if worker is not None:
            worker.kill()
            return lines
        assert launcher.poll() is None, "the job ended before its rank could be killed"
        time.sleep(0.005)
    raise AssertionError(f"rank {rank} wrote no result within {timeout}s")


def assert_complete(out: Path, single: Path) -> None:
    merged = records(out)
    assert [r["custom_id"] for r in merged] == [f"req-{i}" for i in range(NUM_PROMPTS)] + ["bad"]
    assert same_results(out, single)
    parts = [out.with_name(f"{out.name}.shard-{r}-of-2") for r in range(2)]
    ids = [r["custom_id"] for p in parts for r in records(p)]
    assert len(ids) == len(set(ids)) == NUM_PROMPTS + 1  # no request ran twice


def test_two_ranks_equal_one_process(job, tmp_path):
    folder, src, single, _ = job
    out = tmp_path / "out.jsonl"
    code, output = finish(torchrun(folder, src, out))
    assert code == 0, output
    assert all(len(records(out.with_name(f"out.jsonl.shard-{r}-of-2"))) >= 10 for r in range(2)), output
    assert_complete(out, single)


def test_a_killed_rank_then_the_same_command_again(job, tmp_path):
    folder, src, single, _ = job
    out = tmp_path / "out.jsonl"
    part = out.with_name("out.jsonl.shard-1-of-2")
    launcher = torchrun(folder, src, out)
    had = kill_rank_mid_job(launcher, part, after_lines=0)
    code, output = finish(launcher)
    assert code != 0, output  # without --max-restarts torchrun gives up
    survived = part.read_text().splitlines(keepends=True)
    assert had <= len(survived) < NUM_PROMPTS // 2, output  # killed mid-job, its results on disk
    code, output = finish(torchrun(folder, src, out))
    assert code == 0, output
    assert part.read_text().startswith("".join(survived))  # resumed, never redone
    assert_complete(out, single)


def test_torchrun_elastic_restart_resumes(job, tmp_path):
    folder, src, single, _ = job
    out = tmp_path / "out.jsonl"
    launcher = torchrun(folder, src, out, "--max-restarts", "1")
    kill_rank_mid_job(launcher, out.with_name("out.jsonl.shard-1-of-2"), after_lines=0)
    code, output = finish(launcher, timeout=120)
    assert code == 0, output
    notes = [run["note"] for run in json.loads(out.with_name("out.jsonl.job.json").read_text())["runs"]]
    assert sum(note.startswith("resumed") for note in notes) >= 3, notes  # the restarted ranks resumed
    assert_complete(out, single)
