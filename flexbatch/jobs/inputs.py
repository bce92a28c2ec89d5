"""Reading job input files into requests. A line that cannot become a request becomes a
request carrying its error, so the job reports it and goes on.

Formats (chosen from the extension, or forced with `--format`):
  openai  JSONL in the OpenAI Batch API format: custom_id, method, url, body
  jsonl   JSONL objects with `prompt` (or `messages`) and optional `id` and sampling fields
  text    one prompt per line
  csv     a CSV file with a header; prompts in `--column` (default `prompt`), ids in `id` if present
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError

URLS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
FORMATS = ("auto", "openai", "jsonl", "text", "csv")


@dataclass
class JobRequest:
    """One unit of work: a prompt (or chat messages) with its sampling fields, or an error."""

    id: str
    line: int
    kind: str = "completion"  # completion | chat
    prompt: str | None = None
    messages: list[dict] | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # sampling fields given with the request
    error: str | None = None


def detect_format(path: Path, forced: str = "auto") -> str:
    if forced != "auto":
        return forced
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".txt", ".text"):
        return "text"
    if suffix not in (".jsonl", ".json", ".ndjson"):
        raise ConfigError(f"cannot tell the format of {path} from its extension; pass --format "
                          f"({', '.join(FORMATS[1:])}).")
    return _sniff_jsonl(path)


def _sniff_jsonl(path: Path) -> str:
    with open(path, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(obj, dict):
                return "openai" if "custom_id" in obj else "jsonl"
    return "jsonl"


def read_requests(path: Path, fmt: str, column: str = "prompt") -> list[JobRequest]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"input file {path} does not exist.")
    readers = {"openai": _read_openai, "jsonl": _read_plain_jsonl, "text": _read_text, "csv": _read_csv}
    requests = list(readers[fmt](path) if fmt != "csv" else _read_csv(path, column))
    _mark_duplicate_ids(requests)
    return requests


def _lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, decode error) for each non-blank line; bytes that are not UTF-8
    spoil only their own line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield number, None, f"line {number} is not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if text.strip():
                yield number, text, None


def _json_object(number: int, text: str) -> tuple[dict | None, str | None]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"line {number} is not valid JSON: {e.msg} at column {e.colno}"
    if not isinstance(obj, dict):
        return None, f"line {number} is a JSON {type(obj).__name__}, expected an object"
    return obj, None


def _read_json_lines(path: Path, fill) -> Iterator[JobRequest]:
    """One request per JSON line; `fill(request, obj)` sets its fields and returns an error or None."""
    for number, text, error in _lines(path):
        request = JobRequest(id=f"line-{number}", line=number, error=error)
        obj, error = (None, error) if error else _json_object(number, text)
        if obj is not None:
            error = fill(request, obj)
        request.error = error
        yield request


def _read_openai(path: Path) -> Iterator[JobRequest]:
    return _read_json_lines(path, _fill_openai)


def _fill_openai(request: JobRequest, obj: dict) -> str | None:
    request.id = str(obj.get("custom_id", request.id))
    missing = [k for k in ("custom_id", "method", "url", "body") if k not in obj]
    if missing:
        return f"missing field(s) {', '.join(missing)}; a batch line needs custom_id, method, url and body"
    if obj["method"] != "POST":
        return f"method {obj['method']!r} is not supported; batch requests use POST"
    if obj["url"] not in URLS:
        return f"url {obj['url']!r} is not supported; use one of {', '.join(URLS)}"
    body = obj["body"]
    if not isinstance(body, dict):
        return "body must be a JSON object"
    request.kind = URLS[obj["url"]]
    return _fill_prompt(request, body)


def _fill_prompt(request: JobRequest, body: dict) -> str | None:
    fields = dict(body)
    if request.kind == "chat" or ("messages" in fields and "prompt" not in fields):
        request.kind = "chat"
        messages = fields.pop("messages", None)
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            return "messages must be a non-empty list of objects with role and content"
        request.messages = messages
    else:
        prompt = fields.pop("prompt", None)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return "prompt must be a string (one prompt per request)"
        request.prompt = prompt
    request.fields = fields
    return None


def _read_plain_jsonl(path: Path) -> Iterator[JobRequest]:
    return _read_json_lines(path, _fill_plain)


def _fill_plain(request: JobRequest, obj: dict) -> str | None:
    request.id = str(obj.pop("id", request.id))
    if "prompt" not in obj and "messages" not in obj:
        return "missing field prompt (or messages)"
    return _fill_prompt(request, obj)


def _read_text(path: Path) -> Iterator[JobRequest]:
    for number, text, error in _lines(path):
        yield JobRequest(id=f"line-{number}", line=number, prompt=text, error=error)


def _read_csv(path: Path, column: str) -> Iterator[JobRequest]:
    try:
        content = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}); save the CSV as UTF-8.") from e
    reader = csv.DictReader(io.StringIO(content))
    if reader.fieldnames is None or column not in reader.fieldnames:
        raise ConfigError(f"{path} has no column {column!r} (columns: {reader.fieldnames}); pass --column NAME.")
    for number, row in enumerate(reader, start=2):
        prompt = row.get(column)
        yield JobRequest(id=str(row.get("id") or f"row-{number}"), line=number, prompt=prompt,
                         error=None if prompt else f"row {number} has an empty {column!r} cell")


def _mark_duplicate_ids(requests: list[JobRequest]) -> None:
    seen: set[str] = set()
    for r in requests:
        if r.id in seen:
            r.error = r.error or f"id {r.id!r} appears more than once; ids must be unique"
            r.id = f"{r.id}#line-{r.line}"
        seen.add(r.id)
