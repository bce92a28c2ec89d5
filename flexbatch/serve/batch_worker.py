"""Runs batches one after another through the job runner (the same code as `flexbatch run`).

Each batch is a job whose input is a hard link to the uploaded file and whose output and
manifest live in the batch's job folder. The job's output is the durable state: after a
crash, the worker picks up every batch not in a final state and the runner resumes it from
its output, so no request is lost or run twice. When the job ends, its records are split
into the batch's output file (answered requests) and error file (failed ones). A batch with
an `expires_at` (the server's --expire-batches) whose window closes first stops after the
running block and expires: what it answered goes to the output file, a `batch_expired` error
for each other request to the error file.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from ..config import SamplingParams
from ..errors import FlexbatchError
from ..jobs.index import contains, duplicate_id
from ..jobs.job import Job, JobSpec
from ..jobs.output import scan_results
from ..jobs.records import expired_record
from ..jobs.runner import WindowRunner
from ..jobs.settings import job_settings
from ..storage.disk import write_durably
from .engine import Engine, EngineLLM, JobStopped
from .store import Store

OUTPUT_NAME = "output.jsonl"


class BatchWorker:
    def __init__(self, store: Store, engine: Engine, model_name: str, defaults: SamplingParams):
        self.store, self.engine, self.model_name, self.defaults = store, engine, model_name, defaults
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cancelled: set[str] = set()
        self._thread = threading.Thread(target=self._run_forever, name="flexbatch-batches", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the running block; an unfinished batch stays in progress and resumes
        when the server starts again."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=600)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, batch_id: str) -> None:
        self._cancelled.add(batch_id)
        self._wake.set()

    def _run_forever(self) -> None:
        while not self._stopping.is_set():
            active = self.store.active_batches()
            if not active:
                self._wake.wait(timeout=5)
                self._wake.clear()
                continue
            try:
                self._run(active[0])
            except JobStopped:
                pass  # stopping: the batch resumes on the next start
            except Exception as e:  # never leave a batch running forever: it fails with the reason
                self._fail(active[0]["id"], "server_error", f"{type(e).__name__}: {e}")

    def _run(self, batch: dict) -> None:
        batch_id = batch["id"]
        job_dir = self.store.batch_job_dir(batch_id)
        if batch["status"] in ("finalizing", "cancelling"):
            self._finalize(batch_id, job_dir, "completed" if batch["status"] == "finalizing" else "cancelled")
            return
        if batch["status"] == "validating" and (wrong := other_endpoints(job_dir / "input.jsonl", batch["endpoint"])):
            self._fail(batch_id, "invalid_url", f"line(s) {', '.join(map(str, wrong))} use another url than the "
                                                f"batch's endpoint {batch['endpoint']}; every line must use it")
            return
        try:
            job = Job.open(JobSpec(job_dir / "input.jsonl", job_dir / OUTPUT_NAME, "openai", defaults=self.defaults))
        except FlexbatchError as e:
            self._fail(batch_id, "invalid_file", str(e))
            return
        try:
            end = self._run_job(batch, job)
            if end == "expired":
                expire_unfinished(job)
        finally:
            job.close()
        if end is not None:
            self._finalize(batch_id, job_dir, end)

    def _run_job(self, batch: dict, job: Job) -> str | None:
        """Run (or resume) the batch's job until it ends: its final status ("completed", or
        "cancelled" or "expired" if stopped for that); None if it cannot run with this server's
        settings."""
        batch_id = batch["id"]
        llm = self.engine.llm
        try:
            job.bind(job_settings(job, llm.model_path, llm.dtype, llm.policy, llm.batch_size))
        except FlexbatchError as e:  # the server restarted with another model or policy
            self._fail(batch_id, "settings_changed", str(e))
            return None
        done_ok, done_failed = count_records(job.output)
        counts = {"total": len(job.index), "completed": done_ok, "failed": done_failed}
        if batch["status"] == "validating":
            self.store.update_batch(batch_id, status="in_progress", in_progress_at=int(time.time()),
                                    request_counts=counts)
        if self._stop_reason(batch_id) == "expired":  # its window closed while the server was down
            return "expired"  # (a job with nothing left to run would otherwise complete)
        runner = None

        def report_progress():
            summary = runner.summary
            self.store.update_batch(batch_id, request_counts={
                "total": counts["total"], "completed": done_ok + summary.completed,
                "failed": done_failed + summary.errors})

        def should_stop():
            return self._stopping.is_set() or self._stop_reason(batch_id) is not None

        # Segments of one block: online requests run between the engine's calls, so a longer
        # segment would make them wait longer (they do not join a running block yet).
        runner = WindowRunner(job, EngineLLM(self.engine, should_stop, report_progress), self.model_name, False,
                              segment_blocks=1)
        try:
            runner.run()
            end = "completed"
        except JobStopped:
            end = self._stop_reason(batch_id)
            if end is None:  # the server is stopping: the batch resumes on the next start
                raise
        report_progress()
        return end

    def _stop_reason(self, batch_id: str) -> str | None:
        """"cancelled" if the batch was cancelled, "expired" if its `expires_at` has passed,
        else None (read from the store before each block)."""
        batch = self.store.get_batch(batch_id)
        if batch_id in self._cancelled or (batch is not None and batch["status"] == "cancelling"):
            return "cancelled"
        if batch is not None and batch["expires_at"] is not None and time.time() >= batch["expires_at"]:
            return "expired"
        return None

    def _finalize(self, batch_id: str, job_dir: Path, status: str) -> None:
        """Split the job's records into the output and error files; register them and the
        final `status` in one transaction (a crash before it leaves unregistered files, which
        the next start deletes, and the batch still in its last state)."""
        now = int(time.time())
        if status == "completed":
            self.store.update_batch(batch_id, status="finalizing", finalizing_at=now)
        output, errors = split_records(job_dir / OUTPUT_NAME)
        files = []
        for kind, lines in (("output", output), ("error", errors)):
            if lines:
                path = self.store.new_file_path()
                write_durably(path, lines)
                files.append((kind, path, f"{batch_id}_{kind}.jsonl"))
        final = {"status": status, f"{status}_at": int(time.time())}
        counts = {"total": self.store.get_batch(batch_id)["request_counts"]["total"] or len(output) + len(errors),
                  "completed": len(output), "failed": len(errors)}
        self.store.finish_batch(batch_id, files, request_counts=counts, **final)
        self._cancelled.discard(batch_id)
        print(f"batch {batch_id} {final['status']}: {len(output)} completed, {len(errors)} failed", file=sys.stderr)

    def _fail(self, batch_id: str, code: str, message: str) -> None:
        print(f"batch {batch_id} failed: {message}", file=sys.stderr)
        self.store.update_batch(batch_id, status="failed", failed_at=int(time.time()),
                                errors={"object": "list", "data": [{"code": code, "message": message,
                                                                    "param": None, "line": None}]})


def expire_unfinished(job: Job) -> None:
    """Append a `batch_expired` error record for every request of the job without a result,
    under the id the runner would have written it with. Durable before the batch is marked
    expired: a crash in between expires it again at the next start, adding nothing twice."""
    finished, _ = scan_results(job.output, job.id_key, job.job_ids)
    unfinished = ~contains(finished, job.index.rows["id"])
    records = []
    for request, open_, duplicate in zip(job.requests(), unfinished, job.index.duplicate):
        if open_:
            if duplicate:
                request.id = duplicate_id(request.id, request.line)
            records.append(expired_record(request))
    job.out.append(records)


def split_records(output: Path) -> tuple[list[bytes], list[bytes]]:
    """(lines of answered requests, lines of failed ones) of a job's output."""
    answered, failed = [], []
    if not output.exists():
        return answered, failed
    with open(output, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                continue  # a torn last line is not a result (the runner cuts it on resume)
            (failed if json.loads(line).get("error") else answered).append(line)
    return answered, failed


def other_endpoints(input_path: Path, endpoint: str, limit: int = 10) -> list[int]:
    """Numbers of the first lines whose `url` is not the batch's endpoint (as OpenAI, a batch
    holds one kind of request). Lines that are not JSON objects get error records later."""
    wrong = []
    with open(input_path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                url = json.loads(line).get("url")
            except (ValueError, AttributeError, RecursionError):
                continue
            if isinstance(url, str) and url != endpoint:
                wrong.append(number)
                if len(wrong) == limit:
                    break
    return wrong


def count_records(output: Path) -> tuple[int, int]:
    answered, failed = split_records(output)
    return len(answered), len(failed)


def link_input(source: Path, job_dir: Path) -> None:
    """The job reads its own name for the uploaded file: deleting the upload does not take
    the input away from a running batch (a copy where links are not possible)."""
    target = job_dir / "input.jsonl"
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
