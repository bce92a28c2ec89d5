"""Assembling a sharded job's parts into its output: one line per request, in input order.

    summary = merge_parts(Path("out.jsonl"))    # refuses duplicates, missing and foreign results

Sources are the shard parts (`OUTPUT.shard-I-of-N`, any N) and the lines OUTPUT already holds
(an earlier merge, or a single-process run of the same job); a request's result is taken
from a part when one has it, so merging again after more shards finished is safe. Two parts
holding the same request is refused: it means two processes ran it (e.g. the same shard
twice at once under different shard counts), and only the user can tell which to keep.

The merged file is written beside OUTPUT and renamed over it once complete and on disk, so a
crash mid-merge leaves the old OUTPUT and every part as they were.
"""
from __future__ import annotations

import fcntl
import json
import os
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, storage_error
from ..storage.disk import write_durably
from .index import hash64
from .inputs import iter_requests
from .manifest import Manifest
from .output import OutputFile, iter_results
from .shards import part_paths

SHOWN = 10  # ids named in a refusal


@dataclass
class MergeSummary:
    requests: int
    parts: list[Path]
    from_output: int  # results kept from OUTPUT's earlier lines

    def lines(self) -> list[str]:
        names = ", ".join(p.name for p in self.parts) or "none"
        return [f"merged {self.requests} results in input order from {len(self.parts)} part(s) ({names})"
                + (f"; {self.from_output} kept from the output's earlier lines" if self.from_output else "")]


@dataclass
class _Found:
    """Every result line found: id hash, which source, where in it."""

    ids: np.ndarray
    sources: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray


def merge_parts(output: Path, input_path: Path | None = None, remove_parts: bool = False) -> MergeSummary:
    """Write OUTPUT from its parts; `input_path` (default: the one the manifest records) is
    read only to name missing requests."""
    output = Path(output).expanduser().resolve()
    if not Manifest.load(output):
        raise ConfigError(f"{output} has no job manifest ({output.name}.job.json), so there is no job to merge; "
                          "pass the OUTPUT given to the sharded `flexbatch run`.")
    lock = OutputFile(output)  # no shard may start while the output is replaced
    try:
        manifest = Manifest.load(output)  # as it is now that no shard can be writing it
        parts = part_paths(output)
        held = [_lock_part(p) for p in parts]  # and none may be running
        try:
            id_key = "custom_id" if manifest.settings.input_format == "openai" else "id"
            sources = [*parts, output]
            found = _collect(sources, id_key)
            order = _input_order(found, manifest, output, Path(input_path or manifest.input), sources, id_key)
            _write(output, sources, found, order)
        finally:
            for fd in held:
                os.close(fd)
        from_output = int((found.sources[order] == len(parts)).sum())
        manifest.add_run(f"merged {len(parts)} part(s) into the output")
        manifest.save(output)
    finally:
        lock.close()
    if remove_parts:
        for part in parts:
            part.unlink()
    return MergeSummary(len(order), parts, from_output)


def _lock_part(part: Path) -> int:
    fd = os.open(part, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{part} is being written by a running shard; merge when every shard has "
                          "finished.") from None
    return fd


def _collect(sources: list[Path], id_key: str) -> _Found:
    ids, where, offsets, lengths = array("Q"), array("l"), array("q"), array("q")
    for number, path in enumerate(sources):
        if not path.exists():
            continue
        for offset, raw, result_id in iter_results(path, id_key):
            ids.append(hash64(result_id))
            where.append(number)
            offsets.append(offset)
            lengths.append(len(raw))
    as_np = lambda values, dtype: np.frombuffer(values, dtype=dtype) if len(values) else np.zeros(0, dtype)
    return _Found(as_np(ids, "<u8"), as_np(where, "i8"), as_np(offsets, "i8"), as_np(lengths, "i8"))


