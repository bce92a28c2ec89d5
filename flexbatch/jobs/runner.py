"""Running a job: read requests, skip finished ones, generate block by block, append results.

Blocks are formed from all valid requests of the input, finished or not, sorted by prompt
length, so a resumed job recomputes a block with exactly the sequences (and padding) it had
before the crash: greedy and seeded results are identical to an uninterrupted run. Only
results not already in the output are written.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import SamplingParams
from ..errors import ConfigError
from ..progress import TokenProgress
from .inputs import JobRequest, detect_format, read_requests
from .output import DurableWriter, OutputLock, scan_finished
from .params import request_params
from .records import openai_record, simple_record


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
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    repaired_bytes: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / max(self.seconds, 1e-9)

    @property
    def padding_overhead(self) -> float:
        return self.padded_prompt_tokens / max(self.prompt_tokens, 1) - 1.0

    def lines(self) -> list[str]:
        out = [f"requests: {self.requests} ({self.already_done} already done before this run, "
               f"{self.completed} completed now, {self.errors} errors)",
               f"generated tokens: {self.generated_tokens} in {self.seconds:.1f}s "
               f"({self.tokens_per_second:.1f} tokens/s)",
               f"prompt tokens: {self.prompt_tokens}, padding overhead {100 * self.padding_overhead:.1f}%"]
        if self.repaired_bytes:
            out.append(f"repaired a torn last line ({self.repaired_bytes} bytes) left by an interrupted run")
        out += [f"  error: {e}" for e in self.error_samples]
        return out


def prepare(llm, request: JobRequest, defaults: SamplingParams, chat: bool = False) -> Prepared:
    """Validate and tokenize one request; raises ConfigError with a message for its record.

    With `chat`, plain prompts are sent as a user message through the chat template.
    """
    if request.error:
        raise ConfigError(request.error)
    params = request_params(request.fields, defaults)
    if chat and request.kind == "completion":
        request.kind, request.messages = "chat", [{"role": "user", "content": request.prompt}]
    text = llm.apply_chat_template(request.messages) if request.kind == "chat" else request.prompt
    ids = llm.encode(text)
    llm.check_length(len(ids), params)
    return Prepared(request, ids, params)


def make_blocks(prepared: list[Prepared], block_size: int) -> list[list[Prepared]]:
    ordered = sorted(prepared, key=lambda p: (len(p.token_ids), p.request.line))
    return [ordered[s:s + block_size] for s in range(0, len(ordered), block_size)]


def run_job(llm, input_path: str | Path, output_path: str | Path, fmt: str = "auto", column: str = "prompt",
            defaults: SamplingParams = SamplingParams(), progress: bool = True, model_name: str | None = None,
            chat: bool = False) -> JobSummary:
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.resolve() == output_path.resolve():
        raise ConfigError("the output file must differ from the input file (the input is never modified).")
    if output_path.is_dir():
        raise ConfigError(f"the output {output_path} is a folder; give a file name, e.g. {output_path}/results.jsonl")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fmt = detect_format(input_path, fmt)
    requests = read_requests(input_path, fmt, column)
    if not requests:
        raise ConfigError(f"{input_path} holds no requests (it is empty or blank); nothing to do.")
    record = openai_record if fmt == "openai" else simple_record
    model_name = model_name or llm.model_path.name
    lock = OutputLock(output_path)
    try:
        finished, cut = scan_finished(output_path, "custom_id" if fmt == "openai" else "id")
        summary = JobSummary(requests=len(requests), already_done=len(finished & {r.id for r in requests}),
                             repaired_bytes=cut)
        writer = DurableWriter(output_path)
        started = time.perf_counter()
        bar = TokenProgress(total=len(requests), enabled=progress, desc="job", initial=summary.already_done)
        prepared = _prepare_all(llm, requests, defaults, chat, finished, writer, record, model_name, summary, bar)
        for block in make_blocks(prepared, llm.batch_size):
            _run_block(llm, block, finished, writer, record, model_name, summary, bar)
        writer.close()
        bar.close()
        summary.seconds = time.perf_counter() - started
    finally:
        lock.release()
    return summary


def _prepare_all(llm, requests, defaults, chat, finished, writer, record, model_name, summary,
                 bar) -> list[Prepared]:
    prepared = []
    for request in requests:
        try:
            prepared.append(prepare(llm, request, defaults, chat))
        except ConfigError as e:
            if request.id not in finished:
                writer.write(record(request, model_name, error=str(e)))
                summary.errors += 1
                bar.add_requests(1)
                if len(summary.error_samples) < 5:
                    summary.error_samples.append(f"{request.id}: {e}")
    writer.commit()
    return prepared


def _run_block(llm, block, finished, writer, record, model_name, summary, bar) -> None:
    if all(p.request.id in finished for p in block):
        return
    outputs = llm.generate_ids([p.token_ids for p in block], [p.params for p in block])
    width = max(len(p.token_ids) for p in block)
    for p, out in zip(block, outputs):
        if p.request.id in finished:
            continue
        writer.write(record(p.request, model_name, output=out))
        summary.completed += 1
        summary.prompt_tokens += len(p.token_ids)
        summary.padded_prompt_tokens += width
        summary.generated_tokens += len(out.token_ids)
    writer.commit()
    bar.add_tokens(sum(len(o.token_ids) for o in outputs))
    bar.add_requests(sum(p.request.id not in finished for p in block))
