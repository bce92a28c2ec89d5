"""Opening a job: every check that can fail on the user's files runs here, before a model is
loaded. The input is indexed (streamed once), the output locked and scanned, and the job
manifest compared with what this run is asked to do.

    job = Job.open(JobSpec(Path("in.jsonl"), Path("out.jsonl")))   # input/output checks, lock
    job.bind(settings)               # first run: write the manifest; resume: refuse a change
    summary = WindowRunner(job, llm, name, progress).run()

A shard of a job (`JobSpec.shard`, see shards.py) opens the same way: the manifest beside the
output is the job's, written by the first shard and checked by every other; `bind` then
releases the output (for the next shard's start) and opens the shard's own part, which the
runner appends to.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import SamplingParams
from ..errors import ConfigError, storage_error
from .index import RequestIndex
from .inputs import detect_format, iter_requests
from .manifest import JobSettings, Manifest, RequestChanges, manifest_paths
from .output import OutputFile
from .shards import Shard, finished_elsewhere, part_paths

DEFAULT_WINDOW = 50_000
# Bytes of output a request needs at the least: the record's fields, ids and usage counts
# plus about four bytes of text per generated token.
RECORD_BYTES, BYTES_PER_TOKEN = 400, 4


@dataclass
class JobSpec:
    """What the user asked for: files, input format and the job-wide sampling defaults."""

    input: Path
    output: Path
    format: str = "auto"
    column: str = "prompt"
    chat: bool = False
    defaults: SamplingParams = field(default_factory=SamplingParams)
    window: int | None = None  # requests read, tokenized and sorted at a time (default: as recorded, or 50,000)
    force_new: bool = False  # move an existing output aside and start again
    continue_changed: bool = False  # resume even though settings or requests changed
    shard: Shard | None = None  # run only this shard's blocks, into its own part file


class Job:
    """An opened job, holding the output's lock until `close`."""

    def __init__(self, spec: JobSpec, output: Path, fmt: str, out: OutputFile, index: RequestIndex,
                 manifest: Manifest | None):
        self.spec, self.output, self.format, self.out = spec, output, fmt, out
        self.index, self.manifest = index, manifest
        self.id_key = "custom_id" if fmt == "openai" else "id"
        self.finished = np.zeros(0, "<u8")
        self.job_ids = index.sorted_ids()  # of every request the job has known (input, manifest)
        self.repaired_bytes = 0
        self.notes: list[str] = []

    @classmethod
    def open(cls, spec: JobSpec) -> "Job":
        input_path = _checked_input(Path(spec.input).expanduser())
        output = _checked_output(Path(spec.output).expanduser(), input_path)
        _check_shard_mode(spec, output)
        fmt = detect_format(input_path, spec.format)
        index = RequestIndex.of_file(input_path, fmt, spec.column)
        if len(index) == 0:
            raise ConfigError(f"{input_path} holds no requests (it is empty or blank); nothing to do.")
        # Shards take turns holding the output while they open the job, so the first one
        # records the settings (and the planner's policy) that every other one then adopts.
        out = OutputFile(output, wait=spec.shard is not None)
        if spec.force_new and (not out.is_empty() or manifest_paths(output)[0].exists() or part_paths(output)):
            _move_aside(output)  # while holding the lock, so a running job's file is never moved
            out.close()
            out = OutputFile(output)
        try:
            job = cls(spec, output, fmt, out, index, Manifest.load(output))
            job._check_parts_belong()
            job._check_output_belongs()
            job._check_output_space()
        except BaseException:
            out.close()
            raise
        return job

    @property
    def window(self) -> int:
        recorded = self.manifest.settings.window if self.manifest else None
        return self.spec.window or recorded or DEFAULT_WINDOW

    def _check_output_belongs(self) -> None:
        if self.manifest is None:
            if not self.out.is_empty():
                manifest = manifest_paths(self.output)[0].name
                raise ConfigError(
                    f"{self.output} already holds data but has no job manifest ({manifest}), "
                    "so it is not the output of a flexbatch job (or was written by a flexbatch without manifests); "
                    "flexbatch will not append to it. Choose another output file, or pass --force-new to move "
                    "it aside and start again.")
            return
        changes = RequestChanges.between(self.manifest.rows, self.index.rows)
        if changes.breaking and not self.spec.continue_changed:
            raise ConfigError(self._changed_requests_message(changes))
        if changes.added:
            self.notes.append(f"{changes.added} request(s) were added to the input since the job started; "
                              "they are run now")
        self.job_ids = np.unique(np.concatenate([self.index.rows["id"], self.manifest.rows["id"]]))
        self.finished, self.repaired_bytes = self.out.scan(self.id_key, self.job_ids)

    def _check_parts_belong(self) -> None:
        parts = part_paths(self.output)
        if parts and self.manifest is None:
            raise ConfigError(f"{parts[0]} (and {len(parts)} part(s) in all) lie beside {self.output.name} but no "
                              "job manifest does, so they belong to no job flexbatch knows; move them away (or "
                              "choose another output file).")
        if parts and self.spec.shard is None:
            raise ConfigError(f"{self.output} belongs to a sharded job ({len(parts)} part file(s) such as "
                              f"{parts[0].name}); finish it with the same sharded command (--shard I/N or torchrun), "
                              f"or assemble what is there with `flexbatch merge {self.output}`.")

    def _changed_requests_message(self, changes: RequestChanges) -> str:
        parts = []
        if len(changes.changed):
            lines = self._describe_positions(changes.changed[:5])
            parts.append(f"{len(changes.changed)} request(s) changed since the job started ({lines})")
        if changes.removed:
            parts.append(f"{changes.removed} request(s) were removed from the end of the input")
        return (f"{self.spec.input} is not the input this job started with: {'; '.join(parts)}. "
                f"To start a new job, choose another output file or pass --force-new (moves {self.output.name} "
                "aside); to keep the results already written and go on with the input as it is now, pass "
                "--continue-changed.")

    def _describe_positions(self, positions: np.ndarray) -> str:
        wanted, found = set(int(p) for p in positions), []
        for position, request in enumerate(iter_requests(self.spec.input, self.format, self.spec.column)):
            if position in wanted:
                found.append(f"line {request.line}, id {request.id!r}")
            if len(found) == len(wanted):
                break
        return "; ".join(found) or "requests past the end of the input"

    def bind(self, settings: JobSettings) -> None:
        """Record `settings` on the first run; on a resume, refuse settings that differ from
        the recorded ones (unless continue_changed), then note this run in the manifest."""
        if self.manifest is None:
            self.manifest = Manifest(settings, self.index.rows, [], str(Path(self.spec.input).resolve()))
            self.manifest.add_run("first run")
        else:
            differences = settings.differences(self.manifest.settings)
            if differences and not self.spec.continue_changed:
                raise ConfigError(
                    f"{self.output} belongs to a job with other settings; changed: {'; '.join(differences)}. "
                    "Rerun with the job's settings to resume it, choose another output file (or --force-new "
                    "to move this one aside) to start a new job, or pass --continue-changed to go on with "
                    "the new settings for the requests not finished yet.")
            note = f"continued with changes: {'; '.join(differences)}" if differences else "resumed"
            self.manifest.settings, self.manifest.rows = settings, self.index.rows
            self.manifest.input = str(Path(self.spec.input).resolve())
            self.manifest.add_run(note)
        if self.spec.shard:
            self.manifest.runs[-1]["note"] += f" (shard {self.spec.shard})"
        self.manifest.save(self.output)
        if self.spec.shard:
            self._open_part()

    def _open_part(self) -> None:
        """Switch to the shard's own part: a request finished in any part or in the output
        counts as finished."""
        part = self.spec.shard.part(self.output)
        own = OutputFile(part)  # a second process running the same shard is refused here
        try:
            mine, self.repaired_bytes = own.scan(self.id_key, self.job_ids)
            others = finished_elsewhere(self.output, part, self.id_key, self.job_ids)
        except BaseException:
            own.close()
            raise
        self.out.close()
        self.out = own
        self.finished = np.unique(np.concatenate([self.finished, mine, others]))

    def _check_output_space(self) -> None:
        remaining = len(self.index) - len(self.finished)
        tokens = self.spec.defaults.max_new_tokens
        need = remaining * (RECORD_BYTES + BYTES_PER_TOKEN * tokens)
        free = shutil.disk_usage(self.output.parent).free
        if need > free:
            raise ConfigError(
                f"the output folder {self.output.parent} has {free / 2**20:.1f} MiB free, but {remaining} results "
                f"of up to {tokens} tokens need about {need / 2**20:.1f} MiB; free space there or choose an "
                "output on another disk.")

    def requests(self):
        """The input's requests in file order (streamed)."""
        return iter_requests(self.spec.input, self.format, self.spec.column)

    def close(self) -> None:
        self.out.close()