def _input_order(found: _Found, manifest: Manifest, output: Path, input_path: Path, sources: list[Path],
                 id_key: str) -> np.ndarray:
    """Indices into `found`: the one result of each request, in input order."""
    parts = len(sources) - 1
    in_part = found.sources < parts
    part_ids = np.sort(found.ids[in_part])
    twice = np.unique(part_ids[1:][part_ids[1:] == part_ids[:-1]])
    if len(twice):
        raise ConfigError(_duplicates_message(twice, found, sources[:parts], id_key))
    # Per request, a part's line wins over the output's own: sort so it comes first.
    ranked = np.lexsort((~in_part, found.ids))
    first = ranked[np.r_[True, found.ids[ranked][1:] != found.ids[ranked][:-1]]] if len(ranked) else ranked
    wanted = manifest.rows["id"]
    at = np.searchsorted(found.ids[first], wanted).clip(max=max(len(first) - 1, 0))
    present = (found.ids[first][at] == wanted) if len(first) else np.zeros(len(wanted), bool)
    if not present.all():
        raise ConfigError(_missing_message(np.flatnonzero(~present), manifest, input_path, id_key, output))
    foreign = len(first) - len(np.unique(wanted))
    if foreign:
        raise ConfigError(f"{foreign} result(s) in {output.name} or its parts are not requests of this job; "
                          "they belong to another job: move the parts that are not this job's away and merge again.")
    return first[at]


def _duplicates_message(twice: np.ndarray, found: _Found, sources: list[Path], id_key: str) -> str:
    names = []
    for h in twice[:SHOWN]:
        files = sorted({sources[s].name for s in found.sources[found.ids == h] if s < len(sources)})
        names.append(f"{_id_of(found, sources, h, id_key)!r} in {' and '.join(files)}")
    return (f"{len(twice)} request(s) have a result in more than one part, e.g. {'; '.join(names)}. Two processes "
            "ran them (the same shard twice, or shards with different counts at once); keep the parts of one run "
            "(move the others away) and merge again.")


def _id_of(found: _Found, sources: list[Path], h: int, id_key: str) -> str:
    i = int(np.flatnonzero(found.ids == h)[0])
    with open(sources[found.sources[i]], "rb") as f:
        f.seek(int(found.offsets[i]))
        return json.loads(f.read(int(found.lengths[i])))[id_key]


def _missing_message(positions: np.ndarray, manifest: Manifest, input_path: Path, id_key: str,
                     output: Path) -> str:
    shown = _ids_at(positions[:SHOWN], manifest, input_path, id_key)
    more = f" and {len(positions) - SHOWN} more" if len(positions) > SHOWN else ""
    return (f"{len(positions)} request(s) have no result yet: {id_key} {', '.join(shown)}{more}. Run the shards "
            f"that did not finish again (the same command; finished requests are skipped), then merge {output.name} "
            "again.")


def _ids_at(positions: np.ndarray, manifest: Manifest, input_path: Path, id_key: str) -> list[str]:
    """The ids (as results carry them) of the requests at `positions`, read from the input;
    positions alone when the input cannot be read."""
    from .index import duplicate_id

    wanted, names = {int(p) for p in positions}, {}
    try:
        requests = iter_requests(input_path, manifest.settings.input_format, manifest.settings.column)
        for position, request in enumerate(requests):
            if position in wanted:
                same = hash64(request.id) == manifest.rows["id"][position]
                names[position] = repr(request.id if same else duplicate_id(request.id, request.line))
            if len(names) == len(wanted):
                break
    except (OSError, ConfigError):
        pass
    return [names.get(int(p), f"(request {int(p) + 1} of the input)") for p in positions]


def _write(output: Path, sources: list[Path], found: _Found, order: np.ndarray) -> None:
    handles = {}

    def lines():
        for i in order:
            source = int(found.sources[i])
            if source not in handles:
                handles[source] = open(sources[source], "rb")
            yield os.pread(handles[source].fileno(), int(found.lengths[i]), int(found.offsets[i]))

    try:
        write_durably(output, lines(), replace=True)
    except OSError as e:
        raise storage_error(e, output, "write the merged output") from None
    finally:
        for handle in handles.values():
            handle.close()
