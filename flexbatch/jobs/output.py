"""The job's output file: append-only, flushed and fsynced after every block, resumable.

On start the existing file is scanned: complete lines give the ids already finished; a torn
last line (the process died inside a write) is cut off, the only change ever made to lines
already written. A lock file next to the output refuses a second job on the same output.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from ..errors import ConfigError


class OutputLock:
    """An exclusive, non-blocking flock on `<output>.lock`, released when the process ends."""

    def __init__(self, output: Path):
        self.path = output.with_name(output.name + ".lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ConfigError(f"another flexbatch job is writing {output} (lock {self.path} is held); "
                              "wait for it to finish or choose another output file.") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def scan_finished(output: Path, id_key: str) -> tuple[set[str], int]:
    """Ids with a complete line in `output`, after cutting a torn last line.

    Returns (finished ids, bytes cut). A last line without its newline, or one that is not
    valid JSON, is a write the process did not finish.
    """
    if not output.exists():
        return set(), 0
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1
    lines = data[:keep].splitlines()
    if lines and not _is_record(lines[-1]):  # a full-length line can still be garbage
        keep -= len(lines[-1]) + 1
        lines = lines[:-1]
    finished = set()
    for number, line in enumerate(lines, start=1):
        try:
            finished.add(str(json.loads(line)[id_key]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{output} line {number} is not a flexbatch result; "
                              "is this the output of another program? Choose a new output file.") from None
    cut = len(data) - keep
    if cut:
        with open(output, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return finished, cut


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


class DurableWriter:
    """Appends JSON lines; `commit` makes everything written so far survive a crash."""

    def __init__(self, output: Path):
        output.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(output, "ab")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.commit()
        self.file.close()
