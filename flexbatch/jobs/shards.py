"""Splitting one job over several processes: which segments a shard runs, and where it writes.

A shard is one of N processes running the same job (the same command with `--shard I/N`, or
a rank of `torchrun`). Every shard reads the whole input and forms every window's segments
(runner.py) exactly as every other shard does (same sort, same block size: the job manifest
records it; segments are cut small enough that each of the N shards gets one), then runs
only the segments it owns and appends their results to its own part file beside the output,
`OUTPUT.shard-I-of-N`. `merge.py` assembles the parts into OUTPUT in input order.

A request counts as finished when any part (of any shard count) or OUTPUT itself holds its
result, so a resume after a crash, or with another number of shards, never runs it twice.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .output import scan_results

PART_NAME = re.compile(r"\.shard-(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class Shard:
    index: int  # 0 .. count-1
    count: int

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count} does not exist: the index counts from 0, so with "
                              f"{self.count} shard(s) it must be 0..{max(self.count - 1, 0)} (a Slurm array for "
                              f"it is --array=0-{max(self.count - 1, 0)}).")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """'I/N' as given to --shard."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise ConfigError(f"--shard {text!r}: write INDEX/COUNT, e.g. --shard 0/4 for the first of four "
                              "shards (with Slurm: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT).")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns_block(self, window: int, block: int) -> bool:
        """Segment `block` of window `window`. Segments are dealt round-robin, starting one shard
        further on in each window, so that windows of few segments still spread over all
        shards (and neighbouring segments, of similar prompt lengths, go to different shards)."""
        return (window + block) % self.count == self.index

    def owns_request(self, position: int) -> bool:
        """For a request that never reaches a segment (its error record): by input position."""
        return position % self.count == self.index

    def part(self, output: Path) -> Path:
        return output.with_name(f"{output.name}.shard-{self.index}-of-{self.count}")


def part_paths(output: Path) -> list[Path]:
    """Every shard part of `output`, whatever the shard count it was written with."""
    found = [p for p in output.parent.glob(f"{_escape(output.name)}.shard-*-of-*") if PART_NAME.search(p.name)]
    return sorted(found, key=lambda p: tuple(int(g) for g in PART_NAME.search(p.name).groups())[::-1])


def _escape(name: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def finished_elsewhere(output: Path, own_part: Path, id_key: str, job_ids: np.ndarray) -> np.ndarray:
    """Sorted id hashes with a result in a part other than `own_part` (read only: those parts
    may be being written by their shards right now)."""
    found = [scan_results(p, id_key, job_ids)[0] for p in part_paths(output) if p != own_part]
    return np.unique(np.concatenate(found)) if found else np.zeros(0, "<u8")
