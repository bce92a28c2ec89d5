"""A compact index of a job's input: one fixed-size row per request, in file order.

Each row holds 64-bit hashes of the request's id (as the output will carry it) and of its
content. That is what the job manifest records and what a resume compares, and it lets the
output's finished ids be checked without holding any id string: 16 bytes a request, so a
million requests take 16 MB.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .inputs import JobRequest, iter_requests

ROW = np.dtype([("id", "<u8"), ("content", "<u8")])


def hash64(data: bytes | str) -> int:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def duplicate_id(request_id: str, line: int) -> str:
    """The id a repeated id's result is written under, so every output line stays unique."""
    return f"{request_id}#line-{line}"


@dataclass
class RequestIndex:
    rows: np.ndarray  # ROW, one per request in file order
    duplicate: np.ndarray  # bool: this request repeats an earlier request's id

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def build(cls, requests: Iterator[JobRequest]) -> "RequestIndex":
        ids, alt_ids, contents = array("Q"), array("Q"), array("Q")
        for r in requests:
            ids.append(hash64(r.id))
            alt_ids.append(hash64(duplicate_id(r.id, r.line)))
            contents.append(hash64(r.content))
        raw = np.frombuffer(ids, dtype="<u8") if ids else np.zeros(0, "<u8")
        duplicate = np.ones(len(raw), dtype=bool)
        duplicate[np.unique(raw, return_index=True)[1]] = False
        rows = np.zeros(len(raw), dtype=ROW)
        rows["id"] = np.where(duplicate, np.frombuffer(alt_ids, dtype="<u8") if alt_ids else raw, raw)
        rows["content"] = np.frombuffer(contents, dtype="<u8") if contents else raw
        return cls(rows, duplicate)

    @classmethod
    def of_file(cls, path: Path, fmt: str, column: str) -> "RequestIndex":
        return cls.build(iter_requests(path, fmt, column))

    def sorted_ids(self) -> np.ndarray:
        return np.sort(self.rows["id"])


def contains(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which of `values` are in `sorted_values` (both uint64)."""
    if len(sorted_values) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.searchsorted(sorted_values, values).clip(max=len(sorted_values) - 1)
    return sorted_values[at] == values
