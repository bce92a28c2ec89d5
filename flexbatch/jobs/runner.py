"""Running a job: the input in windows, each window's requests sorted into segments, each
segment generated with continuous refill, results appended as requests finish.

A window is `job.window` consecutive requests of the input; its valid requests, finished or
not, are sorted by prompt length and cut into segments of SEGMENT_BLOCKS blocks' worth of
requests. A segment is one call of the engine's refilling loop (engine/generation.py), whose
schedule depends only on its requests and the tokens they generate: a resumed job reruns an
interrupted segment from its start with exactly the requests it had, so each sequence meets
the same neighbours at the same steps and its tokens are those of an uninterrupted run; only
results not already in the output are written. Memory holds one window's token lists at a
time. No request can stop the job: a request that fails validation or preparation gets an
error record, and a segment on which the engine raises is split in halves until only the
requests that fail alone get error records.

A shard of the job (shards.py) forms the same windows and segments and runs the segments it owns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from ..config import SamplingParams
from ..engine.generation import BlockStats
from ..errors import ConfigError, StageLostError, StorageError
from ..progress import TokenProgress
from ..storage.disk import DiskUse
from .index import contains, duplicate_id
from .inputs import JobRequest
from .job import Job, JobSpec
from .params import request_params
from .records import openai_record, simple_record

# Blocks' worth of requests per segment. Rows idle only while a segment's last sequences
# finish, so longer segments keep the block busier; a crash costs at most one segment's rerun.
SEGMENT_BLOCKS = 8
SYNC_SECONDS = 1.0  # results written since are fsynced at least this often
# the share of a run the offload disk was busy from which the summary says the disk bound it
# (compute and I/O overlap: a job bound by compute leaves the disk idle between its reads)
DISK_BOUND = 0.8


@dataclass
class Prepared:
    request: JobRequest
    token_ids: list[int]
    params: SamplingParams


@dataclass
class JobSummary:
    requests: int = 0
    already_done: int = 0
    completed: int = 0
    errors: int = 0
    engine_errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    repaired_bytes: int = 0
    disk: DiskUse = DiskUse(0, 0.0)  # the offload disk's use during the run
    notes: list[str] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    blocks: BlockStats = field(default_factory=BlockStats)  # the engine's schedule, reruns included

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / max(self.seconds, 1e-9)

    @property
    def padding_overhead(self) -> float:
        return self.blocks.padding_overhead

    def count_error(self, request: JobRequest, message: str, engine: bool = False) -> None:
        self.errors += 1
        self.engine_errors += engine
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{request.id}: {message}")

    def lines(self) -> list[str]:
        out = [f"requests: {self.requests} ({self.already_done} already done before this run, "
               f"{self.completed} completed now, {self.errors} errors"
               + (f", {self.engine_errors} of them raised in the engine" if self.engine_errors else "") + ")",
               f"generated tokens: {self.generated_tokens} in {self.seconds:.1f}s "
               f"({self.tokens_per_second:.1f} tokens/s)",
               f"prompt tokens: {self.prompt_tokens}, padding overhead {100 * self.padding_overhead:.1f}%, "
               f"block rows busy {100 * self.blocks.occupancy:.1f}% of decode steps"]
        if self.disk.moved:
            out.append(self.disk_line())
        if self.repaired_bytes:
            out.append(f"repaired a torn last line ({self.repaired_bytes} bytes) left by an interrupted run")
        out += self.notes
        out += [f"  error: {e}" for e in self.error_samples]
        return out

    def disk_line(self) -> str:
        """What the offload disk did, and whether it bound the job's speed."""
        busy, moved = self.disk.busy_seconds / max(self.seconds, 1e-9), self.disk.moved
        amount = f"{moved / 1e9:.1f} GB" if moved >= 1e9 else f"{moved / 1e6:.1f} MB"
        line = (f"offload disk: {amount} read and written, busy {100 * busy:.0f}% of the "
                f"run at {self.disk.rate / 1e9:.2f} GB/s")
        if busy >= DISK_BOUND:
            line += ("; the job waited on the disk: more memory for the weights and KV cache (--cpu-memory) "
                     "or a faster offload disk (--offload-dir) would speed it up")
        return line


