"""The job's output file: append-only (each result as its request finishes), fsynced at least
once a second and at the end of every segment, resumable, locked.

The lock is an exclusive flock on the output file itself, so it follows the real file: a
symbolic or hard link to an output another job is writing is refused like the file itself.
On start the file is scanned line by line: every complete line must be a result of this job
(its id among the job's ids, with the fields of a result record), or the file is refused and
never appended to; a torn last line (the process died inside a write) is cut off, the only
change ever made to lines already written.
"""
from __future__ import annotations

import fcntl
import json
import os
from array import array
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ConfigError, storage_error
from .index import contains, hash64

RESULT_FIELDS = {"custom_id": ("response", "error"), "id": ("text", "error")}


class OutputFile:
    """The locked output file: scan what is there, then append whole blocks of records."""

    def __init__(self, path: Path, wait: bool = False):
        """`wait`: block until another process's lock is released instead of refusing."""
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except IsADirectoryError:
            raise ConfigError(f"the output {path} is a folder; give a file name, e.g. {path}/results.jsonl") from None
        except OSError as e:
            raise storage_error(e, path, "create the output") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self.fd)
            raise ConfigError(f"another flexbatch job is writing {path} (it holds a lock on the file); "
                              "wait for it to finish or choose another output file.") from None

    def is_empty(self) -> bool:
        return os.fstat(self.fd).st_size == 0

    def scan(self, id_key: str, job_ids: np.ndarray) -> tuple[np.ndarray, int]:
        """(sorted hashes of the ids with a result, bytes cut from a torn last line).

        `job_ids`: the sorted id hashes of the job's requests. Refuses a file holding lines
        that are not results of this job.
        """
        finished, keep = scan_results(self.path, id_key, job_ids)
        return finished, self._cut_to(keep)

    def _cut_to(self, keep: int) -> int:
        cut = os.fstat(self.fd).st_size - keep
        if cut:
            try:
                os.truncate(self.path, keep)
                os.fsync(self.fd)
            except OSError as e:
                raise storage_error(e, self.path, "repair the torn last line of", resumable=True) from None
        return cut

    def append(self, records: list[dict], sync: bool = True) -> None:
        """Write `records`, and with `sync` make everything written so far durable before
        returning. Without it they survive the process being killed (the kernel holds them),
        not the machine going down before the next sync."""
        if not records and not sync:
            return
        blob = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
        try:
            view = memoryview(blob)
            while view:
                view = view[write_fd(self.fd, view):]
            if sync:
                os.fsync(self.fd)
        except OSError as e:
            raise storage_error(e, self.path, "write results to", resumable=True) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also releases the lock
            self.fd = -1


def scan_results(path: Path, id_key: str, job_ids: np.ndarray) -> tuple[np.ndarray, int]:
    """(sorted hashes of the ids with a result in `path`, bytes of its complete lines).

    Reads only: a torn last line (its writer died, or is still writing it) is not counted.
    Refuses a file holding lines that are not results of the job whose sorted id hashes are
    `job_ids`.
    """
    ids, keep = array("Q"), 0
    for _, raw, result_id in iter_results(path, id_key):
        ids.append(hash64(result_id))
        keep += len(raw)
    finished = np.sort(np.frombuffer(ids, dtype="<u8")) if ids else np.zeros(0, "<u8")
    foreign = ~contains(job_ids, finished)
    if foreign.any():
        raise _foreign(path, None, f"holds {int(foreign.sum())} result(s) whose ids are not requests of this job")
    return finished, keep


def iter_results(path: Path, id_key: str) -> Iterator[tuple[int, bytes, str]]:
    """(byte offset, line, id) of each complete result line of `path`; a torn last line is
    skipped, any other line that is not a result record refused."""
    offset, torn = 0, None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if torn is not None:  # only the last line may be torn
                raise _foreign(path, torn, "is not a flexbatch result record")
            result_id = _result_id(raw, id_key)
            if result_id is None and raw.endswith(b"\n") and _is_json(raw):
                raise _foreign(path, number, "is not a flexbatch result record")
            if result_id is None or not raw.endswith(b"\n"):
                torn = number
                continue
            yield offset, raw, result_id
            offset += len(raw)


def read_records(path: Path) -> Iterator[dict]:
    """Each line of a results file as a record. Lines end at "\n" only: a generated text may
    hold U+2028 or U+0085 unescaped, which str.splitlines would also cut at."""
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            yield json.loads(line)


def _foreign(path: Path, line: int | None, what: str) -> ConfigError:
    where = f"line {line} of {path}" if line else str(path)
    return ConfigError(f"{where} {what}; it is not this job's output, so flexbatch will not append to it. "
                       "Choose another output file (or --force-new to move this one aside and start again).")


def write_fd(fd: int, data) -> int:
    """os.write, by a name tests can replace to make a disk fail."""
    return os.write(fd, data)


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
        return True
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False


def _result_id(raw: bytes, id_key: str) -> str | None:
    """The id of a result line, or None if the line is not one."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get(id_key), str):
        return None
    return obj[id_key] if any(k in obj for k in RESULT_FIELDS[id_key]) else None
