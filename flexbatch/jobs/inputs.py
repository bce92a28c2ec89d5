"""Reading job input files into requests, one at a time. A record that cannot become a request
becomes a request carrying its error, so the job reports it and goes on.

Formats (chosen from the extension, or forced with `--format`):
  openai  JSONL in the OpenAI Batch API format: custom_id, method, url, body
  jsonl   JSONL objects with `prompt` (or `messages`) and optional `id` and sampling fields
  text    one prompt per line
  csv     a CSV file with a header; prompts in `--column` (default `prompt`), ids in `id` if present

Every reader streams: memory does not grow with the file. Text is UTF-8, with or without a
byte-order mark; bytes that are not UTF-8 spoil only their own record.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError
from .validate import check_body

URLS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
FORMATS = ("auto", "openai", "jsonl", "text", "csv")
BOM = "\ufeff"


@dataclass
class JobRequest:
    """One unit of work: a prompt (text or token ids) or chat messages with their sampling
    fields, or an error. `content` is the record as read, which the job manifest hashes."""

    id: str
    line: int
    kind: str = "completion"  # completion | chat
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # sampling fields given with the request
    error: str | None = None
    content: bytes = b""


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
    for _, text, _ in _lines(path):
        try:
            obj = json.loads(text) if text is not None else None
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return "openai" if "custom_id" in obj else "jsonl"
    return "jsonl"


def iter_requests(path: Path, fmt: str, column: str = "prompt") -> Iterator[JobRequest]:
    """The requests of `path` in file order (duplicate ids are the index's business)."""
    path = Path(path)
    if fmt == "csv":
        return _read_csv(path, column)
    readers = {"openai": _read_openai, "jsonl": _read_plain_jsonl, "text": _read_text}
    if fmt not in readers:
        raise ConfigError(f"unknown input format {fmt!r}; use one of {', '.join(FORMATS)}.")
    return readers[fmt](path)


def _lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, decode error) for each non-blank line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield number, None, f"line {number} is not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if number == 1:
                text = text.removeprefix(BOM)
            if text.strip():
                yield number, text, None


def _json_object(number: int, text: str) -> tuple[dict | None, str | None]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"line {number} is not valid JSON: {e.msg} at column {e.colno}"
    except RecursionError:
        return None, f"line {number} nests JSON too deeply to read"
    if not isinstance(obj, dict):
        return None, f"line {number} is a JSON {_json_type(obj)}, expected an object"
    return obj, None


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _read_json_lines(path: Path, fill) -> Iterator[JobRequest]:
    """One request per JSON line; `fill(request, obj)` sets its fields and returns an error or None."""
    for number, text, error in _lines(path):
        request = JobRequest(id=f"line-{number}", line=number, error=error,
                             content=(text or "").encode("utf-8", "surrogatepass"))
        if error is None:
            obj, error = _json_object(number, text)
            if obj is not None:
                error = fill(request, obj)
        request.error = error
        yield request


def _read_openai(path: Path) -> Iterator[JobRequest]:
    return _read_json_lines(path, _fill_openai)


def _fill_openai(request: JobRequest, obj: dict) -> str | None:
    id_error = _take_id(request, obj.get("custom_id"), "custom_id")
    missing = [k for k in ("custom_id", "method", "url", "body") if k not in obj]
    if missing:
        return f"missing field(s) {', '.join(missing)}; a batch line needs custom_id, method, url and body"
    if id_error:
        return id_error
    if obj["method"] != "POST":
        return f"method {obj['method']!r} is not supported; batch requests use POST"
    if not isinstance(obj["url"], str) or obj["url"] not in URLS:
        return f"url {obj['url']!r} is not supported; use one of {', '.join(URLS)}"
    request.kind = URLS[obj["url"]]
    return check_body(request, obj["body"])


def _take_id(request: JobRequest, value: Any, name: str) -> str | None:
    """Sets the request's id from `value`; returns an error for an id that is not a string."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and value.strip():
        request.id = value
        return None
    if value is None and name == "id":
        return None  # plain JSONL ids are optional: the line number names the request
    return f"{name} must be a non-empty string, got {json.dumps(value)[:60]}"


def request_from_record(record: dict, request_id: str) -> JobRequest:
    """A request from one record shaped like a plain JSONL line (`prompt` or `messages`, and
    sampling fields), e.g. a row of a Ray dataset; its error set if the record is not valid."""
    request = JobRequest(id=request_id, line=0)
    if "prompt" not in record and "messages" not in record:
        request.error = "missing field prompt (or messages)"
    else:
        request.error = check_body(request, record)
    return request


def _read_plain_jsonl(path: Path) -> Iterator[JobRequest]:
    return _read_json_lines(path, _fill_plain)


def _fill_plain(request: JobRequest, obj: dict) -> str | None:
    id_error = _take_id(request, obj.pop("id", None), "id")
    if id_error:
        return id_error
    if "prompt" not in obj and "messages" not in obj:
        return "missing field prompt (or messages)"
    return check_body(request, obj)


def _read_text(path: Path) -> Iterator[JobRequest]:
    for number, text, error in _lines(path):
        yield JobRequest(id=f"line-{number}", line=number, prompt=text, error=error,
                         content=(text or "").encode("utf-8"))


def _read_csv(path: Path, column: str) -> Iterator[JobRequest]:
    """Rows as requests; the header is checked before the first row is returned."""
    f = open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None or column not in header:
        f.close()
        raise ConfigError(f"{path} has no column {column!r} (columns: {header}); pass --column NAME.")
    return _csv_rows(f, reader, header, column)


def _csv_rows(f, reader, header: list[str], column: str) -> Iterator[JobRequest]:
    with f:
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                number = reader.line_num
                yield JobRequest(id=f"row-{number}", line=number, error=f"row {number} is not valid CSV: {e}")
                continue
            if not any(cell.strip() for cell in cells):
                continue
            yield _csv_request(reader.line_num, dict(zip(header, cells)), column)


def _csv_request(number: int, row: dict[str, str], column: str) -> JobRequest:
    content = json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogateescape")
    request = JobRequest(id=row.get("id") or f"row-{number}", line=number, content=content)
    if any(_has_surrogates(v) for v in row.values()):
        request.error = f"row {number} is not valid UTF-8; save the CSV as UTF-8"
    elif not row.get(column):
        request.error = f"row {number} has an empty {column!r} cell"
    else:
        request.prompt = row[column]
    return request


def _has_surrogates(text: str | None) -> bool:
    return text is not None and any("\udc80" <= ch <= "\udcff" for ch in text)