def prepare(llm, request: JobRequest, defaults: SamplingParams, chat: bool = False) -> Prepared:
    """Validate and tokenize one request; raises ConfigError with a message for its record.

    With `chat`, plain prompts are sent as a user message through the chat template.
    """
    if request.error:
        raise ConfigError(request.error)
    params = request_params(request.fields, defaults)
    if chat and request.kind == "completion":
        if not isinstance(request.prompt, str):
            raise ConfigError("--chat needs text prompts; this request gives token ids")
        request.kind, request.messages = "chat", [{"role": "user", "content": request.prompt}]
    if request.kind == "chat":
        ids = llm.encode(llm.apply_chat_template(request.messages))
    else:
        ids = llm.encode(request.prompt)
    llm.check_length(len(ids), params)
    return Prepared(request, ids, params)


def prepare_or_error(llm, request: JobRequest, defaults: SamplingParams, chat: bool) -> Prepared | str:
    """`prepare`, with any failure turned into the message of the request's error record."""
    try:
        return prepare(llm, request, defaults, chat)
    except ConfigError as e:
        return str(e)
    except Exception as e:  # a template or tokenizer failing on odd input: this request's problem alone
        return f"cannot prepare this request ({type(e).__name__}: {e})"


def make_segments(prepared: list[Prepared], block_size: int, parts: int = 1,
                  blocks: int = SEGMENT_BLOCKS) -> list[list[Prepared]]:
    """`prepared` sorted by prompt length and cut into segments of `blocks` blocks, or
    smaller (down to one block) so that `parts` shards get a segment each."""
    ordered = sorted(prepared, key=lambda p: (len(p.token_ids), p.request.line))
    size = max(block_size, min(block_size * blocks, -(-len(ordered) // parts)))
    return [ordered[s:s + size] for s in range(0, len(ordered), size)]


def generate_isolated(llm, segment: list[Prepared], on_finish=None, stats: BlockStats | None = None,
                      arrivals=None) -> list:
    """Outputs of `segment`, or for a request on which the engine raises, the error's message.
    on_finish(i, output) is called as request i of the segment finishes.

    OSErrors and StorageErrors (a full or failing disk, also when writing a finished result
    from on_finish) and a pipeline stage's process gone are not any request's fault: they
    stop the job, which the same command resumes. `arrivals` (online requests that join the
    block, `LLM.generate_ids`) join the first attempt only: after an error, the halves run
    alone, and arrivals left unfinished are the caller's to run again.
    """
    try:
        return llm.generate_ids([p.token_ids for p in segment], [p.params for p in segment],
                                on_finish=on_finish, stats=stats, arrivals=arrivals)
    except (OSError, StorageError, StageLostError):
        raise
    except Exception as e:
        if arrivals is not None:  # a request that joined may be at fault (or the larger block): run alone
            return generate_isolated(llm, segment, on_finish, stats)
        if len(segment) == 1:
            return [f"the engine failed on this request ({type(e).__name__}: {e})"]
        mid = len(segment) // 2
        later = on_finish and (lambda i, out: on_finish(mid + i, out))
        return (generate_isolated(llm, segment[:mid], on_finish, stats)
                + generate_isolated(llm, segment[mid:], later, stats))


class WindowRunner:
    """Runs an opened job's windows with one LLM, appending records to its output.
    segment_blocks: blocks' worth of requests per call of the engine (see SEGMENT_BLOCKS)."""

    def __init__(self, job: Job, llm, model_name: str, progress: bool, segment_blocks: int = SEGMENT_BLOCKS):
        self.job, self.llm, self.model_name, self.segment_blocks = job, llm, model_name, segment_blocks
        self.record = openai_record if job.format == "openai" else simple_record
        self.shard = job.spec.shard
        self.summary = JobSummary(requests=len(job.index), already_done=len(job.finished),
                                  repaired_bytes=job.repaired_bytes, notes=list(job.notes))
        if self.shard:
            self.summary.notes.append(f"shard {self.shard}: ran its share of the blocks into {job.out.path.name}")
        self.bar = TokenProgress(total=len(job.index), enabled=progress, desc=f"shard {self.shard}" if self.shard
                                 else "job", initial=self.summary.already_done)

    def run(self) -> JobSummary:
        started, disk = time.perf_counter(), self._disk_use()
        requests, position = self.job.requests(), 0
        while window := list(islice(requests, self.job.window)):
            self._run_window(window, position)
            position += len(window)
        self.bar.close()
        self.summary.seconds = time.perf_counter() - started
        if disk is not None:
            self.summary.disk = self._disk_use().since(disk)
        return self.summary

    def _disk_use(self) -> DiskUse | None:
        # the LLM's whole disk: on a server, what its online requests move meanwhile too
        disk_use = getattr(self.llm, "disk_use", None)
        return disk_use() if disk_use else None

    def _run_window(self, window: list[JobRequest], position: int) -> None:
        ids = self.job.index.rows["id"][position:position + len(window)]
        done = contains(self.job.finished, ids)
        if done.all():
            return
        for request, duplicate in zip(window, self.job.index.duplicate[position:position + len(window)]):
            if duplicate:
                request.error = request.error or f"id {request.id!r} appears more than once; ids must be unique"
                request.id = duplicate_id(request.id, request.line)
        finished = {r.id for r, d in zip(window, done) if d}
        prepared, errors = [], []
        for offset, request in enumerate(window):
            item = prepare_or_error(self.llm, request, self.job.spec.defaults, self.job.spec.chat)
            if isinstance(item, Prepared):
                prepared.append(item)
            elif request.id not in finished and (not self.shard or self.shard.owns_request(position + offset)):
                errors.append(self._error(request, item))
        self.job.out.append(errors)
        self.bar.add_requests(len(errors))
        window_number = position // self.job.window
        parts = self.shard.count if self.shard else 1
        segments = make_segments(prepared, self.llm.batch_size, parts, self.segment_blocks)
        for number, segment in enumerate(segments):
            if self.shard and not self.shard.owns_block(window_number, number):
                continue
            if not all(p.request.id in finished for p in segment):
                self._run_segment(segment, finished)

    def _error(self, request: JobRequest, message: str, engine: bool = False) -> dict:
        self.summary.count_error(request, message, engine)
        return self.record(request, self.model_name, error=message, server_error=engine)

    def _run_segment(self, segment: list[Prepared], finished: set[str]) -> None:
        synced = time.monotonic()

        def done(i: int, out) -> None:
            nonlocal synced
            p = segment[i]
            if p.request.id in finished:
                return
            sync = time.monotonic() - synced >= SYNC_SECONDS
            self.job.out.append([self._record(p, out)], sync=sync)  # written at once: a kill loses nothing
            finished.add(p.request.id)  # only now: a record that failed to build leaves the request to be retried
            self.bar.add_requests(1)
            if sync:
                synced = time.monotonic()

        outputs = generate_isolated(self.llm, segment, done, self.summary.blocks)
        for i, out in enumerate(outputs):
            if isinstance(out, str):  # an engine error: never reported through `done`
                done(i, out)
        self.job.out.append([], sync=True)

    def _record(self, p: Prepared, out) -> dict:
        if isinstance(out, str):
            return self._error(p.request, out, engine=True)
        record = self.record(p.request, self.model_name, output=out, tokenizer=self.llm.tokenizer)
        self.summary.completed += 1
        self.summary.prompt_tokens += len(p.token_ids)
        self.summary.generated_tokens += len(out.token_ids)
        self.bar.add_tokens(len(out.token_ids))
        return record

def run_job(llm, input_path: str | Path, output_path: str | Path, fmt: str = "auto", column: str = "prompt",
            defaults: SamplingParams = SamplingParams(), progress: bool = True, model_name: str | None = None,
            chat: bool = False, window: int | None = None, **resume) -> JobSummary:
    """Run (or resume) the job of `input_path` into `output_path` with a loaded LLM.

    `resume` takes JobSpec's force_new and continue_changed. The CLI opens the job before
    loading the model instead (cli/run.py), so file problems show up first.
    """
    from .settings import job_settings

    spec = JobSpec(Path(input_path), Path(output_path), fmt, column, chat, defaults, window, **resume)
    job = Job.open(spec)
    try:
        job.bind(job_settings(job, llm.model_path, llm.dtype, llm.policy, llm.batch_size))
        return WindowRunner(job, llm, model_name or llm.model_path.name, progress).run()
    finally:
        job.close()
