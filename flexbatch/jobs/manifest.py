"""The job manifest: what defines a job's results, written beside its output on the first run.

`<output>.job.json` holds the settings (model and a fingerprint of its files, dtype, policy,
block size, window, job-wide sampling defaults, input format) and the history of runs;
`<output>.job.requests` holds the request index (index.py). A resume compares both with what
it is asked to do now, so two different jobs are never mixed into one output file.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..errors import ConfigError, storage_error
from ..storage.disk import write_durably
from .index import ROW

VERSION = 1
SAMPLE_BYTES = 1 << 20  # hashed from the start and the end of each model file

# How each setting is named to the user, so a refusal says which flag changed.
SETTING_NAMES = {
    "input_format": "--format", "column": "--column", "chat": "--chat", "model": "--model",
    "model_fingerprint": "the model's files", "dtype": "--dtype", "policy": "the offloading policy",
    "block_size": "the block size (--batch-size)", "window": "--window", "defaults": "sampling flags",
}


@dataclass
class JobSettings:
    """Everything besides the requests that decides a job's results."""

    input_format: str
    column: str
    chat: bool
    model: str
    model_fingerprint: str
    dtype: str
    policy: dict | None  # None: everything in memory
    block_size: int
    window: int
    defaults: dict  # job-wide SamplingParams

    def differences(self, other: "JobSettings") -> list[str]:
        """'name: old -> new' for each setting that differs from `other` (the recorded one)."""
        out = []
        for f in fields(self):
            old, new = getattr(other, f.name), getattr(self, f.name)
            if f.name == "model" and self.model_fingerprint == other.model_fingerprint:
                continue  # the same files, moved or reached by another path
            if f.name == "defaults":
                # a field added to SamplingParams after the job started counts at its default
                known = _default_sampling()
                old, new = {**known, **old}, {**known, **new}
                out += [f"--{k.replace('_', '-')}: {old.get(k)!r} -> {new.get(k)!r}"
                        for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            elif old != new:
                out.append(f"{SETTING_NAMES[f.name]}: {_brief(old)} -> {_brief(new)}")
        return out


def _default_sampling() -> dict:
    from dataclasses import asdict

    from ..config import SamplingParams

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(SamplingParams()).items()}


def _brief(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 200 else text[:197] + "..."


def manifest_paths(output: Path) -> tuple[Path, Path]:
    return output.with_name(output.name + ".job.json"), output.with_name(output.name + ".job.requests")


@dataclass
class Manifest:
    settings: JobSettings
    rows: np.ndarray  # the request index as recorded
    runs: list[dict]
    input: str = ""  # where the input was read (for the reader; requests are compared by content)

    @classmethod
    def load(cls, output: Path) -> "Manifest | None":
        path, rows_path = manifest_paths(output)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            settings = JobSettings(**data["settings"])
            rows = np.fromfile(rows_path, dtype=ROW)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"the job manifest {path} (or {rows_path.name}) cannot be read ({e}); "
                              "pass --force-new to move the old output aside and start again.") from None
        if data.get("version") != VERSION:
            raise ConfigError(f"{path} was written by another version of flexbatch's job format "
                              f"({data.get('version')}); pass --force-new to start the job again.")
        return cls(settings, rows, data.get("runs", []), data.get("input", ""))

    def save(self, output: Path) -> None:
        path, rows_path = manifest_paths(output)
        data = {"version": VERSION, "input": self.input, "input_requests": int(len(self.rows)),
                "settings": asdict(self.settings), "runs": self.runs}
        _write_atomically(rows_path, self.rows.tobytes())
        _write_atomically(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))

    def add_run(self, note: str) -> None:
        self.runs.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "flexbatch": _version(), "note": note})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flexbatch")
    except PackageNotFoundError:
        return "unknown"


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        write_durably(path, [data], replace=True)
    except OSError as e:
        raise storage_error(e, path, "write the job manifest") from None


@dataclass
class RequestChanges:
    """How the input differs from the recorded one, position by position."""

    changed: np.ndarray  # positions (in file order) whose id or content differ
    added: int  # requests past the recorded end
    removed: int  # recorded requests missing from the end

    @classmethod
    def between(cls, recorded: np.ndarray, current: np.ndarray) -> "RequestChanges":
        common = min(len(recorded), len(current))
        changed = np.flatnonzero(recorded[:common] != current[:common])
        return cls(changed, max(0, len(current) - len(recorded)), max(0, len(recorded) - len(current)))

    @property
    def breaking(self) -> bool:
        return len(self.changed) > 0 or self.removed > 0


def model_fingerprint(path: Path) -> str:
    """A hash of the model's file names, sizes and first and last MiB: changes when the files
    do, without reading gigabytes."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.blake2b(digest_size=12)
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if file != path else file.name}:{size}\n".encode())
        with open(file, "rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            if size > 2 * SAMPLE_BYTES:
                f.seek(size - SAMPLE_BYTES)
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()