def _check_shard_mode(spec: JobSpec, output: Path) -> None:
    if spec.shard and spec.force_new:
        raise ConfigError("--force-new cannot start a sharded job: every shard would move the others' work aside. "
                          f"Move {output.name} and its .shard-* and .job.* files away yourself (or choose another "
                          "output file), then start the shards.")


def _checked_input(path: Path) -> Path:
    if not path.exists():
        raise ConfigError(f"input file {path} does not exist; check the path.")
    if path.is_dir():
        raise ConfigError(f"the input {path} is a folder; pass the requests file inside it.")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise storage_error(e, path, "read the input") from None
    return path


def _checked_output(output: Path, input_path: Path) -> Path:
    """The output's real path (links resolved), its folder created; never the input itself."""
    output = output.resolve()
    if output.is_dir():
        raise ConfigError(f"the output {output} is a folder; give a file name, e.g. {output}/results.jsonl")
    if output.exists() and os.path.samefile(output, input_path):
        raise ConfigError(f"the output {output} is the input file (perhaps through a link); the input is never "
                          "modified: choose another output file.")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(e, output.parent, "create the output folder") from None
    return output


def _move_aside(output: Path) -> None:
    """--force-new: keep an existing output, its manifest and shard parts under a dated name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in (output, *manifest_paths(output), *part_paths(output)):
        if path.exists():
            target = path.with_name(f"{output.name}.{stamp}.old{path.name[len(output.name):]}")
            try:
                os.replace(path, target)
            except OSError as e:
                raise storage_error(e, path, "move aside") from None
